"""Numeric reconstruction terms of the MAE objective, scored per token on masked tokens only.

A token is one (spectral group, spatial patch) pair; its elements are the bands of its group at the patch's
pixels. As in MAE, the error is averaged within each token first and then over the masked tokens, so groups with
many bands (SWIR) do not outweigh groups with few (RGB).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from hsfm_train.models.mae import MAEOutput


def _member(out: MAEOutput, slot: int, band_mask: torch.Tensor) -> torch.Tensor:
    return (out.membership[..., int(out.present[slot])] & band_mask).float()  # [N, B]


def _patch_sum(values: torch.Tensor, out: MAEOutput) -> torch.Tensor:
    """[N, H, W] -> [N, P] sums over each patch's pixels."""
    rows, cols = out.grid
    p = out.patch_size
    return values.view(values.shape[0], rows, p, cols, p).sum(dim=(2, 4)).flatten(1)


def token_mean(elements: torch.Tensor, out: MAEOutput, band_mask: torch.Tensor) -> torch.Tensor:
    """Per-element values [N, B, H, W] -> mean over each token's elements [N, G, P]."""
    means = []
    for slot in range(out.present.numel()):
        member = _member(out, slot, band_mask)
        sums = _patch_sum(torch.einsum("nbhw,nb->nhw", elements, member), out)
        means.append(sums / (member.sum(dim=1, keepdim=True) * out.patch_size**2).clamp_min(1.0))
    return torch.stack(means, dim=1)


def token_expand(values: torch.Tensor, out: MAEOutput, band_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values [N, G, P] -> every element of the token [N, B, H, W]."""
    rows, cols = out.grid
    p = out.patch_size
    pixels = values.view(*values.shape[:2], rows, cols).repeat_interleave(p, 2).repeat_interleave(p, 3)
    member = torch.stack([_member(out, s, band_mask) for s in range(out.present.numel())], dim=-1)
    return torch.einsum("nbg,nghw->nbhw", member, pixels)


def normalised_target(target: torch.Tensor, out: MAEOutput, band_mask: torch.Tensor) -> torch.Tensor:
    """MAE's norm_pix_loss target: each token standardised by its own mean and variance."""
    mean = token_mean(target, out, band_mask)
    variance = (token_mean(target * target, out, band_mask) - mean * mean).clamp_min(0.0)
    scale = token_expand((variance + 1e-6).sqrt(), out, band_mask)
    # padded bands belong to no token: their scale is 0, and they must read 0, not 0/0
    return torch.where(scale > 0, (target - token_expand(mean, out, band_mask)) / scale.clamp_min(1e-12), 0.0)


def masked_token_loss(elements: torch.Tensor, out: MAEOutput, band_mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of each token's mean element loss; tokens of a group in which a sample has no
    band (padded batches that mix band sets) are not counted."""
    per_token = token_mean(elements, out, band_mask)
    has_bands = torch.stack([_member(out, s, band_mask).sum(dim=1) > 0 for s in range(out.present.numel())], dim=1)
    mask = (out.token_mask & has_bands.unsqueeze(-1)).float()
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def masked_mse(out: MAEOutput, target: torch.Tensor, band_mask: torch.Tensor, norm_pix: bool = False
               ) -> torch.Tensor:
    if norm_pix:
        target = normalised_target(target, out, band_mask)
    return masked_token_loss((out.prediction.float() - target) ** 2, out, band_mask)


def masked_huber(out: MAEOutput, target: torch.Tensor, band_mask: torch.Tensor, delta: float = 1.0,
                 norm_pix: bool = False) -> torch.Tensor:
    if norm_pix:
        target = normalised_target(target, out, band_mask)
    elements = F.huber_loss(out.prediction.float(), target, reduction="none", delta=delta)
    return masked_token_loss(elements, out, band_mask)
