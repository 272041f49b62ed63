"""The joint optical-SAR pretraining model: one shared spectral MAE for both modalities (the wavelength-aware
tokenizer reads RGB and C-band SAR alike), plus the heads only pretraining uses. What downstream work loads is the
backbone alone (``model.backbone``: a plain ``spectral-mae``), so every other stage reads a joint export as it
reads any other.

Heads (all trained with the backbone; a head whose loss weight is 0 stays at its initialisation):
  ``optical_to_sar`` / ``sar_to_optical``: linear maps of the decoder features of one modality's patches to the
  other's degraded target (p*p values per patch: the SAR channel mean, the optical luma);
  ``pooling``: conditioned (cross-attention) pooling for the conditioned contrastive term: ``pairwise`` scores
  every (optical i, SAR j) of the batch with each attending to the other (or, with ``conditioned_negatives`` = k,
  each sample against k others drawn from the step's generator: N (1 + 2k) poolings, not N^2); ``own_partner`` pools each sample
  attending to its own partner only (off when the term's weight is 0);
  ``rigid_projection``: mean pooling + MLP for the CLIP-style contrastive baseline;
  ``distillation``: a linear map of the student's optical tokens to the teacher's width (when there is a teacher).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.objectives.codemae import (CONDITIONED_SCORINGS, ConditionedPooling, draw_negatives,
                                           pairwise_conditioned_scores, sampled_conditioned_scores)


@dataclass
class JointHeadsConfig:
    embedding_dim: int = 128  # the contrastive embeddings' width
    teacher_dim: int = 0  # the distillation teacher's token width; 0: no distillation head
    conditioned_scoring: str | None = "pairwise"  # one of CONDITIONED_SCORINGS; None: the pooling is not run
    conditioned_negatives: int = 0  # pairwise: negatives per sample; 0 (or >= batch - 1): every other pair

    def __post_init__(self) -> None:
        if self.conditioned_scoring is not None and self.conditioned_scoring not in CONDITIONED_SCORINGS:
            raise ValueError(f"conditioned_scoring {self.conditioned_scoring!r} is not one of "
                             f"{CONDITIONED_SCORINGS} (or None)")
        if self.conditioned_negatives < 0:
            raise ValueError(f"conditioned_negatives must be >= 0, got {self.conditioned_negatives}")


class JointOpticalSAR(nn.Module):
    def __init__(self, config: ModelConfig, heads: JointHeadsConfig | None = None):
        super().__init__()
        heads = heads or JointHeadsConfig()
        self.config = config
        self.heads_config = heads
        self.backbone = SpectralMAE(config)
        targets = config.patch_size ** 2
        self.optical_to_sar = nn.Linear(config.decoder_embed_dim, targets)
        self.sar_to_optical = nn.Linear(config.decoder_embed_dim, targets)
        self.pooling = ConditionedPooling(config.embed_dim, config.num_heads, heads.embedding_dim)
        self.rigid_projection = nn.Sequential(nn.Linear(config.embed_dim, config.embed_dim), nn.GELU(),
                                              nn.Linear(config.embed_dim, heads.embedding_dim))
        self.distillation = nn.Linear(config.embed_dim, heads.teacher_dim) if heads.teacher_dim else None

    def cross_modal_parameters(self) -> list[nn.Parameter]:
        """The heads only a paired sample trains (cross-modal reconstruction and both contrastive heads)."""
        return [parameter for head in (self.optical_to_sar, self.sar_to_optical, self.pooling, self.rigid_projection)
                for parameter in head.parameters()]

    def forward(self, optical: torch.Tensor, optical_wavelengths: torch.Tensor,
                optical_band_mask: torch.Tensor | None = None, sar: torch.Tensor | None = None,
                sar_wavelengths: torch.Tensor | None = None, sar_band_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, Any]:
        """Masked forwards of the optical images and, when given, of their SAR partners (independent masks),
        and every head's output: a dict (engines that hook returned tensors see them all)."""
        out: dict[str, Any] = {"optical": self.backbone(optical, optical_wavelengths, optical_band_mask,
                                                        generator=generator)}
        optical_tokens = out["optical"].latent[:, 1:]  # visible tokens, cls dropped
        out["optical_rigid"] = self.rigid_projection(optical_tokens.mean(dim=1))
        if self.distillation is not None:
            out["distilled"] = self.distillation(optical_tokens)
        if sar is not None:
            out["sar"] = self.backbone(sar, sar_wavelengths, sar_band_mask, generator=generator)
            sar_tokens = out["sar"].latent[:, 1:]
            out["optical_to_sar"] = self.optical_to_sar(out["optical"].decoder_features.mean(dim=1))  # [N, P, p*p]
            out["sar_to_optical"] = self.sar_to_optical(out["sar"].decoder_features.mean(dim=1))
            out["sar_rigid"] = self.rigid_projection(sar_tokens.mean(dim=1))
            # the objective keeps the paired rows (and columns) of these
            negatives = self.heads_config.conditioned_negatives
            if self.heads_config.conditioned_scoring == "pairwise" and 0 < negatives < len(sar_tokens) - 1:
                candidates = draw_negatives(len(sar_tokens), negatives, generator, sar_tokens.device)
                out["conditioned_candidates"] = candidates
                out["conditioned_to_sar"], out["conditioned_to_optical"] = sampled_conditioned_scores(
                    self.pooling, optical_tokens, sar_tokens, candidates)
            elif self.heads_config.conditioned_scoring == "pairwise":
                out["conditioned_scores"] = pairwise_conditioned_scores(self.pooling, optical_tokens, sar_tokens)
            elif self.heads_config.conditioned_scoring == "own_partner":
                out["optical_conditioned"] = self.pooling(optical_tokens, sar_tokens)
                out["sar_conditioned"] = self.pooling(sar_tokens, optical_tokens)
        else:  # an unpaired batch: a zero that reaches the cross-modal heads, made here so that DDP counts them
            # as used by this forward (a parameter touched only by the loss is marked ready twice)
            out["cross_modal_anchor"] = sum(parameter.sum() for parameter in self.cross_modal_parameters()) * 0.0
        return out
