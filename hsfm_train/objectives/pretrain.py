"""The pretraining objective: a weighted sum of terms chosen in config.

    objective=mae    masked MSE on band-normalised pixels (He et al.)
    objective=karma  Huber + spectral angle + LSMM physics (KARMA, seed 000); the paper does not publish its
                     weights, so all three default to 1 (see configs/objective/karma.yaml)
    decorrelation    optional on either: VICReg-style variance/covariance of the encoder's token features
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hsfm_train.errors import ConfigError
from hsfm_train.models.mae import MAEOutput, SpectralMAE
from hsfm_train.objectives.representation import feature_decorrelation
from hsfm_train.objectives.reconstruction import masked_huber, masked_mse
from hsfm_train.objectives.spectral import lsmm_physics, masked_spectral_angle

TERMS = ("mse", "huber", "sam", "physics", "decorrelation")


@dataclass
class ObjectiveConfig:
    name: str = "mae"
    mse: float = 1.0
    huber: float = 0.0
    sam: float = 0.0
    physics: float = 0.0
    decorrelation: float = 0.0  # variance/covariance regulariser of the encoder's visible-token features
    huber_delta: float = 1.0
    # physics weight ramps linearly from 0 to its value over these steps: random endmembers start far from the
    # data, and the LSMM term would otherwise dominate the first updates
    physics_warmup_steps: int = 0
    norm_pix: bool = False  # MAE's per-patch normalised target for mse/huber (predictions then live in that space)

    def __post_init__(self) -> None:
        weights = {term: getattr(self, term) for term in TERMS}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ConfigError(f"objective '{self.name}': term weights must be >= 0 with at least one > 0, "
                              f"got {weights}")
        if self.physics_warmup_steps < 0:
            raise ConfigError(f"objective '{self.name}': physics_warmup_steps must be >= 0, "
                              f"got {self.physics_warmup_steps}")

    def weight(self, term: str, step: int | None = None) -> float:
        """The term's weight at optimiser step ``step`` (None: after every warm-up)."""
        value = getattr(self, term)
        if term == "physics" and self.physics_warmup_steps and step is not None:
            value *= min(1.0, (step + 1) / self.physics_warmup_steps)
        return value


class PretrainObjective:
    def __init__(self, config: ObjectiveConfig):
        self.config = config

    def check_model(self, model: SpectralMAE) -> None:
        if self.config.physics > 0 and model.lsmm is None:
            raise ConfigError(f"objective '{self.config.name}' has a physics term but the model has no LSMM head: "
                              "set model.lsmm.num_endmembers > 0")
        if self.config.norm_pix and (self.config.sam > 0 or self.config.physics > 0):
            raise ConfigError("objective.norm_pix puts predictions in per-patch normalised units, which the "
                              "spectral-angle and physics terms cannot use: drop norm_pix or those terms")

    def __call__(self, model: SpectralMAE, out: MAEOutput, batch: dict[str, Any], step: int | None = None
                 ) -> tuple[torch.Tensor, dict]:
        c = self.config
        hsi, band_mask = batch["hsi"], batch["band_mask"]
        parts: dict[str, torch.Tensor] = {}
        if c.mse > 0:
            parts["mse"] = masked_mse(out, hsi, band_mask, c.norm_pix)
        if c.huber > 0:
            parts["huber"] = masked_huber(out, hsi, band_mask, c.huber_delta, c.norm_pix)
        if c.sam > 0:  # in reflectance: the term undoes the normalisation as it reads
            parts["sam"] = masked_spectral_angle(out, out.prediction, hsi, band_mask, batch["band_mean"],
                                                 batch["band_std"])
        if c.physics > 0:
            head = model.lsmm
            parts["physics"] = lsmm_physics(out, head, hsi, batch["wavelengths"], batch["band_mean"],
                                            batch["band_std"], band_mask)
        if c.decorrelation > 0:
            parts["decorrelation"] = feature_decorrelation(out.latent[:, 1:])
        loss = sum(c.weight(term, step) * value for term, value in parts.items())
        return loss, {term: value.detach() for term, value in parts.items()}
