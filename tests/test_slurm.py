"""The job scripts of slurm/ on a real Slurm cluster started for this module (tests/slurm_cluster.py: munged,
slurmctld and two slurmd on this machine): pretrain.sbatch with DDP across two fake nodes (one training process
per node, world size 2, the micro model on the demo shards), finetune.sbatch running the probe on its export, and
preemption -> checkpoint -> requeue -> resume.

Skipped only when Slurm is not installed and cannot be installed (the reason says why)."""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.runs import assert_same_weights, metrics, overrides
from tests.slurm_cluster import LocalSlurmCluster, SlurmError, SlurmUnavailable, ensure_slurm_installed

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "slurm" / "pretrain.sbatch"
FINETUNE = REPO / "slurm" / "finetune.sbatch"
BATCH = 4  # data.train.batch_size of tests.runs.MICRO
NODES = 2


@pytest.fixture(scope="module")
def slurm_cluster():
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as error:
        pytest.skip(f"no Slurm on this machine: {error}")
    with LocalSlurmCluster() as cluster:
        yield cluster


def job_env() -> dict[str, str]:
    env = {"HSFM_PROCS_PER_NODE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HSFM_DEBUG": "",
           "HSFM_REPO": "", "ACCELERATE_USE_CPU": "true"}
    if (Path(sys.prefix) / "bin" / "activate").exists():
        env["HSFM_VENV"] = sys.prefix
    else:
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def submit(cluster: LocalSlurmCluster, workdir: Path, demo_dir: Path, run: Path, *extra: str) -> tuple[str, Path]:
    job = cluster.sbatch(PRETRAIN, "demo", *overrides(demo_dir, run, *extra),
                         options=[f"--nodes={NODES}", "--cpus-per-task=1", f"--output={workdir}/job-%j.out",
                                  "--job-name=hsfm-test"],
                         cwd=workdir, env=job_env())
    return job, workdir / f"job-{job}.out"


def check_checkpoints(run: Path, saved_steps: list[int]) -> None:
    """Exactly one complete directory per kept step, and ``latest`` names the newest."""
    directory = run / "checkpoints"
    names = sorted(path.name for path in directory.iterdir())
    assert names == sorted(["latest", *(f"step_{step:08d}" for step in saved_steps)]), names
    for step in saved_steps:
        assert (directory / f"step_{step:08d}" / "manifest.json").is_file()
    assert (directory / "latest").read_text().strip() == f"step_{saved_steps[-1]:08d}"


def ranks_in_checkpoint(checkpoint: Path) -> set[tuple[int, int]]:
    """(rank, world_size) of every data loader state the checkpoint holds, wherever its JSON files keep them."""
    found: set[tuple[int, int]] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "rank" in node and "world_size" in node:
                found.add((int(node["rank"]), int(node["world_size"])))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in checkpoint.glob("*.json"):
        walk(json.loads(path.read_text()))
    return found


@pytest.fixture(scope="module")
def two_node_run(slurm_cluster, demo_dir, tmp_path_factory):
    """A 6-step pretraining job across both nodes: (run directory, job record, job log text)."""
    workdir = tmp_path_factory.mktemp("two-node")
    run = workdir / "run"
    job, log = submit(slurm_cluster, workdir, demo_dir, run, "trainer.max_steps=6", "trainer.checkpoint_every=2")
    record = slurm_cluster.wait_for_state(job, {"COMPLETED"}, timeout=180, log=log)
    return run, record, log.read_text()


def test_two_node_pretraining(two_node_run):
    from hsfm_train import load_pretrained

    run, record, text = two_node_run
    steps = 6
    assert record["NumNodes"] == "2" and record["ExitCode"] == "0:0", record
    assert f"{NODES} node(s) x 1 process(es)" in text, text[-3000:]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "max_steps" and summary["steps"] == steps
    assert summary["samples"] == steps * BATCH * NODES  # both ranks contributed every step
    assert summary["resumed_at_step"] is None
    check_checkpoints(run, [2, 4, 6])
    assert ranks_in_checkpoint(run / "checkpoints" / "step_00000006") == {(0, 2), (1, 2)}

    model = load_pretrained(run / "export")
    assert sum(parameter.numel() for parameter in model.parameters()) > 0
    assert_same_weights(run / "export", run / "checkpoints" / "step_00000006")


