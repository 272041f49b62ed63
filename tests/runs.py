"""Running `hsfm` in a fresh interpreter, as a user would, with a micro model on the demo shards (seconds per run
on 2 cores); shared by the pretraining and reliability tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT

MICRO = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_depth=1", "model.decoder_num_heads=2", "model.spectral_channels=8", "model.spectral_basis=8",
         "data.train.batch_size=4", "eval.max_batches=1", "data.eval.batch_size=8", "trainer.wandb=false",
         "trainer.progress=false", "trainer.log_every=1", "trainer.figure_every=0", "trainer.optim.warmup_steps=2"]


def overrides(demo_dir: Path, output: Path, *extra: str) -> list[str]:
    return [*MICRO, f"data.demo_dir={demo_dir}", f"output_dir={output}", *extra]


def hsfm_script(prelude: str = "") -> list[str]:
    """The interpreter command for `hsfm`; ``prelude`` runs first (to patch in a crash)."""
    script = prelude + "\nimport sys\nfrom hsfm_train.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", script]


# One intra-op thread: the micro model gains nothing from more, and on a busy machine OpenMP's spinning threads
# make a run several times slower. Not the default of run(): the thread count changes float rounding, and some
# runs are compared with numbers recorded at torch's default (tests/test_pretrain_reference.py).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "HSFM_DEBUG": "", **(extra or {})}


def run(args: list[str], cwd: Path, prelude: str = "", timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`hsfm ARGS` in a fresh interpreter, to completion (``env``: variables to set on top of run_env's)."""
    return subprocess.run([*hsfm_script(prelude), *args], cwd=cwd, env=run_env(env), capture_output=True, text=True,
                          timeout=timeout)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(expected_dir: Path, actual_dir: Path) -> None:
    expected, actual = weights(expected_dir), weights(actual_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {entry["step"]: entry["train/loss"] for entry in metrics(run_dir) if "train/loss" in entry}


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("hsfm: error:")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distributed_env() -> dict[str, str]:
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    return {**run_env(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(cache), "PYTHONPATH": str(REPO_ROOT)}


def torchrun(processes: int, script: list[str], tmp_path: Path, timeout: float = 240
             ) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *script]
    return subprocess.run(command, cwd=tmp_path, env=distributed_env(), capture_output=True, text=True,
                          timeout=timeout)
