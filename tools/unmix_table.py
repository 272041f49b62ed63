"""The unmixing results table of docs/results.md from `hsfm unmix` output directories.

    python tools/unmix_table.py runs/unmix-samson-*           # one row per directory holding a summary.json

An interrupted job's partial summary gives "N of M" runs. Each row: scene, method (+ the overrides that differ from the defaults of its config section), runs, mean SAD
+- std (rad), abundance RMSE +- std, reconstruction RMSE (plain / with each pixel's least-squares brightness, where
the runs recorded it), seconds per run.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path


def _differences(summary: dict) -> str:
    from hsfm_train.stages.unmix import UnmixConfig

    defaults = asdict(UnmixConfig(method=summary["method"]))
    section = {"nmf": "nmf", "cnnaeu": "cnnaeu", "cnnaeu-contrastive": "contrastive", "mamba-semi": "mamba",
               "lsmm-head": "lsmm", "labelled-als": "als"}.get(summary["method"])
    if section is None:
        return ""
    used, base = summary["config"][section], defaults[section]
    changed = [f"{section}.{key}={value}" for key, value in used.items() if base.get(key) != value]
    if summary["method"] == "cnnaeu-contrastive":
        changed += [f"cnnaeu.{key}={value}" for key, value in summary["config"]["cnnaeu"].items()
                    if defaults["cnnaeu"].get(key) != value]
    return " ".join(changed)


def row(directory: Path) -> str:
    summary = json.loads((directory / "summary.json").read_text())
    settings = _differences(summary)
    runs = summary["runs"] if summary.get("complete", True) else f"{summary['runs']} of {summary['config']['runs']}"
    method = f"`{summary['method']}`" + (f" `{settings}`" if settings else "")
    if not summary.get("scored"):
        return f"| {summary['scene_name']} | {method} | {runs} | (no ground truth) | | | |"
    sad = f"{summary['sad_mean']:.4f} +- {summary['sad_std']:.4f}"
    rmse = (f"{summary['abundance_rmse_mean']:.4f} +- {summary['abundance_rmse_std']:.4f}"
            if "abundance_rmse_mean" in summary else "-")
    reconstruction = f"{summary['reconstruction_rmse_mean']:.4f}"
    if "reconstruction_rmse_scaled_mean" in summary:
        reconstruction += f" / {summary['reconstruction_rmse_scaled_mean']:.4f}"
    return (f"| {summary['scene_name']} | {method} | {runs} | {sad} | {rmse} | {reconstruction} | "
            f"{summary['seconds_per_run']:.2f} |")


def main(paths: list[str]) -> None:
    print("| scene | method | runs | mean SAD (rad) | abundance RMSE | reconstruction RMSE | s / run |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        directory = Path(path)
        if (directory / "summary.json").exists():
            print(row(directory))


if __name__ == "__main__":
    main(sys.argv[1:])
