"""The few-shot results table of docs/results.md from `hsfm fewshot` output directories.

    python tools/fewshot_table.py runs/fewshot/*           # one row per directory holding a summary.json

Each row: target, backbone, adapter, pseudo-labels, mixup DA, sources, seeds ("N of M" for an unfinished job),
OA / AA (%) and kappa as mean +- std over seeds, then the input-spectra baselines on the same seeds' splits
(logistic regression, nearest class mean) and seconds per seed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _pm(entry: dict, key: str, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * entry[f'{key}_mean']:.{digits}f} +- {scale * entry[f'{key}_std']:.{digits}f}"


def row(directory: Path) -> str:
    summary = json.loads((directory / "summary.json").read_text())
    seeds = summary["seeds"] if summary.get("complete", True) else f"{summary['seeds_done']} of {summary['seeds']}"
    backbone = "random init" if summary["backbone"].startswith("random") else "pretrained"
    pseudo = summary["mode"] if summary["pseudo_labelling"] else "off"
    sources = ", ".join(source["name"] for source in summary["sources"]) or "-"
    baselines = summary.get("baselines", {})
    linear = _pm(baselines["spectra_linear"], "oa") if "spectra_linear" in baselines else "-"
    prototypes = _pm(baselines["spectra_prototypes"], "oa") if "spectra_prototypes" in baselines else "-"
    return (f"| {summary['target_name']} | {backbone} | {summary['adapter']['kind']} | {pseudo} | "
            f"{'on' if summary['mixup_da'] else 'off'} | {sources} | {seeds} | {_pm(summary, 'oa')} | "
            f"{_pm(summary, 'aa')} | {_pm(summary, 'kappa', 1.0, 3)} | {linear} | {prototypes} | "
            f"{summary['seconds_per_seed']:.0f} |")


def main(paths: list[str]) -> None:
    print("| target | backbone | adapter | pseudo-labels | mixup DA | sources | seeds | OA % | AA % | kappa | "
          "spectra + logistic regression OA % | spectra, nearest class mean OA % | s / seed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        if (Path(path) / "summary.json").exists():
            print(row(Path(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
