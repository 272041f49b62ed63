"""Semi-supervised dual-branch spatial-spectral Mamba unmixing.

TO BE WRITTEN (helper): the fit function for ``mamba-semi``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MambaSemiConfig:
    labelled: int = 10  # K pixels with ground-truth abundances; 0 = the blind baseline
    epochs: int = 1000  # full-image steps
    lr: float = 0.003  # Adam
    features: int = 64  # C, the shared convolutional features and the Mamba model width
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    pooled_size: int = 16  # S: the spatial branch scans an S x S average-pooled grid
    supervised_weight: float = 1.0
    sparsity_weight: float = 1e-4
    endmember_lr: float = 1e-4  # the endmember matrix is refined slowly from its constrained-least-squares start

    def problems(self) -> list[str]:
        return [] if self.labelled >= 0 else [f"mamba.labelled must be >= 0, got {self.labelled}"]

# name -> UnmixingMethod; filled in below the fit function
MAMBA_METHODS: dict = {}
