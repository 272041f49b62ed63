"""Sample augmentations for [B, H, W] tiles, applied consistently to every aligned array of a sample.

Geometric ops (flip, rotate, crop) move ``hsi``, ``pair``, ``valid``, ``labels`` and ``abundances``
together; radiometric ops (blur, brightness jitter, spectral noise) touch only the images. Spectral noise is
expressed in units of each band's standard deviation (from the shard index), so one setting suits any sensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from hsfm_train.errors import ConfigError

SPATIAL_KEYS = ("hsi", "pair", "valid", "labels", "abundances")
IMAGE_KEYS = ("hsi", "pair")


@dataclass
class AugmentConfig:
    enabled: bool = False
    hflip: float = 0.5  # probabilities
    vflip: float = 0.5
    rotate90: float = 0.5
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.3, 1.5)  # pixels
    jitter: float = 0.0
    brightness: float = 0.1  # multiplicative factor drawn from 1 +- brightness
    spectral_noise: float = 0.0
    spectral_noise_std: float = 0.02  # fraction of each band's std

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip", "rotate90", "blur", "jitter", "spectral_noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{name} is a probability in [0, 1], got {value}")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            raise ConfigError(f"augment.blur_sigma must be 0 < low <= high, got {self.blur_sigma}")
        if not 0 <= self.brightness < 1 or self.spectral_noise_std < 0:
            raise ConfigError("augment.brightness must be in [0, 1) and spectral_noise_std >= 0")


def crop(sample: dict[str, Any], size: int, rng: np.random.Generator | None) -> None:
    """Crop every spatial array to size x size: at a random origin with ``rng``, else centred."""
    height, width = sample["hsi"].shape[1:]
    if size > min(height, width):
        raise ConfigError(f"crop_size {size} is larger than the tile {height}x{width}")
    if rng is None:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    for key in SPATIAL_KEYS:
        if key in sample:
            sample[key] = sample[key][..., top : top + size, left : left + size]


def augment(sample: dict[str, Any], config: AugmentConfig, rng: np.random.Generator, band_std: np.ndarray) -> None:
    """Augment ``sample`` in place (arrays [.., H, W]); ``band_std`` [B] scales the spectral noise."""
    if rng.random() < config.hflip:
        _apply_spatial(sample, lambda a: a[..., :, ::-1])
    if rng.random() < config.vflip:
        _apply_spatial(sample, lambda a: a[..., ::-1, :])
    if rng.random() < config.rotate90:
        turns = int(rng.integers(1, 4))
        _apply_spatial(sample, lambda a: np.rot90(a, turns, axes=(-2, -1)))
    if rng.random() < config.blur:
        sigma = float(rng.uniform(*config.blur_sigma))
        for key in IMAGE_KEYS:
            if key in sample:
                sample[key] = gaussian_filter(sample[key], sigma=(0, sigma, sigma), mode="reflect")
    if rng.random() < config.jitter:
        factor = float(rng.uniform(1 - config.brightness, 1 + config.brightness))
        sample["hsi"] = sample["hsi"] * np.float32(factor)
    if rng.random() < config.spectral_noise:
        noise = rng.standard_normal(sample["hsi"].shape, dtype=np.float32)
        sample["hsi"] = sample["hsi"] + noise * (config.spectral_noise_std * band_std)[:, None, None].astype(np.float32)
    for key in SPATIAL_KEYS:
        if key in sample:
            sample[key] = np.ascontiguousarray(sample[key])


def _apply_spatial(sample: dict[str, Any], operation: Any) -> None:
    for key in SPATIAL_KEYS:
        if key in sample:
            sample[key] = operation(sample[key])
