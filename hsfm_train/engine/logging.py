"""Run logging: W&B (never fatal), a local ``metrics.jsonl`` / ``summary.json`` mirror, progress bars and
reconstruction figures for hyperspectral images."""
from __future__ import annotations

import json
import netrc
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from hsfm_train.io import write_atomic, write_text_atomic

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
    path.parent.mkdir(parents=True, exist_ok=True)
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

    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def _wandb_key_configured() -> bool:
    """True when W&B credentials exist in the environment or the .netrc file (read without network use)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        return bool(host) and netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _json_value(value: Any) -> Any:
    """Python scalar for one-element tensors and numpy values, so they serialise to JSON."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
        return value.item()
    return value


class RunLogger:
    """Logs a run to W&B and to ``run_dir`` (``metrics.jsonl``, ``summary.json``).

    W&B mode: ``mode`` if given, else ``$WANDB_MODE`` if set, else "online" when an API key is configured
    and "offline" otherwise; always "disabled" when ``enabled`` is False or on non-main processes, which
    log nothing at all. A W&B failure (at init or later) is warned about once and W&B is switched off; the
    local files keep being written. ``metrics.jsonl`` holds one ``{"step": ..., **metrics}`` object per
    :meth:`log` call (non-finite values are written as NaN/Infinity, which Python's json reads back).
    """

    def __init__(self, run_dir: str | os.PathLike, config: dict, project: str = "hsfm-train",
                 run_name: str | None = None, enabled: bool = True, is_main_process: bool = True,
                 mode: str | None = None, run_id: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.is_main_process = is_main_process
        self._summary: dict[str, Any] = {}
        self._finished = False
        self._wandb = None  # the wandb module, once a run is up
        self._run = None
        self._metrics_file = None
        if not is_main_process:
            self.mode = "disabled"
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if not enabled:
            self.mode = "disabled"
        else:
            self.mode = mode or os.environ.get("WANDB_MODE") or (
                "online" if _wandb_key_configured() else "offline")
        if self.mode != "disabled":
            self._start_wandb(project, run_name, config, run_id)

    def _start_wandb(self, project: str, run_name: str | None, config: dict, run_id: str | None) -> None:
        try:
            import wandb  # imported lazily: slow, and not needed when W&B is off

            # a stable id makes a restarted (resumed) job continue the same W&B run instead of starting another
            resume = {"id": run_id, "resume": "allow"} if run_id else {}
            self._run = wandb.init(project=project, name=run_name, config=config, dir=str(self.run_dir),
                                   mode=self.mode, **resume)
            self._wandb = wandb
        except Exception as error:  # noqa: BLE001 - logging must never stop training
            self._wandb_failed("init", error)

    def _wandb_failed(self, what: str, error: Exception) -> None:
        warnings.warn(f"W&B {what} failed ({type(error).__name__}: {error}); continuing without W&B, "
                      f"metrics are still written to {self.run_dir / 'metrics.jsonl'}", RuntimeWarning,
                      stacklevel=3)
        self._run = None
        self._wandb = None

    def _call_wandb(self, what: str, fn) -> None:
        if self._run is None:
            return
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - logging must never stop training
            self._wandb_failed(what, error)

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("RunLogger is already finished")

    @property
    def wandb_run(self):
        """The live ``wandb`` run, or None when W&B is off."""
        return self._run

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._check_open()
        if not self.is_main_process:
            return
        values = {key: _json_value(value) for key, value in metrics.items()}
        self._call_wandb("log", lambda: self._run.log(values, step=step))
        self._metrics_file.write(json.dumps({"step": step, **values}) + "\n")
        self._metrics_file.flush()

    def rewind(self, step: int) -> int:
        """Drop the ``metrics.jsonl`` lines logged after ``step`` (a resumed run logs those steps again) and any
        line torn by a kill mid-write; the file is rewritten atomically. Returns how many lines were dropped."""
        self._check_open()
        if not self.is_main_process:
            return 0
        path = self.run_dir / "metrics.jsonl"
        self._metrics_file.close()
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if entry_step <= step:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            write_text_atomic(path, "".join(kept))
        self._metrics_file = open(path, "a", encoding="utf-8")
        return dropped

    def log_image(self, key: str, path: str | os.PathLike, step: int) -> None:
        self._check_open()
        self._call_wandb("log_image", lambda: self._run.log({key: self._wandb.Image(str(path))}, step=step))

    def progress(self, total: int, initial: int = 0, desc: str | None = None, enabled: bool = True) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and self.is_main_process),
                    dynamic_ncols=True)

    def summary(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the run summary (W&B and ``summary.json``, rewritten atomically)."""
        self._check_open()
        if not self.is_main_process:
            return
        values = {key: _json_value(value) for key, value in values.items()}
        self._summary.update(values)
        self._call_wandb("summary", lambda: self._run.summary.update(values))
        text = json.dumps(self._summary, indent=2, sort_keys=True)
        write_text_atomic(self.run_dir / "summary.json", text)

    def finish(self, exit_code: int | None = None) -> None:
        """Close the local files and the W&B run; later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        if self._metrics_file is not None:
            self._metrics_file.close()
        self._call_wandb("finish", lambda: self._run.finish(exit_code=exit_code))
        self._run = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)
