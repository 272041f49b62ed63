"""Training across processes on CPU (gloo), with real torchrun launches: DDP against one process, the sharded
engines (FSDP2, DeepSpeed ZeRO-2 / ZeRO-3) against DDP, their checkpoints, resume at the same and at another world
size, and a killed rank. Each job is a micro model on the demo shards: seconds per launch on 2 cores, most of them
starting the processes, so one launch serves every test it can (module fixtures; a test that writes into a shared
run works on a copy)."""
from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hsfm_train
from tests.conftest import REPO_ROOT
from tests.runs import MICRO, hsfm_script, losses, torchrun

ZERO3_ALL_SHARDED = "trainer.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"
ENGINES = {"fsdp2": ["trainer.strategy=fsdp2"], "zero2": ["deepspeed=zero2"],
           "zero3": ["deepspeed=zero3", ZERO3_ALL_SHARDED]}
WORKER_ENGINES = {"fsdp2": {"strategy": "fsdp2"},
                  "zero2": {"strategy": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}},
                  "zero3": {"strategy": "deepspeed", "deepspeed": {"zero_optimization": {
                      "stage": 3, "stage3_param_persistence_threshold": 0}}}}


def hsfm_job(processes: int, demo_dir: Path, output: Path, *extra: str, prelude: str = "",
             timeout: float = 240) -> subprocess.CompletedProcess:
    """`hsfm pretrain` on `processes` ranks (torchrun runs a script file: the CLI, after ``prelude``)."""
    script = output.parent / f"hsfm_{abs(hash(prelude)) % 10 ** 8}.py"
    script.write_text(hsfm_script(prelude)[2])
    args = ["pretrain", *MICRO, f"data.demo_dir={demo_dir}", f"output_dir={output}", *extra]
    return torchrun(processes, [str(script), *args], output.parent, timeout)


