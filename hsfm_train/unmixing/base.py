"""What every unmixing method sees and returns, and how it is registered.

A method is a function ``fit(inputs, seed, config) -> (endmembers [R, B], abundances [P, R])`` where ``inputs`` is
an :class:`UnmixingInput` (the pixels, the image shape, R, the band centres and, for semi-supervised methods
only, a few labelled pixels) and ``config`` the stage's whole ``UnmixConfig`` (each method reads its own section).
The ground truth never reaches a method: the stage keeps it for scoring and hands over only the labelled pixels a
method asks for (``UnmixingMethod.labelled_pixels``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class LabelledPixels:
    """K pixels whose abundances are given: ``indices`` [K] into the flattened image, ``abundances`` [K, R]."""
    indices: np.ndarray
    abundances: np.ndarray


@dataclass
class UnmixingInput:
    pixels: np.ndarray  # [P, B] float32, row-major over the image (P = H * W)
    shape: tuple[int, int]  # (H, W)
    count: int  # R
    wavelengths_nm: np.ndarray | None  # [B] band centres, when the scene has them
    labelled: LabelledPixels | None = None

    @property
    def cube(self) -> np.ndarray:
        """[H, W, B]"""
        return self.pixels.reshape(*self.shape, -1)


Fit = Callable[[UnmixingInput, int, Any], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class UnmixingMethod:
    fit: Fit
    # how many ground-truth labelled pixels the method is given under this config (0: blind)
    labelled_pixels: Callable[[Any], int] = lambda config: 0
    # one line for `--help`-style listings and the results table
    description: str = ""


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
