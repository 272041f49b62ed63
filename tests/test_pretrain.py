"""The pretraining stage end to end through its CLI: the main job, exact resume after SIGKILL (also in the middle
of a checkpoint write), clean exit on SIGTERM, export -> load, and start-up errors that name the key at fault.

Runs use a micro model on the demo shards so that each process takes seconds on 2 cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hsfm_train.data.demo import build_demo_shards

MICRO = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_depth=1", "model.decoder_num_heads=2", "model.spectral_channels=8", "model.spectral_basis=8",
         "data.train.batch_size=4", "eval.max_batches=1", "eval.batch_size=8", "trainer.wandb=false",
         "trainer.progress=false", "trainer.log_every=1", "trainer.figure_every=0", "trainer.optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("demo")
    build_demo_shards(directory)
    return directory


def _overrides(demo_dir: Path, output: Path, *extra: str) -> list[str]:
    return [*MICRO, f"data.demo_dir={demo_dir}", f"output_dir={output}", *extra]


def _run(args: list[str], cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """`hsfm ARGS` in a fresh interpreter; ``prelude`` runs first (to patch in a crash)."""
    script = prelude + "\nimport sys\nfrom hsfm_train.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "WANDB_MODE": "disabled", "HSFM_DEBUG": ""}
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


# Kill the process (SIGKILL, no clean-up of any kind) halfway through writing model.safetensors of step 6.
KILL_DURING_STEP6_SAVE = textwrap.dedent("""
    import os, signal
    import safetensors.torch
    from hsfm_train.engine import checkpoint
    _save = safetensors.torch.save_file
    def save_file(tensors, filename, *args, **kwargs):
        if "step_00000006" in str(filename) and filename.endswith("model.safetensors"):
            _save(tensors, filename, *args, **kwargs)
            size = os.path.getsize(filename)
            os.truncate(filename, size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(tensors, filename, *args, **kwargs)
    checkpoint.safetensors.torch.save_file = save_file
""")


def test_sigkill_during_checkpoint_write_resumes_to_identical_weights(demo_dir, tmp_path):
    common = ["trainer.max_steps=8", "trainer.checkpoint_every=3"]
    straight = _run(["pretrain", *_overrides(demo_dir, tmp_path / "straight", *common)], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "masked reconstruction on held-out tiles" in straight.stdout and "PSNR" in straight.stdout

    interrupted = tmp_path / "interrupted"
    command = ["pretrain", *_overrides(demo_dir, interrupted, *common)]
    killed = _run(command, tmp_path, prelude=KILL_DURING_STEP6_SAVE)
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoints = interrupted / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000003"
    assert any(".partial-" in p.name for p in checkpoints.iterdir())  # the half-written step 6

    resumed = _run(command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((interrupted / "summary.json").read_text())
    assert summary["resumed_at_step"] == 3 and summary["steps"] == 8
    assert not any(".partial-" in p.name for p in checkpoints.iterdir())

    expected, actual = _weights(tmp_path / "straight" / "export"), _weights(interrupted / "export")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    # the logged losses after the resume are the uninterrupted run's losses
    def losses(run: Path) -> dict[int, float]:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {entry["step"]: entry["train/loss"] for entry in lines if "train/loss" in entry}
    straight_losses, resumed_losses = losses(tmp_path / "straight"), losses(interrupted)
    for step in range(4, 9):
        assert resumed_losses[step] == straight_losses[step]


# Deliver SIGNAL (Slurm's preemption signals) to ourselves during the 4th optimiser step.
SIGNAL_AT_STEP_4 = textwrap.dedent("""
    import os, signal
    from hsfm_train.objectives import pretrain
    _call = pretrain.PretrainObjective.__call__
    calls = {"n": 0}
    def call(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGNAL)
        return _call(self, *args, **kwargs)
    pretrain.PretrainObjective.__call__ = call
""")


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_and_exits_cleanly_then_resume_finishes(demo_dir, tmp_path, signal_name):
    output = tmp_path / "run"
    command = ["pretrain", *_overrides(demo_dir, output, "trainer.max_steps=6", "trainer.checkpoint_every=100")]
    stopped = _run(command, tmp_path, prelude=SIGNAL_AT_STEP_4.replace("SIGNAL", signal_name))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert f"stopped by signal {signal_name}" in stopped.stdout
    assert (output / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (output / "export").exists()  # no export of an unfinished run
    finished = _run(command, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["resumed_at_step"] == 4 and summary["stopped_by"] == "max_steps"


def test_export_round_trip_and_encoder_only(demo_dir, tmp_path):
    from hsfm_train import load_pretrained
    from hsfm_train.stages.pretrain import model_from_checkpoint

    run = tmp_path / "run"
    result = _run(["pretrain", *_overrides(demo_dir, run, "trainer.max_steps=2", "objective=karma",
                                           "model.lsmm.init=vca")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_pretrained(run / "export")
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["model"]["lsmm"]["num_endmembers"] == 8 and config["provenance"]["step"] == 2
    assert set(config["normalization"]) and all(len(s["mean"]) == s["bands"] for s in config["normalization"].values())
    from_checkpoint, _ = model_from_checkpoint(run)
    hsi, wavelengths = torch.randn(2, 156, 32, 32), torch.linspace(400.0, 900.0, 156)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        a = model(hsi, wavelengths, generator=generator()).prediction
        b = from_checkpoint(hsi, wavelengths, generator=generator()).prediction
    assert torch.equal(a, b)

    encoder_dir = tmp_path / "encoder"
    result = _run(["export", str(run), "--out", str(encoder_dir), "--encoder-only"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    encoder = load_pretrained(encoder_dir)
    assert encoder.lsmm is None and not any(k.startswith("decoder") for k in encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(encoder.encode(hsi, wavelengths), model.encode(hsi, wavelengths))
    with pytest.raises(RuntimeError, match="encoder-only"):
        encoder(hsi, wavelengths)

    result = _run(["eval-recon", str(run / "export"), "--shards", str(demo_dir / "eval"), "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout)
    assert scores["images"] == 23 and 0 < scores["sam_deg"] < 90 and -1 <= scores["ssim"] <= 1

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((run / "export" / "config.json").read_text())
    data = (run / "export" / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = _run(["eval-recon", str(truncated), "--shards", str(demo_dir / "eval")], tmp_path)
    assert result.returncode == 2 and "model.safetensors" in result.stderr and "truncated" in result.stderr


@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_step=3"], r"max_step.*did you mean 'trainer.max_steps'"),
    (["objective=karmaa"], r"karmaa"),
    (["trainer.global_batch=102"], r"global_batch 102 is not divisible by batch_size 4"),
    (["objective.physics=1.0"], r"physics term but the model has no LSMM head"),
    (["model.embed_dim=30"], r"embed_dim 30 must be divisible by 4"),
    (["trainer.precision=bf16"], r"bf16 needs a GPU"),
])
def test_startup_errors_name_the_problem(demo_dir, tmp_path, overrides, message):
    result = _run(["pretrain", *_overrides(demo_dir, tmp_path / "run", *overrides)], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("hsfm: error:")]
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_band_set_without_wavelengths_fails_at_startup(tmp_path):
    from tests.conftest import shared_file

    salinas = shared_file("classification/salinasA/salinasA.npz")
    shards = tmp_path / "salinas"
    built = _run(["shards", "build", str(salinas), "--out", str(shards), "--quiet"], tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    result = _run(["pretrain", *MICRO, "data=shards", f"data.train.shards={shards}", f"data.eval.shards={shards}",
                   f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2
    assert "has no wavelengths" in result.stderr and "aviris" in result.stderr.lower()
