"""Training across processes on CPU (gloo), with real torchrun launches: DDP against one process, the sharded
engines (FSDP2, DeepSpeed ZeRO-2 / ZeRO-3) against DDP, their checkpoints, resume at the same and at another world
size, and a killed rank. Each job is a micro model on the demo shards: seconds per launch on 2 cores."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hsfm_train
from tests.conftest import REPO_ROOT
from tests.runs import MICRO, hsfm_script, losses, run_env

ZERO3_ALL_SHARDED = "trainer.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"
ENGINES = {"fsdp2": ["trainer.strategy=fsdp2"], "zero2": ["deepspeed=zero2"],
           "zero3": ["deepspeed=zero3", ZERO3_ALL_SHARDED]}
WORKER_ENGINES = {"fsdp2": {"strategy": "fsdp2"},
                  "zero2": {"strategy": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}},
                  "zero3": {"strategy": "deepspeed", "deepspeed": {"zero_optimization": {
                      "stage": 3, "stage3_param_persistence_threshold": 0}}}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_env(tmp_path: Path) -> dict[str, str]:
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return {**run_env(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(cache), "PYTHONPATH": str(REPO_ROOT)}


def torchrun(processes: int, script: list[str], tmp_path: Path, timeout: float = 240
             ) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *script]
    return subprocess.run(command, cwd=tmp_path, env=distributed_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def hsfm_job(processes: int, demo_dir: Path, output: Path, *extra: str, prelude: str = "",
             timeout: float = 240) -> subprocess.CompletedProcess:
    """`hsfm pretrain` on `processes` ranks (torchrun runs a script file: the CLI, after ``prelude``)."""
    script = output.parent / f"hsfm_{abs(hash(prelude)) % 10 ** 8}.py"
    script.write_text(hsfm_script(prelude)[2])
    args = ["pretrain", *MICRO, f"data.demo_dir={demo_dir}", f"output_dir={output}", *extra]
    return torchrun(processes, [str(script), *args], output.parent, timeout)


def worker(processes: int, demo_dir: Path, out: Path, accumulation: int, **settings) -> dict:
    payload = json.dumps({"demo_dir": str(demo_dir), "out": str(out), "accumulation": accumulation, **settings})
    result = torchrun(processes, [str(REPO_ROOT / "tests" / "distributed_worker.py"), payload], out.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return {**json.loads((out / "result.json").read_text()), "weights": load_file(str(out / "weights.safetensors"))}


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
def two_ddp(demo_dir, tmp_path_factory):
    """Two DDP processes, global batch 8 as one micro-batch of 4 each."""
    return worker(2, demo_dir, tmp_path_factory.mktemp("ddp") / "run", accumulation=1)


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
def test_sharded_engines_train_like_ddp(engine, two_ddp, demo_dir, tmp_path):
    sharded = worker(2, demo_dir, tmp_path / "run", accumulation=1, **WORKER_ENGINES[engine])
    assert torch.allclose(torch.tensor(sharded["losses"]), torch.tensor(two_ddp["losses"]), rtol=1e-5)
    # the SAR group's modules, unused by every batch, get zero gradients from the sharded engines (DDP gives them
    # none), so AdamW's weight decay moves them: 4 steps x lr 1e-3 x decay 0.05 of their size
    assert_weights_close(two_ddp["weights"], sharded["weights"], atol=1e-4)


@pytest.fixture(scope="module")
def ddp_export(demo_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp-cli") / "run"
    result = hsfm_job(2, demo_dir, output, "trainer.max_steps=4")
    assert result.returncode == 0, result.stderr[-4000:]
    return output


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sharded_engine_saves_resumes_exactly_and_exports_like_ddp(engine, ddp_export, demo_dir, tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    first = hsfm_job(2, demo_dir, straight, "trainer.max_steps=4", "trainer.checkpoint_every=2", *ENGINES[engine])
    assert first.returncode == 0, first.stderr[-4000:]
    checkpoint = straight / "checkpoints" / "step_00000004"
    files = set(json.loads((checkpoint / "manifest.json").read_text())["files"])
    assert {"model.safetensors", "rank_00000.safetensors", "rank_00001.safetensors"} <= files  # optimiser shards
    assert "optimizer.safetensors" not in files

    half = hsfm_job(2, demo_dir, interrupted, "trainer.max_steps=2", *ENGINES[engine])
    assert half.returncode == 0, half.stderr[-4000:]
    resumed = hsfm_job(2, demo_dir, interrupted, "trainer.max_steps=4", *ENGINES[engine])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming {interrupted} from step_00000002 (step 2 of 4)" in resumed.stdout
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["resumed_at_step"] == 2 and "resume_notes" not in summary
    assert losses(interrupted) == pytest.approx(losses(straight), rel=1e-6)
    assert_weights_close(load_file(str(straight / "export" / "model.safetensors")),
                         load_file(str(interrupted / "export" / "model.safetensors")), atol=1e-6)
    # the consolidated export loads into a plain model and predicts like the DDP run's
    ours, theirs = predictions(straight / "export", demo_dir), predictions(ddp_export / "export", demo_dir)
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()


def test_ddp_resumes_at_another_world_size_with_its_optimiser_state(demo_dir, tmp_path):
    output = tmp_path / "run"
    extra = ["trainer.global_batch=8"]  # the effective batch stays 8: 2 x 4, then 1 x 4 x 2 micro-batches
    assert hsfm_job(2, demo_dir, output, "trainer.max_steps=2", *extra).returncode == 0
    resumed = hsfm_job(1, demo_dir, output, "trainer.max_steps=4", *extra)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["resumed_at_step"] == 2 and summary["steps"] == 4
    notes = " ".join(summary["resume_notes"])
    assert "written by 2 processes, this run has 1: the data stream continues at the start of epoch" in notes
    assert "AdamW moments" not in notes  # DDP's full optimiser state does not depend on the world size
    hsfm_train.load_pretrained(output / "export")


def test_a_sharded_engine_resumes_at_another_world_size_from_the_consolidated_weights(demo_dir, tmp_path):
    output = tmp_path / "run"
    extra = ["trainer.global_batch=8", "trainer.strategy=fsdp2"]
    assert hsfm_job(2, demo_dir, output, "trainer.max_steps=2", *extra).returncode == 0
    weights_at_2 = load_file(str(output / "checkpoints" / "step_00000002" / "model.safetensors"))
    resumed = hsfm_job(1, demo_dir, output, "trainer.max_steps=3", "trainer.checkpoint_every=1",
                       "trainer.optim.lr=1e-12", "trainer.optim.min_lr=0", "trainer.optim.weight_decay=0", *extra)
    assert resumed.returncode != 0  # other optimisation settings are refused, not silently ignored
    resumed = hsfm_job(1, demo_dir, output, "trainer.max_steps=4", *extra)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["resumed_at_step"] == 2
    assert any("AdamW moments start again from zero (it was written by 2 processes, this run has 1)" in note
               for note in summary["resume_notes"])
    assert json.loads((output / "checkpoints" / "step_00000004" / "manifest.json").read_text())["world_size"] == 1
    assert set(weights_at_2) == set(load_file(str(output / "export" / "model.safetensors")))


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


def test_a_killed_rank_fails_the_job_fast_and_the_rerun_resumes_bit_identical(demo_dir, tmp_path):
    common = ["trainer.max_steps=6", "trainer.checkpoint_every=1", "trainer.timeout_s=30", "model.drop_path=0.1"]
    straight = hsfm_job(2, demo_dir, tmp_path / "straight", *common)
    assert straight.returncode == 0, straight.stderr[-4000:]
    output = tmp_path / "run"
    started = time.monotonic()
    killed = hsfm_job(2, demo_dir, output, *common, prelude=KILL_RANK_1.replace("STEP", "3"))
    assert killed.returncode != 0
    assert time.monotonic() - started < 60  # torchrun tears the job down; nothing waits for the collective timeout
    assert (output / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    resumed = hsfm_job(2, demo_dir, output, *common)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming {output} from step_00000003 (step 3 of 6)" in resumed.stdout
    # exact: the weights, the AdamW moments, every rank's data position and random generators came back
    assert losses(output) == losses(tmp_path / "straight")
    assert_weights_close(load_file(str(tmp_path / "straight" / "export" / "model.safetensors")),
                         load_file(str(output / "export" / "model.safetensors")), atol=0.0)


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


def test_a_rank_that_cannot_write_its_shard_leaves_no_checkpoint_and_fails_every_rank(demo_dir, tmp_path):
    output = tmp_path / "run"
    failed = hsfm_job(2, demo_dir, output, "trainer.max_steps=4", "trainer.checkpoint_every=1",
                      "trainer.strategy=fsdp2", prelude=RANK_1_WRITE_FAILS)
    assert failed.returncode != 0
    assert "checkpoint step_00000002 not written: rank 1: OSError" in failed.stderr
    checkpoints = output / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000001"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]  # no partial left behind
    resumed = hsfm_job(2, demo_dir, output, "trainer.max_steps=4", "trainer.strategy=fsdp2")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming {output} from step_00000001 (step 1 of 4)" in resumed.stdout
