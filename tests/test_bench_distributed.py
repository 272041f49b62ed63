"""benchmarks/bench_distributed.py --quick: every section runs on the tiny settings and reports every figure (the
times themselves are not checked: the machine is shared)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_run_reports_every_section(demo_dir, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "benchmarks/bench_distributed.py", "--quick", "--demo-dir", str(demo_dir),
                             "--scratch", str(tmp_path / "scratch"), "--json", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "per-rank memory of one training step" in result.stdout
    report = json.loads(out.read_text())

    engines = report["memory"]["engines"]
    assert set(engines) == {"ddp", "zero2", "zero3", "fsdp2"}
    for name, row in engines.items():
        assert row["step_applied"], name
        assert row["params_mb"] > 0 and row["grads_mb"] > 0 and row["optim_mb"] > 0, name
        assert row["total_mb"] >= row["state_mb"] > 0 and row["peak_rss_mb"] > 0, name
        assert "torch.distributed.run" in row["command"], name
    ddp, zero3, fsdp2 = engines["ddp"], engines["zero3"], engines["fsdp2"]
    assert ddp["ratio_to_ddp"] == 1.0 and ddp["master_mb"] == 0
    # sharded engines hold about half the parameters of DDP on each of the 2 ranks (tensor bytes, not times)
    assert zero3["params_mb"] < 0.6 * ddp["params_mb"] and fsdp2["params_mb"] < 0.6 * ddp["params_mb"]
    assert zero3["master_mb"] > 0  # DeepSpeed keeps its fp32 partition even in fp32 training

    cases = report["scaling"]["cases"]
    assert cases["1 process"]["samples_per_s"] > 0 and cases["2 processes"]["samples_per_s"] > 0
    assert cases["2 processes"]["samples_per_step"] == 2 * cases["1 process"]["samples_per_step"]
    assert "--nproc_per_node 2" in cases["2 processes"]["command"]

    preemption = report["preemption"]
    trial = preemption["trials"][0]
    assert trial["stopped_by"] == "signal SIGUSR1" and trial["checkpoint"] is not None
    assert preemption["signal_to_manifest_s"] is not None and preemption["signal_to_latest_s"] is not None
    assert preemption["signal_to_latest_s"] >= preemption["signal_to_manifest_s"]
    assert preemption["bare_torchrun"] is None  # the launcher check runs in the full benchmark only
    assert "hsfm_train.cli pretrain" in preemption["command"]
