"""The few-shot results table of docs/results.md from `hsfm fewshot` output directories.

    python tools/fewshot_table.py runs/fewshot/*           # one row per directory holding a summary.json

Each row: target, backbone, adapter, readout, predictor, pseudo-labels, mixup DA, sources, seeds ("N of M" for an
unfinished job), OA / AA (%) and kappa as mean +- std over seeds, then the input-spectra baselines on the same
seeds' splits (logistic regression, nearest class mean, label propagation) and seconds per seed.
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
    spectra = [_pm(baselines[name], "oa") if name in baselines else "-"
               for name in ("spectra_linear", "spectra_prototypes", "spectra_propagation")]
    readout = summary.get("readout", "centre")
    predict = summary.get("predict", "prototype")
    adapter = "none (trains nothing)" if summary["trainable_parameters"] == 0 else summary["adapter"]["kind"]
    return (f"| {summary['target_name']} | {backbone} | {adapter} | {readout} | {predict} | "
            f"{pseudo} | {'on' if summary['mixup_da'] else 'off'} | {sources} | {seeds} | {_pm(summary, 'oa')} | "
            f"{_pm(summary, 'aa')} | {_pm(summary, 'kappa', 1.0, 3)} | {' | '.join(spectra)} | "
            f"{summary['seconds_per_seed']:.0f} |")


def main(paths: list[str]) -> None:
    print("| target | backbone | adapter | readout | predict | pseudo-labels | mixup DA | sources | seeds | OA % | AA % | "
          "kappa | spectra + logistic regression OA % | spectra, nearest class mean OA % | "
          "spectra, label propagation OA % | s / seed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        if (Path(path) / "summary.json").exists():
            print(row(Path(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
