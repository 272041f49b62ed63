"""`hsfm shards build|inspect` through the command line, on real scenes and a synthetic corpus."""
from __future__ import annotations

import json
import subprocess
import sys

from hsfm_train.cli import main
from hsfm_train.data.shards import load_index, verify_shards
from tests.conftest import shared_file


def test_build_real_and_synthetic_scenes_index_counts_match(tmp_path, capsys):
    manifest = tmp_path / "scenes.yaml"
    manifest.write_text(
        f"- path: {shared_file('unmixing/samson/samson_1.mat')}\n"
        f"  ground_truth: {shared_file('unmixing/samson/end3.mat')}\n"
        f"- path: {shared_file('classification/salinasA/salinasA.npz')}\n"
        f"  bands: corrected\n"
    )
    out = tmp_path / "shards"
    assert main(["shards", "build", "--manifest", str(manifest), "--synthetic", "5", "--synthetic-size", "48",
                 "--synthetic-grid", "samson156", "--out", str(out), "--tile-size", "24",
                 "--max-samples-per-shard", "10", "--quiet"]) == 0
    index = load_index(out)
    # Samson 95x95 -> origins 0,24,48,71 (16 tiles); Salinas-A 83x86 -> 4x4 (16); synthetic 48x48 -> 2x2 each
    assert {s["name"].split("_")[0]: s["tiles"] for s in index["scenes"]} == {"samson": 16, "salinasA": 16, "synthetic": 4}
    assert index["total_samples"] == 16 + 16 + 5 * 4 == sum(r["samples"] for r in index["shards"])
    per_band_set = {name: info["samples"] for name, info in index["band_sets"].items()}
    assert sorted(per_band_set.values()) == [16, 16, 20]
    assert sum(sum(r["band_sets"].values()) for r in index["shards"]) == index["total_samples"]
    assert verify_shards(index)["problems"] == []
    assert "52 samples in 6 shards" in capsys.readouterr().out

    assert main(["shards", "inspect", str(out), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["samples"] == 52 and report["verify"]["problems"] == []


def test_console_script_reports_bad_input_in_one_line(tmp_path):
    def hsfm(*args):
        return subprocess.run([sys.executable, "-m", "hsfm_train.cli", *args], capture_output=True, text=True)

    missing = hsfm("shards", "build", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "nope.npz" in missing.stderr
    unknown = tmp_path / "scene.xyz"
    unknown.write_text("hello")
    wrong = hsfm("shards", "build", str(unknown), "--out", str(tmp_path / "o"), "--quiet")
    assert wrong.returncode == 2 and "scene.xyz" in wrong.stderr and ".npz" in wrong.stderr
    assert not (tmp_path / "o" / "index.json").exists()
    no_index = hsfm("shards", "inspect", str(tmp_path))
    assert no_index.returncode == 2 and "no shard index" in no_index.stderr
    bad_flag = hsfm("shards", "build", "--out", str(tmp_path), "--tile", "x")
    assert bad_flag.returncode == 2 and "--tile" in bad_flag.stderr