def labelled_scene(path: Path) -> Path:
    """A small labelled cube (3 classes with distinct mean spectra) in the reader's npz convention."""
    rng = np.random.default_rng(0)
    labels = np.zeros((24, 24), np.int64)
    labels[:, :8], labels[:, 8:16], labels[:, 16:], labels[:2] = 1, 2, 3, 0
    means = rng.random((4, 20)).astype(np.float32)
    cube = means[labels] + 0.05 * rng.standard_normal((24, 24, 20)).astype(np.float32)
    np.savez(path, cube=cube, labels=labels, wavelengths_nm=np.linspace(420.0, 880.0, 20))
    return path


def test_finetune_script_runs_a_downstream_stage(slurm_cluster, two_node_run, tmp_path):
    """slurm/finetune.sbatch STAGE - overrides: the probe stage on the pretraining export, one node, one process."""
    export = two_node_run[0] / "export"
    scene = labelled_scene(tmp_path / "scene.npz")
    job = slurm_cluster.sbatch(FINETUNE, "probe", "-", f"backbone={export}", f"data.scene={scene}", "seeds=1",
                               "shots=[5]", "probes=[linear]", "controls=false", "output_dir=probe",
                               options=["--cpus-per-task=1", f"--output={tmp_path}/job-%j.out"],
                               cwd=tmp_path, env=job_env())
    log = tmp_path / f"job-{job}.out"
    record = slurm_cluster.wait_for_state(job, {"COMPLETED"}, timeout=120, log=log)
    assert record["NumNodes"] == "1" and record["Restarts"] == "0", record
    assert "1 node(s) x 1 process(es)" in log.read_text()
    summary = json.loads((tmp_path / "probe" / "summary.json").read_text())  # output_dir relative to the submit dir
    assert summary["backbone"] == str(export) and summary["classes"] == [1, 2, 3]
    assert summary["results"]["backbone"]["5"]["oa_mean"] > summary["chance_oa"]


def wait_for_step(run: Path, step: int, timeout: float, cluster: LocalSlurmCluster, job: str, log: Path) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = max((entry["step"] for entry in metrics(run) if "train/loss" in entry), default=0)
        except (OSError, ValueError):  # not written yet, or a line half written
            done = 0
        if done >= step:
            return done
        state = cluster.job(job).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise SlurmError(f"job {job} is {state} before step {step}\n{cluster.diagnostics(log)}")
        time.sleep(0.2)
    raise SlurmError(f"no step {step} within {timeout} s\n{cluster.diagnostics(log)}")


def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, demo_dir, tmp_path):
    run, steps = tmp_path / "run", 60
    job, log = submit(slurm_cluster, tmp_path, demo_dir, run, f"trainer.max_steps={steps}",
                      "trainer.checkpoint_every=10")
    signalled_after = wait_for_step(run, 3, 120, slurm_cluster, job, log)
    # what --signal=B:USR1@T does before the time limit: SIGUSR1 to the batch shell only
    slurm_cluster.command("scancel", "--signal=USR1", "--batch", job)

    def requeued_and_done() -> dict[str, str] | None:
        record = slurm_cluster.job(job)
        if int(record.get("Restarts", "0")) >= 1 and record.get("JobState") == "COMPLETED":
            return record
        if record.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") or not record:
            raise SlurmError(f"job {job}: {record}\n{slurm_cluster.diagnostics(log)}")
        return None

    record = slurm_cluster.wait_for(requeued_and_done, 240, f"job {job} to be requeued and complete", log=log)
    assert record["Restarts"] == "1" and record["ExitCode"] == "0:0", record
    text = log.read_text()
    assert "stopped by signal SIGUSR1" in text and "hsfm-slurm: preempted: requeueing" in text, text[-4000:]
    resumed = re.search(r"hsfm: resuming \S+ from step_(\d+) \(step (\d+) of (\d+)\)", text)
    assert resumed, text[-4000:]
    stop_step = int(resumed.group(2))
    assert signalled_after <= stop_step < steps and int(resumed.group(3)) == steps

    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_at_step"] == stop_step > 0
    assert summary["stopped_by"] == "max_steps" and summary["steps"] == steps
    assert summary["samples"] == steps * BATCH * NODES
    logged = [entry["step"] for entry in metrics(run) if "train/loss" in entry]
    assert sorted(logged) == list(range(1, steps + 1)), logged  # continued after the checkpoint, not restarted
    check_checkpoints(run, [steps - 20, steps - 10, steps])
