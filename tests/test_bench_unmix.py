"""benchmarks/bench_unmix.py --quick: both sections run at tiny sizes and report every figure (the times themselves
are not checked: the machine is shared)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import shared_file

REPO = Path(__file__).resolve().parent.parent


def test_quick_run_reports_both_sections(tmp_path):
    scene = shared_file("unmixing/samson/samson.npz")
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "benchmarks/bench_unmix.py", "--quick", "--scene", str(scene),
                             "--methods", "vca-fcls,mamba-semi,lsmm-head,no-such-method", "--json", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "### methods" in result.stdout and "### mamba-scaling" in result.stdout
    report = json.loads(out.read_text())

    rows = report["methods"]["rows"]
    assert report["methods"]["shape"] == [30, 30]
    for name in ("vca-fcls", "mamba-semi"):
        assert rows[name]["seconds"] > 0 and 0 <= rows[name]["sad_mean"] < 1.6, name
        assert rows[name]["abundance_rmse"] >= 0 and "hsfm_train.cli unmix" in rows[name]["command"], name
    from hsfm_train.unmixing.mamba_semi import MambaSemiConfig

    scaled = max(1, round(MambaSemiConfig().epochs * 0.01))  # --quick scales every epochs setting by 0.01
    assert rows["mamba-semi"]["labelled_pixels"] == 10 and f"mamba.epochs={scaled}" in rows["mamba-semi"]["command"]
    assert rows["vca-fcls"]["vs_first"] == 1.0
    assert "--backbone" in rows["lsmm-head"]["skipped"]
    assert "not one of the registered methods" in rows["no-such-method"]["skipped"]

    scaling = report["mamba-scaling"]["rows"]
    assert [row["pixels"] for row in scaling] == [64, 256]
    assert [row["pixel_ratio"] for row in scaling] == [1, 4]
    for row in scaling:
        assert row["step_s"] > 0 and row["us_per_pixel"] > 0 and row["peak_mb"] is not None
        assert "--worker" in row["command"] and f"--size {row['size']}" in row["command"]
