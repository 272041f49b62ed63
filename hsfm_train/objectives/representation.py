"""A regulariser on the encoder's token features, so that a linear read-out can use all of them.

Masked reconstruction alone lets the encoder put most of its variance in a few directions (what reconstructs the
pretraining scenes best) and keep the rest weak; after per-feature standardisation a linear probe on few labels
then pays as much for a weak, informative direction as for a strong one. VICReg's variance and covariance terms
(Bardes et al. 2022) push the token features towards unit variance per channel and uncorrelated channels:

    variance   = mean_j relu(1 - std_j)
    covariance = sum_{i != j} C_ij^2 / D          (C: covariance of the D channels over all visible tokens)
"""
from __future__ import annotations

import torch


def feature_decorrelation(tokens: torch.Tensor) -> torch.Tensor:
    """VICReg variance + covariance terms of token features [N, T, D] (all tokens pooled), in fp32."""
    x = tokens.reshape(-1, tokens.shape[-1]).float()
    x = x - x.mean(dim=0)
    count, dim = x.shape
    std = torch.sqrt(x.var(dim=0) + 1e-4)
    variance = torch.relu(1.0 - std).mean()
    covariance = (x.T @ x) / max(count - 1, 1)
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    return variance + off_diagonal.pow(2).sum() / dim
