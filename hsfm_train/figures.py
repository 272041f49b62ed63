"""PNG figures of downstream results. Each function draws on a bare matplotlib ``Figure`` (no pyplot: nothing
is registered globally, so nothing leaks between calls or threads) and writes its PNG atomically (a temporary
name beside the target, then a rename), so a reader never sees half a file. Each returns the path written."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

ANNOTATE_MAX_CLASSES = 20  # counts are written in the cells of confusion matrices up to this size
LEGEND_MAX_CLASSES = 30
UNLABELLED_COLOUR = (0.0, 0.0, 0.0, 1.0)


def _save(fig: Figure, path: Path) -> Path:
    from hsfm_train.io import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda temporary: fig.savefig(temporary, format="png", dpi=100))
    return path


def confusion_matrix_figure(path: str | os.PathLike, confusion: Any, class_names: Sequence[str],
                            title: str = "") -> Path:
    """The confusion matrix (rows = true class, columns = predicted) coloured by the row-normalised fraction
    (each true class's recall on the diagonal); the counts are written in the cells when there are at most
    20 classes. A class without test pixels shows an empty row."""
    counts = np.asarray(confusion, dtype=np.int64)
    n = counts.shape[0]
    if counts.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"need a square confusion matrix and one name per class; got {counts.shape} and "
                         f"{len(class_names)} names")
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)

    side = min(4 + 0.45 * n, 16)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ticks = np.arange(n)
    ax.set_xticks(ticks, [str(c) for c in class_names], rotation=90 if n > 8 else 0)
    ax.set_yticks(ticks, [str(c) for c in class_names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= ANNOTATE_MAX_CLASSES:
        size = "small" if n <= 10 else "x-small"
        for row in range(n):
            for col in range(n):
                if counts[row, col]:
                    colour = "white" if fractions[row, col] > 0.5 else "black"
                    ax.text(col, row, str(counts[row, col]), ha="center", va="center", color=colour, fontsize=size)
    if title:
        ax.set_title(title, fontsize="medium")
    return _save(fig, Path(path))


def class_colormap(max_label: int) -> ListedColormap:
    """Label id -> colour, fixed for a given id (the same in every panel and figure): 0 black, then the
    tab20, tab20b and tab20c colours in turn."""
    from matplotlib import colormaps

    palette = [colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    colours = [UNLABELLED_COLOUR] + [palette[(label - 1) % len(palette)] for label in range(1, max_label + 1)]
    return ListedColormap(colours)


def classification_map_figure(path: str | os.PathLike, predicted: Any, truth: Any, title: str = "") -> Path:
    """The predicted label map beside the ground truth ([H, W] integer maps, 0 = unlabelled, shown black), in
    one categorical colormap shared by both panels, with a legend of the classes present."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.ndim != 2 or predicted.shape != truth.shape:
        raise ValueError(f"need predicted and truth label maps [H, W] of one shape; got {predicted.shape} and "
                         f"{truth.shape}")
    if min(predicted.min(initial=0), truth.min(initial=0)) < 0:
        raise ValueError("label maps must be >= 0 (0 = unlabelled)")
    max_label = int(max(predicted.max(initial=0), truth.max(initial=0), 1))
    cmap = class_colormap(max_label)

    height, width = truth.shape
    panel = min(6.0, max(3.0, 6.0 * width / max(height, width)))
    fig = Figure(figsize=(2 * panel + 2.2, panel * height / width + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, labels, name in zip(axes, (predicted, truth), ("predicted", "ground truth")):
        # vmin/vmax over the colormap's full range: a label id always lands on its own colour
        ax.imshow(labels, cmap=cmap, vmin=-0.5, vmax=max_label + 0.5, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    present = [int(c) for c in np.union1d(np.unique(predicted), np.unique(truth)) if c > 0]
    if len(present) <= LEGEND_MAX_CLASSES:
        handles = [Patch(color=cmap(label), label=str(label)) for label in present]
        fig.legend(handles=handles, loc="outside right center", title="class", fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, Path(path))
