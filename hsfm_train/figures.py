"""PNG figures: masked reconstructions of hyperspectral tiles, and downstream results. Each function draws on a bare matplotlib ``Figure`` (no pyplot: nothing
is registered globally, so nothing leaks between calls or threads) and writes its PNG atomically (a temporary
name beside the target, then a rename), so a reader never sees half a file. Each returns the path written."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from hsfm_train.io import write_atomic

ANNOTATE_MAX_CLASSES = 20  # counts are written in the cells of confusion matrices up to this size
LEGEND_MAX_CLASSES = 30
UNLABELLED_COLOUR = (0.0, 0.0, 0.0, 1.0)


def _save(fig: Figure, path: Path) -> Path:
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


# Target wavelengths (nm) of the red, green and blue display channels.
_RGB_NM = (640.0, 550.0, 470.0)
# Band-index quantiles used when wavelengths cannot pick visible bands (longest wavelength shown as red).
_FALLBACK_QUANTILES = (5 / 6, 1 / 2, 1 / 6)
_STRETCH_PERCENTILES = (2.0, 98.0)
_MASK_GREY = 128


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64)
    return np.asarray(x, dtype=np.float64)


def _rgb_bands(wavelengths: np.ndarray | None, n_bands: int) -> list[int]:
    """Indices of the bands shown as red, green and blue."""
    if wavelengths is not None:
        finite = np.isfinite(wavelengths)
        # Only pick by wavelength when known bands span the visible range; otherwise "nearest to 640 nm" on a
        # SWIR-only sensor would show three nearly identical bands.
        if finite.any() and wavelengths[finite].min() <= 500 and wavelengths[finite].max() >= 600:
            distance = np.where(finite, wavelengths, np.inf)
            return [int(np.argmin(np.abs(distance - nm))) for nm in _RGB_NM]
    if n_bands == 3:
        return [0, 1, 2]
    return [int(q * (n_bands - 1) + 0.5) for q in _FALLBACK_QUANTILES]


def false_colour(image: Any, wavelengths: Any = None, reference: Any = None) -> np.ndarray:
    """``[B, H, W]`` image -> ``[H, W, 3]`` uint8 display image.

    Bands nearest 640/550/470 nm when the (finite) wavelengths cover the visible range; otherwise 3-band
    images are shown as is, 1-band images in grey and others with bands at 5/6, 1/2 and 1/6 of the band
    index. Each channel is stretched between its 2nd and 98th percentile, taken from ``reference`` (same band
    layout) when given so an input and its reconstruction are displayed identically. NaN pixels are black.
    """
    img = _numpy(image)
    if img.ndim != 3:
        raise ValueError(f"false_colour expects a [B, H, W] image; got shape {img.shape}")
    wl = None if wavelengths is None else _numpy(wavelengths).reshape(-1)
    if wl is not None and len(wl) != img.shape[0]:
        raise ValueError(f"{len(wl)} wavelengths for an image of {img.shape[0]} bands")
    bands = _rgb_bands(wl, img.shape[0])
    rgb = img[bands]
    ref = rgb if reference is None else _numpy(reference)[bands]
    with warnings.catch_warnings():  # an all-NaN reference band is legitimate: it just displays black
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(ref.reshape(3, -1), _STRETCH_PERCENTILES, axis=1)
    lo, hi = np.nan_to_num(lo)[:, None, None], np.nan_to_num(hi)[:, None, None]
    scaled = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    return np.round(np.nan_to_num(scaled) * 255).astype(np.uint8).transpose(1, 2, 0)


def _spread_pixels(mask: np.ndarray, count: int) -> np.ndarray:
    """``count`` (row, col) pixels evenly spaced, in raster order, over the True pixels of ``mask``
    (over all pixels when none is True)."""
    candidates = np.argwhere(mask) if mask.any() else np.argwhere(np.ones_like(mask))
    count = min(count, len(candidates))
    picks = ((np.arange(count) + 0.5) * len(candidates) / count).astype(int)
    return candidates[picks]


def reconstruction_figure(path: str | os.PathLike, image: Any, masked_image_mask: Any, reconstruction: Any,
                          wavelengths: Any = None, title: str = "", pixels: int = 4) -> Path:
    """Write a PNG with the input, the masked input (masked pixels grey), the reconstruction (same stretch as
    the input) and the input vs reconstructed spectra of ``pixels`` masked pixels. Returns the path."""
    path = Path(path)
    img, rec = _numpy(image), _numpy(reconstruction)
    mask = _numpy(masked_image_mask).astype(bool)
    if img.ndim != 3 or rec.shape != img.shape or mask.shape != img.shape[1:]:
        raise ValueError(f"need image and reconstruction [B, H, W] and mask [H, W]; got {img.shape}, "
                         f"{rec.shape} and {mask.shape}")
    wl = None if wavelengths is None else _numpy(wavelengths).reshape(-1)

    shown = false_colour(img, wl)
    masked = shown.copy()
    masked[mask] = _MASK_GREY
    points = _spread_pixels(mask, pixels)
    use_nm = wl is not None and bool(np.isfinite(wl).all())
    x = wl if use_nm else np.arange(img.shape[0])

    # A bare Figure (no pyplot) is never registered globally, so nothing leaks between calls.
    fig = Figure(figsize=(16, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    for ax, panel, name in zip(axes, (shown, masked, false_colour(rec, wl, reference=img)),
                               ("input", f"masked input ({mask.mean():.0%})", "reconstruction")):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    spectra = axes[3]
    marker = "." if len(x) <= 20 else None  # dots keep 1-band and multispectral spectra visible
    for i, (row, col) in enumerate(points):
        colour = f"C{i}"
        axes[1].plot(col, row, "o", mfc="none", mec=colour, ms=8)
        spectra.plot(x, img[:, row, col], color=colour, marker=marker, label=f"input ({row}, {col})")
        spectra.plot(x, rec[:, row, col], color=colour, marker=marker, linestyle="--", label="reconstruction")
    spectra.set_xlabel("wavelength (nm)" if use_nm else "band index")
    spectra.set_ylabel("value")
    spectra.set_title("spectra of masked pixels" if mask.any() else "spectra (no masked pixel)")
    if len(points):
        spectra.legend(fontsize="x-small", ncols=2)
    if title:
        fig.suptitle(title)

    return _save(fig, path)


def endmembers_figure(path: str | os.PathLike, estimated: Any, truth: Any | None, wavelengths: Any = None,
                      names: Sequence[str] | None = None, title: str = "") -> Path:
    """One panel per endmember: the estimated spectrum beside its matched ground truth ([R, B] both, already in
    matched order). Each curve is scaled to its own maximum: SAD compares shapes, and papers' ground truths are often
    peak-normalised."""
    estimated = np.asarray(estimated, np.float64)
    count, bands = estimated.shape
    x = np.asarray(wavelengths, np.float64) if wavelengths is not None else np.arange(bands)
    fig = Figure(figsize=(3.2 * count, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, count))
    for index, ax in enumerate(axes):
        peak = lambda values: values / max(float(np.abs(values).max()), 1e-12)  # noqa: E731
        ax.plot(x, peak(estimated[index]), label="estimated")
        if truth is not None:
            ax.plot(x, peak(np.asarray(truth, np.float64)[index]), "--", label="ground truth")
        ax.set_title(names[index] if names is not None and index < len(names) else f"endmember {index + 1}",
                     fontsize="small")
        ax.set_xlabel("wavelength (nm)" if wavelengths is not None else "band")
    axes[0].legend(fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, Path(path))


def abundance_maps_figure(path: str | os.PathLike, estimated: Any, truth: Any | None,
                          names: Sequence[str] | None = None, title: str = "") -> Path:
    """Abundance maps [H, W, R] in [0, 1]: estimated (top row) over ground truth (bottom row), matched order."""
    estimated = np.asarray(estimated, np.float64)
    count = estimated.shape[-1]
    rows = 1 if truth is None else 2
    fig = Figure(figsize=(2.4 * count + 0.8, 2.4 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, count, squeeze=False))
    image = None
    for column in range(count):
        for row, maps in enumerate([estimated] + ([] if truth is None else [np.asarray(truth, np.float64)])):
            ax = axes[row, column]
            image = ax.imshow(maps[..., column], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_axis_off()
            label = names[column] if names is not None and column < len(names) else f"endmember {column + 1}"
            ax.set_title(f"{label}{'' if row == 0 else ' (truth)'}", fontsize="small")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, Path(path))


def singular_value_figure(path: str | os.PathLike, spectra: dict[str, Any], title: str = "") -> Path:
    """Normalised singular values (each spectrum sums to 1), largest first, on a log scale: a fast decay is a
    collapsed representation, a flat tail a well-spread one. ``spectra``: label -> values."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for label, values in spectra.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[values > 0]
        ax.semilogy(np.arange(1, len(values) + 1), values, label=label)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("normalised singular value")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))