def worker_runs(processes: int, demo_dir: Path, runs: dict[str, dict]) -> dict[str, dict]:
    """One launch of tests/distributed_worker.py training every run of ``runs`` (name: settings with ``out``) in
    turn; the result of each."""
    payload = json.dumps({"demo_dir": str(demo_dir),
                          "runs": [{**settings, "out": str(settings["out"])} for settings in runs.values()]})
    cwd = Path(next(iter(runs.values()))["out"]).parent
    result = torchrun(processes, [str(REPO_ROOT / "tests" / "distributed_worker.py"), payload], cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return {name: {**json.loads((Path(settings["out"]) / "result.json").read_text()),
                   "weights": load_file(str(Path(settings["out"]) / "weights.safetensors"))}
            for name, settings in runs.items()}


def worker(processes: int, demo_dir: Path, out: Path, accumulation: int, **settings) -> dict:
    return worker_runs(processes, demo_dir, {"run": {"out": out, "accumulation": accumulation, **settings}})["run"]


def assert_weights_close(expected: dict, actual: dict, atol: float) -> None:
    assert expected.keys() == actual.keys()
    worst = max((expected[k] - actual[k]).abs().max().item() for k in expected)
    assert worst <= atol, worst


def predictions(export: Path, demo_dir: Path) -> torch.Tensor:
    from hsfm_train.data.pipeline import LoaderConfig, StreamingLoader
    from hsfm_train.stages.eval_recon import masked_forward

    model = hsfm_train.load_pretrained(export)
    batch = next(iter(StreamingLoader(LoaderConfig(shards=str(demo_dir / "eval"), batch_size=4, resampled=False,
                                                   shuffle_buffer=0), rank=0, world_size=1)))
    with torch.no_grad():
        return masked_forward(model, batch, 0.75, 0).prediction


@pytest.fixture(scope="module")
def one_process(demo_dir, tmp_path_factory):
    """One process, global batch 8 as two micro-batches of 4."""
    return worker(1, demo_dir, tmp_path_factory.mktemp("one") / "run", accumulation=2)


@pytest.fixture(scope="module")
def two_processes(demo_dir, tmp_path_factory):
    """Two processes, global batch 8 as one micro-batch of 4 each, trained under DDP, then FSDP2, ZeRO-2 and
    ZeRO-3 (one launch; each run builds its own model, engine and trainer)."""
    root = tmp_path_factory.mktemp("two")
    runs = {"ddp": {}, **{engine: WORKER_ENGINES[engine] for engine in ("fsdp2", "zero2", "zero3")}}
    return worker_runs(2, demo_dir, {name: {"out": root / name, "accumulation": 1, **settings}
                                     for name, settings in runs.items()})


@pytest.fixture(scope="module")
def two_ddp(two_processes):
    return two_processes["ddp"]


def test_two_ddp_processes_train_as_one_process_with_the_same_global_batch(one_process, two_ddp):
    assert two_ddp["world_size"] == 2
    # same samples, same masks, gradients averaged the same way: equal up to float summation order
    assert torch.allclose(torch.tensor(two_ddp["losses"]), torch.tensor(one_process["losses"]), rtol=1e-6, atol=0)
    assert_weights_close(one_process["weights"], two_ddp["weights"], atol=1e-6)


def test_evaluation_on_two_ranks_equals_one_rank(one_process, two_ddp):
    one, two = one_process["eval"], two_ddp["eval"]
    assert two["images"] == one["images"] == 20
    for key in ("psnr", "ssim", "sam_deg"):
        assert two[key] == pytest.approx(one[key], rel=1e-12), key
        for name in one["baselines"]:
            assert two["baselines"][name][key] == pytest.approx(one["baselines"][name][key], rel=1e-12)


@pytest.mark.parametrize("engine", sorted(WORKER_ENGINES))
def test_sharded_engines_train_like_ddp(engine, two_processes):
    two_ddp, sharded = two_processes["ddp"], two_processes[engine]
    assert sharded["world_size"] == 2
    assert torch.allclose(torch.tensor(sharded["losses"]), torch.tensor(two_ddp["losses"]), rtol=1e-5)
    # the SAR group's modules, unused by every batch, get zero gradients from the sharded engines (DDP gives them
    # none), so AdamW's weight decay moves them: 4 steps x lr 1e-3 x decay 0.05 of their size
    assert_weights_close(two_ddp["weights"], sharded["weights"], atol=1e-4)


# What every uninterrupted CLI job below shares with the run it is compared with.
STRAIGHT = ["trainer.max_steps=4", "model.drop_path=0.1"]


@pytest.fixture(scope="module")
def ddp_run(demo_dir, tmp_path_factory):
    """`hsfm pretrain` under DDP on 2 ranks, 4 steps, a checkpoint after every one: the export the sharded engines
    are compared with, the uninterrupted twin of the killed-rank job, the run resumed at another world size."""
    output = tmp_path_factory.mktemp("ddp-cli") / "run"
    result = hsfm_job(2, demo_dir, output, *STRAIGHT, "trainer.checkpoint_every=1")
    assert result.returncode == 0, result.stderr[-4000:]
    return output


@pytest.fixture(scope="module")
def sharded_run(demo_dir, tmp_path_factory):
    """engine -> `hsfm pretrain` under it on 2 ranks, 4 steps, checkpoints at steps 2 and 4 (run once per engine,
    shared by the tests that read it; a test that writes into it works on a copy)."""
    runs: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(engine: str) -> Path:
        if engine not in runs:
            output = tmp_path_factory.mktemp(f"{engine}-cli") / "straight"
            runs[engine] = output, hsfm_job(2, demo_dir, output, *STRAIGHT, "trainer.checkpoint_every=2",
                                            *ENGINES[engine])
        output, result = runs[engine]
        assert result.returncode == 0, result.stderr[-4000:]
        return output

    return get


def copy_run(source: Path, destination: Path) -> Path:
    """A finished run's directory, copied to be resumed or extended without touching the original."""
    shutil.copytree(source, destination)
    return destination


def rewind(source: Path, destination: Path, step: int) -> Path:
    """A copy of a finished run as a crash after the metrics line of its last step, before that step's checkpoint,
    export and summary, would have left it, back at its checkpoint of ``step`` (the steps after it are logged)."""
    copy_run(source, destination)
    checkpoints = destination / "checkpoints"
    for path in checkpoints.glob("step_*"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    (checkpoints / "latest").write_text(f"step_{step:08d}\n")
    shutil.rmtree(destination / "export")
    (destination / "summary.json").unlink()
    return destination


# Rank 1 cannot write its file of checkpoint step 2 (a full disk, say).
RANK_1_WRITE_FAILS = textwrap.dedent("""
    import os
    from hsfm_train.engine import checkpoint
    _save = checkpoint.safetensors.torch.save_file
    def save_file(tensors, filename, *args, **kwargs):
        if os.environ.get("RANK") == "1" and "step_00000002" in str(filename) and "rank_00001" in str(filename):
            raise OSError(28, "No space left on device")
        return _save(tensors, filename, *args, **kwargs)
    checkpoint.safetensors.torch.save_file = save_file
""")


@pytest.fixture(scope="module")
def failed_write(demo_dir, tmp_path_factory):
    """The FSDP2 job of sharded_run with a checkpoint after every step, whose rank 1 cannot write at step 2, then
    its rerun: (run directory, the failed job, its checkpoints as it left them, the rerun)."""
    output = tmp_path_factory.mktemp("fsdp2-write-fails") / "run"
    failed = hsfm_job(2, demo_dir, output, *STRAIGHT, "trainer.checkpoint_every=1", *ENGINES["fsdp2"],
                      prelude=RANK_1_WRITE_FAILS)
    checkpoints = output / "checkpoints"
    left = {"latest": (checkpoints / "latest").read_text().strip() if (checkpoints / "latest").exists() else None,
            "entries": sorted(p.name for p in checkpoints.iterdir()) if checkpoints.exists() else []}
    resumed = hsfm_job(2, demo_dir, output, *STRAIGHT, *ENGINES["fsdp2"]) if failed.returncode != 0 else None
    return output, failed, left, resumed


# How each sharded engine's job is interrupted before it resumes: ZeRO-3 runs a 2-step job and extends it to 4 (the
# learning-rate schedule follows the new max_steps; that code is shared by every engine, so one covers it); FSDP2 is
# failed_write (rank 1 cannot write checkpoint 2); ZeRO-2's straight job is rewound to its step-2 checkpoint.


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sharded_engine_saves_resumes_exactly_and_exports_like_ddp(engine, ddp_run, sharded_run, failed_write,
                                                                  demo_dir, tmp_path):
    straight, interrupted = sharded_run(engine), tmp_path / "interrupted"
    checkpoint = straight / "checkpoints" / "step_00000004"
    files = set(json.loads((checkpoint / "manifest.json").read_text())["files"])
    assert {"model.safetensors", "rank_00000.safetensors", "rank_00001.safetensors"} <= files  # optimiser shards
    assert "optimizer.safetensors" not in files

    resumed_from = 2
    if engine == "fsdp2":
        interrupted, _, _, resumed = failed_write
        resumed_from = 1
    else:
        if engine == "zero3":
            half = hsfm_job(2, demo_dir, interrupted, "trainer.max_steps=2", "model.drop_path=0.1", *ENGINES[engine])
            assert half.returncode == 0, half.stderr[-4000:]
        else:
            rewind(straight, interrupted, 2)
        resumed = hsfm_job(2, demo_dir, interrupted, *STRAIGHT, *ENGINES[engine])
    assert resumed is not None and resumed.returncode == 0, getattr(resumed, "stderr", "")[-4000:]
    assert f"resuming {interrupted} from step_{resumed_from:08d} (step {resumed_from} of 4)" in resumed.stdout
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["resumed_at_step"] == resumed_from and "resume_notes" not in summary
    assert losses(interrupted) == pytest.approx(losses(straight), rel=1e-6)
    assert_weights_close(load_file(str(straight / "export" / "model.safetensors")),
                         load_file(str(interrupted / "export" / "model.safetensors")), atol=1e-6)
    # the consolidated export loads into a plain model and predicts like the DDP run's
    ours, theirs = predictions(straight / "export", demo_dir), predictions(ddp_run / "export", demo_dir)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()


def test_ddp_resumes_at_another_world_size_with_its_optimiser_state(ddp_run, demo_dir, tmp_path):
    # the 2-rank run's last checkpoint (step 4), extended on 1 rank; the effective batch stays 8: 2 x 4, then
    # 1 x 4 x 2 micro-batches
    output = copy_run(ddp_run, tmp_path / "run")
    resumed = hsfm_job(1, demo_dir, output, "trainer.max_steps=6", "model.drop_path=0.1", "trainer.global_batch=8")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["resumed_at_step"] == 4 and summary["steps"] == 6
    notes = " ".join(summary["resume_notes"])
    assert "written by 2 processes, this run has 1: the data stream continues at the start of epoch" in notes
    assert "AdamW moments" not in notes  # DDP's full optimiser state does not depend on the world size
    hsfm_train.load_pretrained(output / "export")


def test_a_sharded_engine_resumes_at_another_world_size_from_the_consolidated_weights(sharded_run, demo_dir,
                                                                                      tmp_path):
    # the 2-rank FSDP2 run's last checkpoint (step 4), extended on 1 rank with the same effective batch
    output = copy_run(sharded_run("fsdp2"), tmp_path / "run")
    extra = ["model.drop_path=0.1", "trainer.global_batch=8", "trainer.strategy=fsdp2"]
    weights_at_4 = load_file(str(output / "checkpoints" / "step_00000004" / "model.safetensors"))
    resumed = hsfm_job(1, demo_dir, output, "trainer.max_steps=5", "trainer.checkpoint_every=1",
                       "trainer.optim.lr=1e-12", "trainer.optim.min_lr=0", "trainer.optim.weight_decay=0", *extra)
    assert resumed.returncode != 0  # other optimisation settings are refused, not silently ignored
    resumed = hsfm_job(1, demo_dir, output, "trainer.max_steps=6", *extra)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["resumed_at_step"] == 4
    assert any("AdamW moments start again from zero (it was written by 2 processes, this run has 1)" in note
               for note in summary["resume_notes"])
    assert json.loads((output / "checkpoints" / "step_00000006" / "manifest.json").read_text())["world_size"] == 1
    assert set(weights_at_4) == set(load_file(str(output / "export" / "model.safetensors")))


# SIGKILL of rank 1 (no clean-up of any kind) at the forward of optimiser step STEP + 1.
KILL_RANK_1 = textwrap.dedent("""
    import os, signal
    from hsfm_train.objectives import pretrain
    _call = pretrain.PretrainObjective.__call__
    calls = {"n": 0}
    def call(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == STEP + 1 and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return _call(self, *args, **kwargs)
    pretrain.PretrainObjective.__call__ = call
""")


def test_a_killed_rank_fails_the_job_fast_and_the_rerun_resumes_bit_identical(ddp_run, demo_dir, tmp_path):
    # the same job as ddp_run (its uninterrupted twin), with a short collective timeout
    common = [*STRAIGHT, "trainer.checkpoint_every=1", "trainer.timeout_s=30"]
    output = tmp_path / "run"
    started = time.monotonic()
    killed = hsfm_job(2, demo_dir, output, *common, prelude=KILL_RANK_1.replace("STEP", "2"))
    assert killed.returncode != 0
    assert time.monotonic() - started < 60  # torchrun tears the job down; nothing waits for the collective timeout
    assert (output / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    resumed = hsfm_job(2, demo_dir, output, *common)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming {output} from step_00000002 (step 2 of 4)" in resumed.stdout
    # exact: the weights, the AdamW moments, every rank's data position and random generators came back
    assert losses(output) == losses(ddp_run)
    assert_weights_close(load_file(str(ddp_run / "export" / "model.safetensors")),
                         load_file(str(output / "export" / "model.safetensors")), atol=0.0)


def test_a_rank_that_cannot_write_its_shard_leaves_no_checkpoint_and_fails_every_rank(failed_write):
    output, failed, left, resumed = failed_write
    assert failed.returncode != 0
    assert "checkpoint step_00000002 not written: rank 1: OSError" in failed.stderr
    assert left["latest"] == "step_00000001"
    assert left["entries"] == ["latest", "step_00000001"]  # no partial left behind
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming {output} from step_00000001 (step 1 of 4)" in resumed.stdout
