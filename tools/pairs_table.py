"""The optical-SAR comparison table of docs/results.md from `hsfm eval-pairs` output directories.

    python tools/pairs_table.py runs/codemae-ablation/eval

A run is scored twice: ``<run>-whole`` (the held-out images, whole, with reconstruction) and ``<run>-tiles``
(their 64 px tiles, each a pair). Runs named ``<name>-s<seed>`` are one row per name: mean +- sample std over
the seeds found (one seed: the value alone). Each row: seeds; Recall@1 both ways on the tiles, then on the whole
images; Recall@5 on the tiles; the RankMe effective rank of the tile embeddings and tokens (optical / SAR); the
masked-reconstruction PSNR of each modality on whole images. Chance and the two copy baselines of
reconstruction (nearest visible pixel, visible mean) come first.
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "-"
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} +- {np.std(values, ddof=1):.{digits}f}"


def _summaries(root: Path) -> dict[str, dict[str, list[dict]]]:
    """name -> view ("whole" / "tiles") -> one summary per seed."""
    found: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(root.glob("*/summary.json")):
        match = re.fullmatch(r"(.+?)(?:-s\d+)?-(whole|tiles)", path.parent.name)
        if match:
            found[match.group(1)][match.group(2)].append(json.loads(path.read_text()))
    return found


def _psnr(summaries: list[dict], modality: str) -> list[float]:
    return [s["reconstruction"][modality]["model"]["psnr"] for s in summaries if s.get("reconstruction")]


def main(root: str, order: list[str] | None = None) -> None:
    found = _summaries(Path(root))
    names = [n for n in (order or []) if n in found] + sorted(set(found) - set(order or []))
    print("| run | seeds | tiles R@1 SAR->opt / opt->SAR % | whole R@1 SAR->opt / opt->SAR % | "
          "tiles R@5 SAR->opt / opt->SAR % | effective rank, tiles: images opt / SAR; tokens opt / SAR | "
          "PSNR dB opt / SAR (whole) |")
    print("|---|---|---|---|---|---|---|")
    any_views = next(iter(found.values()), {})
    tiles0 = (any_views.get("tiles") or [{}])[0]
    whole0 = (any_views.get("whole") or [{}])[0]
    if tiles0 and whole0:
        print(f"| chance ({tiles0['pairs']} tile pairs; {whole0['pairs']} image pairs) | - | "
              f"{_cell([tiles0['chance_r1']], digits=2)} | {_cell([whole0['chance_r1']])} | "
              f"{_cell([tiles0['chance_r5']], digits=2)} | - | - |")
    if whole0.get("reconstruction"):
        for baseline in ("nearest_visible", "visible_mean"):
            cells = " / ".join(f"{whole0['reconstruction'][m]['baselines'][baseline]['psnr']:.2f}"
                               for m in ("optical", "sar"))
            print(f"| {baseline.replace('_', ' ')} (a copy, no network) | - | - | - | - | - | {cells} |")
    for name in names:
        tiles, whole = found[name].get("tiles", []), found[name].get("whole", [])
        seeds = max(len(tiles), len(whole))

        def pair_cell(view: list[dict], key: str, digits: int = 1) -> str:
            return (f"{_cell([s[f'sar_to_optical_{key}'] for s in view], digits=digits)} / "
                    f"{_cell([s[f'optical_to_sar_{key}'] for s in view], digits=digits)}")

        rank = (f"{_cell([s['effective_rank_optical'] for s in tiles], 1.0)} / "
                f"{_cell([s['effective_rank_sar'] for s in tiles], 1.0)}; "
                f"{_cell([s['effective_rank_tokens_optical'] for s in tiles], 1.0)} / "
                f"{_cell([s['effective_rank_tokens_sar'] for s in tiles], 1.0)}") if tiles else "-"
        psnr = f"{_cell(_psnr(whole, 'optical'), 1.0, 2)} / {_cell(_psnr(whole, 'sar'), 1.0, 2)}"
        print(f"| {name} | {seeds} | {pair_cell(tiles, 'r1', 2) if tiles else '-'} | "
              f"{pair_cell(whole, 'r1') if whole else '-'} | {pair_cell(tiles, 'r5', 2) if tiles else '-'} | "
              f"{rank} | {psnr} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
