"""CNNAEU (Palsson, Sveinsson & Ulfarsson, IEEE TGRS 2021) and its contrastive variant.

TO BE WRITTEN (helper): fit functions for ``cnnaeu`` and ``cnnaeu-contrastive``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CNNAEUConfig:
    epochs: int = 320
    patches: int = 250  # random patches drawn once per run
    patch_size: int = 40
    batch_size: int = 15
    lr: float = 0.003  # RMSprop
    filters: int = 48
    leaky_slope: float = 0.02
    dropout: float = 0.2  # spatial (channel) dropout
    decoder_kernel: int = 13
    softmax_scale: float = 3.0
    init_std: float = 0.3


@dataclass
class ContrastiveConfig:
    epochs: int = 100
    patch_size: int = 32
    batch_size: int = 8
    lr: float = 0.003  # Adam
    weight_decay: float = 1e-6
    temperature: float = 0.1
    sad_weight: float = 0.5  # lambda: loss = (1 - lambda) contrastive + lambda SAD
    projection: list[int] = field(default_factory=lambda: [128, 64])
    loss: str = "ntxent"  # "ntxent" or "kernel" (blind kernel-weighted)
    augmentations: list[str] = field(default_factory=lambda: ["crop", "blur"])

    def problems(self) -> list[str]:
        return []

# name -> UnmixingMethod; filled in below the fit functions
CNNAEU_METHODS: dict = {}
