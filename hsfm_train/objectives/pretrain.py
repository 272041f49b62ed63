"""The pretraining objective: a weighted sum of terms chosen in config.

    objective=mae    masked MSE on band-normalised pixels (He et al.)
    objective=karma  Huber + spectral angle + LSMM physics (KARMA, seed 000); the paper does not publish its
                     weights, so all three default to 1 (see configs/objective/karma.yaml)
    decorrelation    optional on either: VICReg-style variance/covariance of the encoder's token features
    objective=codemae  optical-SAR pairs through one shared backbone (``joint``): each modality's masked MSE,
                     cross-modal degraded reconstruction, conditioned contrastive learning and distillation from a
                     frozen optical teacher (CoDe-MAE, seed 003; objectives/codemae.py); ``rigid_contrastive`` is
                     the CLIP-style baseline. Cross-modal terms are zero for samples without a partner.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hsfm_train.errors import ConfigError
from hsfm_train.models.mae import MAEOutput, SpectralMAE
from hsfm_train.objectives.codemae import CONDITIONED_SCORINGS
from hsfm_train.objectives.representation import feature_decorrelation
from hsfm_train.objectives.reconstruction import masked_huber, masked_mse
from hsfm_train.objectives.spectral import lsmm_physics, masked_spectral_angle

TERMS = ("mse", "huber", "sam", "physics", "decorrelation")
JOINT_TERMS = ("degraded", "conditioned_contrastive", "rigid_contrastive", "distillation")


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
    # optical-SAR pairs (the batch's `pair`) through the one backbone: the SAR image is reconstructed too, and the
    # cross-modal terms below apply (objective=codemae)
    joint: bool = False
    degraded: float = 0.0  # cross-modal degraded reconstruction (optical -> SAR channel mean, SAR -> optical luma)
    conditioned_contrastive: float = 0.0  # cross-attention pooling + InfoNCE
    # pairwise: every (optical i, SAR j) is scored with each side attending to the other; own_partner: each
    # sample attends to its own partner only (a symmetric pooling then solves the InfoNCE without alignment)
    conditioned_scoring: str = "pairwise"
    # pairwise: k > 0 contrasts each sample with k others drawn at random (N (1 + 2k) poolings per step, not N^2);
    # 0 (or k >= batch - 1): with every other pair of the batch
    conditioned_negatives: int = 0
    rigid_contrastive: float = 0.0  # mean pooling + InfoNCE (CLIP-style; the baseline CoDe-MAE argues against)
    distillation: float = 0.0  # SmoothL1 to a frozen optical teacher's tokens
    teacher: str | None = None  # the teacher: an `hsfm export` directory
    contrastive_temperature: float = 0.07

    def __post_init__(self) -> None:
        weights = {term: getattr(self, term) for term in TERMS}
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ConfigError(f"objective '{self.name}': term weights must be >= 0 with at least one > 0, "
                              f"got {weights}")
        joint = {term: getattr(self, term) for term in JOINT_TERMS}
        if any(w < 0 for w in joint.values()):
            raise ConfigError(f"objective '{self.name}': term weights must be >= 0, got {joint}")
        if any(w > 0 for w in joint.values()) and not self.joint:
            raise ConfigError(f"objective '{self.name}': the cross-modal terms {[t for t, w in joint.items() if w]} "
                              "need joint=true (optical-SAR pairs)")
        if self.distillation > 0 and not self.teacher:
            raise ConfigError(f"objective '{self.name}': distillation > 0 needs objective.teacher (an export)")
        if self.conditioned_scoring not in CONDITIONED_SCORINGS:
            raise ConfigError(f"objective '{self.name}': conditioned_scoring must be one of {CONDITIONED_SCORINGS}, "
                              f"got {self.conditioned_scoring!r}")
        if self.conditioned_negatives < 0:
            raise ConfigError(f"objective '{self.name}': conditioned_negatives must be >= 0, "
                              f"got {self.conditioned_negatives}")
        if not self.contrastive_temperature > 0:
            raise ConfigError(f"objective '{self.name}': contrastive_temperature must be > 0")
        if self.joint and (self.sam > 0 or self.physics > 0 or self.huber > 0 or self.decorrelation > 0):
            raise ConfigError(f"objective '{self.name}': joint=true takes the masked MSE and the cross-modal terms "
                              "only (huber, sam, physics and decorrelation are for hyperspectral cubes)")
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


class JointObjective:
    """The loss of a :class:`hsfm_train.models.codemae.JointOpticalSAR` forward on a batch whose ``hsi`` is the
    optical image and whose ``pair`` (when present) is its SAR partner."""

    def __init__(self, config: ObjectiveConfig, teacher: torch.nn.Module | None = None):
        self.config = config
        self.teacher = teacher

    def __call__(self, model, out: dict[str, Any], batch: dict[str, Any], paired: torch.Tensor
                 ) -> tuple[torch.Tensor, dict]:
        from hsfm_train.objectives.codemae import (degraded_reconstruction, feature_distillation, optical_luma,
                                                   paired_info_nce, paired_score_info_nce, patch_targets,
                                                   sampled_score_info_nce, sar_channel_mean)

        c = self.config
        p = model.config.patch_size
        parts: dict[str, torch.Tensor] = {"mse": masked_mse(out["optical"], batch["hsi"], batch["band_mask"],
                                                            c.norm_pix)}
        # an unpaired batch: the cross-modal heads get a zero gradient through the forward's anchor (every rank's
        # DDP reducer expects one)
        zero = out.get("cross_modal_anchor", 0.0)
        if "sar" in out:
            sar_mask = torch.ones(batch["pair"].shape[:2], dtype=torch.bool, device=batch["pair"].device)
            parts["mse_sar"] = masked_mse(out["sar"], batch["pair"], sar_mask, c.norm_pix)
            if c.degraded > 0:
                optical = batch["hsi"] * batch["band_std"][:, :, None, None] + batch["band_mean"][:, :, None, None]
                luma = patch_targets(optical_luma(optical), p)
                sar_mean = patch_targets(sar_channel_mean(batch["pair"]), p)
                parts["degraded"] = (degraded_reconstruction(out["optical_to_sar"], sar_mean, paired)
                                     + degraded_reconstruction(out["sar_to_optical"], luma, paired)) / 2
            if c.conditioned_contrastive > 0 and "conditioned_candidates" in out:
                parts["conditioned_contrastive"] = sampled_score_info_nce(
                    out["conditioned_to_sar"], out["conditioned_to_optical"], out["conditioned_candidates"], paired,
                    c.contrastive_temperature)
            elif c.conditioned_contrastive > 0 and c.conditioned_scoring == "pairwise":
                parts["conditioned_contrastive"] = paired_score_info_nce(out["conditioned_scores"], paired,
                                                                         c.contrastive_temperature)
            elif c.conditioned_contrastive > 0:
                parts["conditioned_contrastive"] = paired_info_nce(out["optical_conditioned"], out["sar_conditioned"],
                                                                   paired, c.contrastive_temperature)
            if c.rigid_contrastive > 0:
                parts["rigid_contrastive"] = paired_info_nce(out["optical_rigid"], out["sar_rigid"], paired,
                                                             c.contrastive_temperature)
        else:
            for term in ("degraded", "conditioned_contrastive", "rigid_contrastive"):
                if getattr(c, term) > 0:
                    parts[term] = zero
        if c.distillation > 0:
            with torch.no_grad():
                teacher_tokens = self.teacher.encode(batch["hsi"], batch["wavelengths"], batch["band_mask"])[:, 1:]
            ids = out["optical"].visible_ids  # the student's visible tokens, in its latent order
            target = teacher_tokens.gather(1, ids.unsqueeze(-1).expand(-1, -1, teacher_tokens.shape[-1]))
            parts["distillation"] = feature_distillation(out["distilled"], target, torch.nn.Identity())
        weights = {"mse": c.mse, "mse_sar": c.mse, **{term: getattr(c, term) for term in JOINT_TERMS}}
        loss = sum(weights[term] * value for term, value in parts.items()) + zero
        return loss, {term: value.detach() for term, value in parts.items()}
