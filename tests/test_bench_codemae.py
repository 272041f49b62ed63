"""benchmarks/bench_codemae.py at tiny sizes: every case reports, and the pairwise conditioned scoring's saved
activations grow faster with the batch than own-partner scoring's (N^2 poolings against N; the times themselves
are not checked: the machine is shared)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_pairwise_scoring_memory_grows_faster_with_the_batch(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "benchmarks/bench_codemae.py", "--batches", "2,8", "--tile", "16",
                             "--repeats", "1", "--warmup", "1", "--json", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {(r["batch"], r["case"]): r for r in json.loads(out.read_text())["results"]}
    assert len(rows) == 10 and all(r["ms_per_step"] > 0 and r["saved_mb"] > 0 for r in rows.values())
    growth = {case: rows[(8, case)]["saved_mb"] / rows[(2, case)]["saved_mb"]
              for case in ("conditioned, own partner", "conditioned, pairwise")}
    assert growth["conditioned, pairwise"] > growth["conditioned, own partner"] * 1.1, growth
