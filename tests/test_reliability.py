"""Runs never get lost: the kill -9 / signal / concurrent-run matrix, through the CLI in fresh interpreters.

What is checked, on the micro model and the demo shards (4 batches per epoch, so checkpoints land at the first,
a middle and the last batch of an epoch); the interrupted runs are compared with one uninterrupted 12-step run
per loader-worker count, shared by the tests:
* SIGKILL after any step (the first, a middle and the last of an epoch), with 0 and 2 loader workers: the rerun
  takes over the dead run's lock and resumes from the last checkpoint; one run is killed after each of those steps
  in turn (each rerun killed at the next), and the last rerun ends with bit-identical weights, identical losses
  and one metrics line per step;
* SIGKILL in the middle of a checkpoint write: ``latest`` stays on the previous checkpoint;
* SIGTERM / SIGUSR1: a checkpoint, exit 0, and the rerun ends bit-identical;
* a finished run (also one ending on an epoch boundary) can be extended;
* a corrupted latest checkpoint falls back to the previous one and still ends bit-identical;
* a second run on a running run's output_dir is refused in one line and does the first no harm; a later run
  with other optimisation settings is refused instead of silently resuming with the checkpoint's.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests import runs
from tests.runs import ONE_THREAD, assert_same_weights, error_lines, hsfm_script, losses, metrics, overrides, run_env

EPOCH = ["data.train.batches_per_epoch=4"]


def run(args: list[str], cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """Every run of this module on one intra-op thread (runs are only compared with each other)."""
    return runs.run(args, cwd, prelude, env=ONE_THREAD)


# SIGKILL (no clean-up of any kind) at the forward of optimiser step STEP + 1, i.e. after step STEP finished.
KILL_AFTER_STEP = textwrap.dedent("""
    import os, signal
    from hsfm_train.objectives import pretrain
    _call = pretrain.PretrainObjective.__call__
    calls = {"n": 0}
    def call(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == STEP + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return _call(self, *args, **kwargs)
    pretrain.PretrainObjective.__call__ = call
""")

# SIGKILL halfway through writing model.safetensors of step 6.
KILL_DURING_STEP6_SAVE = textwrap.dedent("""
    import os, signal
    import safetensors.torch
    from hsfm_train.engine import checkpoint
    _save = safetensors.torch.save_file
    def save_file(tensors, filename, *args, **kwargs):
        if "step_00000006" in str(filename) and filename.endswith("model.safetensors"):
            _save(tensors, filename, *args, **kwargs)
            os.truncate(filename, os.path.getsize(filename) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(tensors, filename, *args, **kwargs)
    checkpoint.safetensors.torch.save_file = save_file
""")

# Hold the run at the forward of step 5 until the file RELEASE exists.
PAUSE_AT_STEP_5 = textwrap.dedent("""
    import os, time
    from hsfm_train.objectives import pretrain
    _call = pretrain.PretrainObjective.__call__
    calls = {"n": 0}
    def call(self, *args, **kwargs):
        calls["n"] += 1
        deadline = time.monotonic() + 120
        while calls["n"] == 5 and not os.path.exists("RELEASE") and time.monotonic() < deadline:
            time.sleep(0.05)
        return _call(self, *args, **kwargs)
    pretrain.PretrainObjective.__call__ = call
""")

# Deliver SIGNAL (Slurm's preemption signals) to ourselves during the 4th optimiser step.
SIGNAL_AT_STEP_4 = KILL_AFTER_STEP.replace("STEP + 1", "4").replace("signal.SIGKILL", "signal.SIGNAL")


def latest_checkpoint(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def assert_one_line_per_step(run_dir: Path, last_step: int) -> None:
    steps = [entry["step"] for entry in metrics(run_dir) if "train/loss" in entry]
    assert steps == list(range(1, last_step + 1))


STEPS = 12  # three epochs of 4 batches: the straight run ends on an epoch boundary


def twelve_steps(demo_dir: Path, output: Path, checkpoint_every: int = 1, workers: int = 0) -> list[str]:
    return ["pretrain", *overrides(demo_dir, output, f"trainer.max_steps={STEPS}",
                                   f"trainer.checkpoint_every={checkpoint_every}",
                                   f"data.train.num_workers={workers}", *EPOCH)]


@pytest.fixture(scope="module")
def straight(demo_dir, tmp_path_factory):
    """workers -> an uninterrupted 12-step run with a checkpoint after every step and that many loader workers:
    (run directory, its result). The reference the interrupted runs must end identical to; run once per worker
    count, shared (a test that writes into it works on a copy)."""
    done: dict[int, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(workers: int) -> tuple[Path, subprocess.CompletedProcess]:
        if workers not in done:
            output = tmp_path_factory.mktemp(f"straight-{workers}") / "run"
            done[workers] = output, run(twelve_steps(demo_dir, output, workers=workers), output.parent)
        output, result = done[workers]
        assert result.returncode == 0, result.stderr[-3000:]
        return output, result

    return get


KILL_POINTS = {5: "first-of-epoch", 6: "middle-of-epoch", 8: "last-of-epoch"}


@pytest.mark.parametrize("workers", [0, 2], ids=["0-workers", "2-workers"])
def test_sigkill_after_any_step_resumes_bit_identical(straight, demo_dir, tmp_path, workers):
    reference, _ = straight(workers)
    output = tmp_path / "run"
    command = twelve_steps(demo_dir, output, workers=workers)
    resumed_from = 0
    for step, where in KILL_POINTS.items():  # the run (then its rerun) dies after this step
        # the prelude counts this process's steps: a rerun starts after the checkpoint it resumes from
        killed = run(command, tmp_path, prelude=KILL_AFTER_STEP.replace("STEP", str(step - resumed_from)))
        assert killed.returncode == -9, (where, killed.stderr[-3000:])
        assert latest_checkpoint(output) == f"step_{step:08d}", where
        if resumed_from:
            assert_resumed_from(killed, output, resumed_from)
        resumed_from = step

    resumed = run(command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_from(resumed, output, resumed_from)
    assert json.loads((output / "summary.json").read_text())["resumed_at_step"] == resumed_from
    assert_same_weights(reference / "export", output / "export")
    assert losses(output) == losses(reference)
    assert_one_line_per_step(output, STEPS)  # the lines of the steps after each checkpoint are not repeated


def assert_resumed_from(result: subprocess.CompletedProcess, output: Path, step: int) -> None:
    assert "taking over the lock of a run that is no longer running" in result.stdout, result.stdout[-3000:]
    assert f"resuming {output} from step_{step:08d} (step {step} of {STEPS})" in result.stdout, result.stdout[-3000:]


def test_sigkill_during_checkpoint_write_keeps_the_previous_checkpoint(straight, demo_dir, tmp_path):
    reference, _ = straight(0)
    output = tmp_path / "interrupted"
    command = twelve_steps(demo_dir, output, checkpoint_every=3)
    killed = run(command, tmp_path, prelude=KILL_DURING_STEP6_SAVE)
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoints = output / "checkpoints"
    assert latest_checkpoint(output) == "step_00000003"
    assert any(".partial-" in p.name for p in checkpoints.iterdir())  # the half-written step 6

    resumed = run(command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((output / "summary.json").read_text())["resumed_at_step"] == 3
    assert not any(".partial-" in p.name for p in checkpoints.iterdir())
    assert_same_weights(reference / "export", output / "export")
    assert losses(output) == losses(reference)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_and_exits_cleanly_then_resume_ends_bit_identical(straight, demo_dir, tmp_path,
                                                                                   signal_name):
    reference, _ = straight(0)
    output = tmp_path / "run"
    command = twelve_steps(demo_dir, output, checkpoint_every=100)  # the only checkpoint: the signal's
    stopped = run(command, tmp_path, prelude=SIGNAL_AT_STEP_4.replace("SIGNAL", signal_name))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert f"stopped by signal {signal_name}" in stopped.stdout
    assert latest_checkpoint(output) == "step_00000004"
    assert not (output / "export").exists()  # no export of an unfinished run
    finished = run(command, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "taking over" not in finished.stdout  # the stopped run released its lock
    summary = json.loads((output / "summary.json").read_text())
    assert summary["resumed_at_step"] == 4 and summary["stopped_by"] == "max_steps"
    assert_same_weights(reference / "export", output / "export")


def test_a_run_finished_on_an_epoch_boundary_can_be_extended(straight, demo_dir, tmp_path):
    # 4 batches per epoch: step 12 is an epoch's last batch, where the checkpoint used to be unresumable
    finished, first = straight(0)
    assert f"starting a new run in {finished} ({STEPS} steps)" in first.stdout
    for result in (first,):
        assert "unable to detect" not in result.stdout + result.stderr  # DeepSpeed's accelerator warning

    output = shutil.copytree(finished, tmp_path / "run")
    again = run(twelve_steps(demo_dir, output), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already finished at step {STEPS} (step_{STEPS:08d})" in again.stdout

    extended = run(["pretrain", *overrides(demo_dir, output, "trainer.max_steps=16", "data.train.num_workers=0",
                                           *EPOCH)], tmp_path)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "resuming" in extended.stdout and f"(step {STEPS} of 16)" in extended.stdout
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["resumed_at_step"] == STEPS
    assert_one_line_per_step(output, 16)


def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(straight, demo_dir, tmp_path):
    output = shutil.copytree(straight(0)[0], tmp_path / "run")  # finished, checkpoints kept at 10, 11 and 12
    command = twelve_steps(demo_dir, output)
    reference = tmp_path / "reference"
    (output / "export").rename(reference)
    weights = output / "checkpoints" / "step_00000012" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    weights.write_bytes(bytes(data))

    rerun = run(command, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "cannot resume from step_00000012" in rerun.stderr and "sha256" in rerun.stderr
    assert "falling back to the previous checkpoint step_00000011" in rerun.stderr
    assert "from step_00000011 (step 11 of 12)" in rerun.stdout
    assert_same_weights(reference, output / "export")  # step 12 replayed exactly


def test_a_second_run_on_a_running_output_dir_is_refused_without_harm(demo_dir, tmp_path):
    output = tmp_path / "run"
    release = tmp_path / "release"
    command = overrides(demo_dir, output, "trainer.max_steps=12", "trainer.checkpoint_every=1", *EPOCH)
    first = subprocess.Popen([*hsfm_script(PAUSE_AT_STEP_5.replace('"RELEASE"', repr(str(release)))),
                              "pretrain", *command], cwd=tmp_path, env=run_env(ONE_THREAD), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(output) != "step_00000004":
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not reach step 4"
            time.sleep(0.1)
        second = run(["pretrain", *command], tmp_path)  # while the first is held inside step 5
        other_lr = run(["pretrain", *command, "trainer.optim.lr=0.01"], tmp_path)
        still_running = first.poll() is None
        release.touch()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    for refused in (second, other_lr):
        assert refused.returncode == 2, refused.stderr[-3000:]
        lines = error_lines(refused)
        assert len(lines) == 1 and "is in use by another run (pid" in lines[0], refused.stderr[-2000:]
        assert f"pid {first.pid} " in lines[0] and "Traceback" not in refused.stderr
    assert still_running, "the refused runs must not have stopped the first one"
    assert first.returncode == 0, stderr[-3000:]
    assert_one_line_per_step(output, 12)
    checkpoints = output / "checkpoints"
    assert latest_checkpoint(output) == "step_00000012"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_")) == [
        "step_00000010", "step_00000011", "step_00000012"]

    # finished: the lock is free, but a run with another lr must not silently resume with the checkpoint's lr
    changed = run(["pretrain", *command, "trainer.optim.lr=0.01"], tmp_path)
    assert changed.returncode == 2
    lines = error_lines(changed)
    assert len(lines) == 1 and "other optimisation settings (optim.lr: checkpoint 0.001, now 0.01)" in lines[0]
