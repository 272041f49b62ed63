"""Spectral-angle (SAM / SAD) loss over rows of [N, B]: the PyTorch reference.

    angle_i = arccos( <p_i, t_i> / (|p_i| |t_i|) )

Two places where public implementations produce NaN are handled:
* identical (or anti-parallel) rows: d arccos(c)/dc = -1/sqrt(1 - c^2) is infinite at |c| = 1, so c is clamped to
  +-(1 - 1e-7); the clamp's gradient is zero outside the range, so the gradient is finite (zero) there;
* zero-norm rows (a zero prediction, nodata pixels): the angle is undefined, so rows with |p| |t| <= eps get
  angle 0 and zero gradient and are left out of the mean.
Everything accumulates in fp32 whatever the input dtype. The fused Triton kernel (sam_triton.py) matches this;
it differentiates the prediction only, where this reference differentiates both arguments.
"""
from __future__ import annotations

import torch

COSINE_CLAMP = 1.0 - 1e-7


def spectral_angle_reference(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                             reduction: str = "mean", eps: float = 1e-8) -> torch.Tensor:
    """Angles in radians of rows [N, B]; ``weight`` [N] scales rows (a mask selects them).

    reduction: "none" -> weight * angle per row [N]; "sum" -> its sum; "mean" -> sum / (sum of the weights of
    the rows with a defined angle), 0 when there are none."""
    if prediction.shape != target.shape or prediction.dim() != 2:
        raise ValueError(f"expected two [N, B] tensors of one shape, got {tuple(prediction.shape)} and "
                         f"{tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    p, t = prediction.float(), target.float()
    dot = (p * t).sum(dim=1)
    norms_squared = (p * p).sum(dim=1) * (t * t).sum(dim=1)
    defined = norms_squared > eps * eps
    safe = torch.where(defined, norms_squared, torch.ones_like(norms_squared))
    cosine = torch.where(defined, dot * torch.rsqrt(safe), torch.ones_like(dot)).clamp(-COSINE_CLAMP, COSINE_CLAMP)
    angle = torch.where(defined, torch.arccos(cosine), torch.zeros_like(cosine))
    weights = defined.float() if weight is None else weight.float() * defined
    weighted = angle * weights
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / weights.sum().clamp_min(1e-12)
