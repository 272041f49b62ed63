"""Per-band input normalisation that travels with a backbone.

A backbone expects each band as (x - mean) / std. For a band set it was trained on, the right statistics are
the training ones (an export's ``normalization``: per band set its wavelengths, mean and std). For a band set it
never saw there are none, and statistics of the user's own data stand in: said in a warning, never silently.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from hsfm_train.errors import ConfigError

WAVELENGTH_TOLERANCE_NM = 0.5  # two band sets are the same if every centre agrees within this
# ... or within this fraction of itself: exports keep centres as float32, which moves a C-band SAR "centre"
# (5.5e7 nm) by a few nm
WAVELENGTH_RELATIVE_TOLERANCE = 1e-6


class Normalizer:
    """``normalizer(hsi, wavelengths)`` normalises ``hsi`` ([N, B, H, W] tensor, or a [H, W, B] array: the
    band axis is found from the wavelength count) with the statistics of the matching known band set; for a new
    band set, with statistics of ``hsi`` itself (per band, over all pixels) and a warning. ``statistics_for``
    tells which was used."""

    def __init__(self, band_sets: dict[str, dict[str, Any]]):
        self.band_sets = {name: info for name, info in band_sets.items()
                          if info.get("wavelengths_nm") is not None and info.get("mean") is not None}

    def match(self, wavelengths: Any) -> str | None:
        """The known band set with these band centres (same count, each within 0.5 nm or a millionth of
        itself), or None."""
        wavelengths = np.asarray(wavelengths, dtype=np.float64).reshape(-1)
        for name, info in self.band_sets.items():
            known = np.asarray(info["wavelengths_nm"], dtype=np.float64)
            if known.shape == wavelengths.shape and np.allclose(known, wavelengths, rtol=WAVELENGTH_RELATIVE_TOLERANCE,
                                                                atol=WAVELENGTH_TOLERANCE_NM):
                return name
        return None

    def statistics_for(self, wavelengths: Any, data: Any = None, band_axis: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, str]:
        """(mean, std, source): the training statistics of the matching band set, else those of ``data``."""
        name = self.match(wavelengths)
        if name is not None:
            info = self.band_sets[name]
            std = np.maximum(np.asarray(info["std"], dtype=np.float32), 1e-6)
            return np.asarray(info["mean"], dtype=np.float32), std, f"training statistics of band set {name}"
        count = np.asarray(wavelengths).size
        if data is None:
            raise ConfigError(f"a band set of {count} bands the model was not trained on "
                              f"(known: {sorted(self.band_sets) or 'none'}); pass data to take its statistics from")
        values = data.detach().cpu().double().numpy() if torch.is_tensor(data) else np.asarray(data, np.float64)
        axis = band_axis if band_axis is not None else _band_axis(values.shape, count)
        other = tuple(i for i in range(values.ndim) if i != axis)
        mean, std = values.mean(axis=other), values.std(axis=other)
        warnings.warn(f"the model was not trained on this band set ({count} bands, "
                      f"{float(np.min(wavelengths)):.0f}-{float(np.max(wavelengths)):.0f} nm); normalising with the "
                      f"data's own per-band statistics", UserWarning, stacklevel=3)
        return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32), "the data's own statistics"

    def __call__(self, hsi: Any, wavelengths: Any, band_axis: int | None = None) -> Any:
        count = np.asarray(wavelengths).size
        axis = band_axis if band_axis is not None else _band_axis(tuple(hsi.shape), count)
        mean, std, _ = self.statistics_for(wavelengths, hsi, band_axis=axis)
        shape = [1] * hsi.ndim
        shape[axis] = count
        if torch.is_tensor(hsi):
            mean_t = torch.as_tensor(mean, dtype=hsi.dtype, device=hsi.device).view(shape)
            std_t = torch.as_tensor(std, dtype=hsi.dtype, device=hsi.device).view(shape)
            return (hsi - mean_t) / std_t
        return ((np.asarray(hsi) - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)


def _band_axis(shape: tuple[int, ...], bands: int) -> int:
    """Axis 1 of [N, B, H, W], axis 0 of [B, H, W], the last of [H, W, B]."""
    candidates = {4: (1,), 3: (0, 2), 2: (1,)}.get(len(shape), ())
    for axis in candidates:
        if shape[axis] == bands:
            return axis
    raise ConfigError(f"{bands} wavelengths for data of shape {list(shape)}: expected [N, B, H, W], [B, H, W] "
                      "or [H, W, B]")
