"""benchmarks/gpu_suite.sh is what a developer lent a GPU runs as is; its CPU-safe parts run here, so the script
cannot rot between GPU sessions (in its smallest form, HSFM_SUITE_SMOKE=1: every step, fewer timed steps)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT, shared_file


def test_gpu_suite_runs_its_cpu_safe_parts(tmp_path):
    scene = shared_file("classification/indian_pines/indian_pines.npz")
    env = {**os.environ, "PYTHON": sys.executable, "HSFM_PROBE_SCENE": str(scene), "WANDB_MODE": "disabled",
           "CUDA_VISIBLE_DEVICES": "", "HSFM_SUITE_SMOKE": "1", "OMP_NUM_THREADS": "1"}  # no thread spinning
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_suite.sh"), str(tmp_path)], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "device: none (CPU-safe parts only)" in (tmp_path / "device.txt").read_text()
    for name in ("bench_kernels.json", "bench_pretrain.json", "bench_pretrain_ckpt.json", "probe_summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    # the CPU form of the large-model step: the tiny MAE without and with activation checkpointing, and the
    # SDPA backend report of its attention calls
    ckpt = json.loads((tmp_path / "bench_pretrain_ckpt.json").read_text())
    rows = ckpt["objective"]
    assert set(rows) == {"mae", "mae+ckpt"}
    assert [rows["mae"]["activation_checkpointing"], rows["mae+ckpt"]["activation_checkpointing"]] == [False, True]
    assert rows["mae+ckpt"]["saved_MB"] < rows["mae"]["saved_MB"]
    assert rows["mae+ckpt"]["GFLOP_per_step"] == rows["mae"]["GFLOP_per_step"] > 0  # model FLOPs, not recomputed
    assert set(ckpt["sdpa"]) == {"encoder", "decoder"} and ckpt["sdpa"]["encoder"]["math"] == "ok"
    summary = json.loads((tmp_path / "probe_summary.json").read_text())
    assert set(summary["results"]) == {"backbone", "spectra"}
    assert not any(Path(tmp_path).glob("*/*/*"))  # the device tool brings back files at most two folders down
