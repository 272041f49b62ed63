"""Spectral-angle (SAM / SAD) loss over rows of [N, B]: the PyTorch reference.

    angle_i = arccos( <p_i, t_i> / (|p_i| |t_i|) )

Two places where public implementations produce NaN are handled:
* identical (or anti-parallel) rows: d arccos(c)/dc = -1/sqrt(1 - c^2) is infinite at |c| = 1, so c is clamped to
  +-(1 - 1e-7); the clamp's gradient is zero outside the range, so the gradient is finite (zero) there;
* zero-norm rows (a zero prediction, nodata pixels): the angle is undefined, so rows with |p| |t| <= eps get
  angle 0 and zero gradient and are left out of the mean.
Everything accumulates in fp32 whatever the input dtype. The fused Triton kernel (sam_triton.py) matches this;
it differentiates the prediction only, where this reference differentiates both arguments.

Two layouts: rows [N, B] (``spectral_angle_reference``), and images [N, B, H, W] whose bands fall into spectral
groups (``grouped_spectral_angle_reference``): one angle per (sample, group, pixel) over that group's bands only,
with the group membership passed in rather than applied by masked copies of the images, and optionally a per-band
affine map (undoing a normalisation) applied on the way in.
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
    weighted, weights = _weighted_angles((p * t).sum(dim=1), (p * p).sum(dim=1), (t * t).sum(dim=1), weight, eps)
    return _reduce(weighted, weights, reduction)


def _weighted_angles(dot: torch.Tensor, pp: torch.Tensor, tt: torch.Tensor, weight: torch.Tensor | None,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * angle, weight * defined) from <p, t>, |p|^2, |t|^2 (any shape, elementwise)."""
    norms_squared = pp * tt
    defined = norms_squared > eps * eps
    safe = torch.where(defined, norms_squared, torch.ones_like(norms_squared))
    cosine = torch.where(defined, dot * torch.rsqrt(safe), torch.ones_like(dot)).clamp(-COSINE_CLAMP, COSINE_CLAMP)
    angle = torch.where(defined, torch.arccos(cosine), torch.zeros_like(cosine))
    weights = defined.float() if weight is None else weight.float() * defined
    return angle * weights, weights


def _reduce(weighted: torch.Tensor, weights: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    return weighted.sum() / _mean_denominator(weights)


def _mean_denominator(weights: torch.Tensor) -> torch.Tensor:
    return weights.sum().clamp_min(1e-12)  # 0 / 1e-12 = 0 when no angle is defined


def grouped_spectral_angle_reference(prediction: torch.Tensor, target: torch.Tensor, membership: torch.Tensor,
                                     weight: torch.Tensor | None = None, reduction: str = "mean", eps: float = 1e-8,
                                     scale: torch.Tensor | None = None, offset: torch.Tensor | None = None
                                     ) -> torch.Tensor:
    """Angles in radians per (sample, group, pixel) of images [N, B, H, W], each over its group's bands only.

    membership: [N, B, G] bool, which group each band belongs to (at most one; padded bands in none).
    weight: optional [N, G, H, W], scales each (sample, group, pixel) angle (a mask selects them).
    scale, offset: optional [N, B]; the spectra compared are ``x * scale + offset`` (e.g. the per-band std and
    mean, to undo a normalisation), so callers need not build those images themselves.
    reduction: as ``spectral_angle_reference`` over the (sample, group, pixel) angles; "none" -> [N, G, H, W].

    The same numbers as the row reference applied to each group's rows with the other bands zeroed (tested
    against exactly that). It is also what runs on CPU, so its backward is written out, as the kernel's: autograd
    would keep and expand each per-group sum's product image separately. Gradients for ``prediction`` and
    ``target`` (no double backward); ``membership``, ``weight``, ``scale`` and ``offset`` are constants."""
    check_grouped_arguments(prediction, target, membership, weight, scale, offset)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if (membership.sum(dim=2) > 1).any():
        raise ValueError("membership: a band may belong to at most one group")
    return _GroupedSpectralAngle.apply(prediction, target, membership, weight, scale, offset, reduction, eps)


class _GroupedSpectralAngle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prediction, target, membership, weight, scale, offset, reduction, eps):
        n, bands, height, width = prediction.shape
        groups = membership.shape[2]
        x, y = prediction.float(), target.float()
        band_scale = None
        if scale is not None or offset is not None:
            ones = torch.ones((n, bands), device=x.device)
            band_scale = (ones if scale is None else scale.float())[:, :, None, None]
            band_offset = (torch.zeros_like(ones) if offset is None else offset.float())[:, :, None, None]
            # multiply, then add in place: as the callers' own x * std + mean, and faster than a broadcast addcmul
            x, y = x.mul(band_scale).add_(band_offset), y.mul(band_scale).add_(band_offset)
        x, y = x.reshape(n, bands, height * width), y.reshape(n, bands, height * width)
        # per-group sums over bands as one batched matmul [G, B] x [B, H*W] per sample; one product buffer reused
        member_t = membership.transpose(1, 2).float().contiguous()
        product = x * y
        dot = torch.bmm(member_t, product)
        pp = torch.bmm(member_t, torch.mul(x, x, out=product))
        tt = torch.bmm(member_t, torch.mul(y, y, out=product))
        del product
        pixel_weight = None if weight is None else weight.reshape(n, groups, height * width)
        weighted, weights = _weighted_angles(dot, pp, tt, pixel_weight, eps)
        out = _reduce(weighted.view(n, groups, height, width), weights, reduction)
        # band -> row of the per-group coefficients [N * (G + 1), H*W]; row G of each sample is zero (no group)
        group_ids = torch.where(membership.any(dim=2), membership.to(torch.uint8).argmax(dim=2), groups)
        band_rows = (torch.arange(n, device=x.device)[:, None] * (groups + 1) + group_ids).flatten()
        ctx.save_for_backward(x, y, dot, pp, tt, weights, band_rows, band_scale)
        ctx.reduction, ctx.eps, ctx.shape = reduction, eps, prediction.shape
        ctx.dtypes = (prediction.dtype, target.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, y, dot, pp, tt, weights, band_rows, band_scale = ctx.saved_tensors
        n, groups, pixels = dot.shape
        grad_output = grad_output.float()
        if ctx.reduction == "none":
            along = grad_output.reshape(n, groups, pixels) * weights
        elif ctx.reduction == "sum":
            along = grad_output * weights
        else:
            along = grad_output / _mean_denominator(weights) * weights
        # d angle / d cosine, zero where undefined or where the clamp is active (inclusive bounds, as clamp)
        norms_squared = pp * tt
        defined = norms_squared > ctx.eps * ctx.eps
        inverse_norms = torch.rsqrt(torch.where(defined, norms_squared, torch.ones_like(norms_squared)))
        cosine = torch.where(defined, dot * inverse_norms, torch.ones_like(dot))
        active = defined & (cosine >= -COSINE_CLAMP) & (cosine <= COSINE_CLAMP)
        cosine = torch.where(active, cosine, torch.zeros_like(cosine))
        along = torch.where(active, -along * torch.rsqrt(1 - cosine * cosine), torch.zeros_like(along))
        # d cosine / d x = y / (|x||y|) - cosine x / |x|^2, and symmetrically for y
        cross = along * inverse_norms
        grads = []
        for index, (own, other, own_squared) in enumerate(((x, y, pp), (y, x, tt))):
            if not ctx.needs_input_grad[index]:
                grads.append(None)
                continue
            own_coefficient = -along * cosine / torch.where(defined, own_squared, torch.ones_like(own_squared))
            grad = _to_bands(cross, band_rows).mul_(other)
            grad.addcmul_(_to_bands(own_coefficient, band_rows), own)
            if band_scale is not None:
                grad.mul_(band_scale.flatten(2))  # through x * scale + offset
            grads.append(grad.view(ctx.shape).to(ctx.dtypes[index]))
        return (*grads, None, None, None, None, None, None)


def _to_bands(per_group: torch.Tensor, band_rows: torch.Tensor) -> torch.Tensor:
    """[N, G, P] per-group values -> [N, B, P], each band taking its group's row (0 for bands in no group)."""
    n, groups, pixels = per_group.shape
    padded = torch.cat([per_group, per_group.new_zeros(n, 1, pixels)], dim=1).view(n * (groups + 1), pixels)
    return padded.index_select(0, band_rows).view(n, -1, pixels)


def check_grouped_arguments(prediction: torch.Tensor, target: torch.Tensor, membership: torch.Tensor,
                            weight: torch.Tensor | None, scale: torch.Tensor | None, offset: torch.Tensor | None
                            ) -> None:
    """The shapes both grouped implementations require."""
    if prediction.shape != target.shape or prediction.dim() != 4:
        raise ValueError(f"expected two [N, B, H, W] tensors of one shape, got {tuple(prediction.shape)} and "
                         f"{tuple(target.shape)}")
    n, b, h, w = prediction.shape
    if membership.dim() != 3 or membership.shape[:2] != (n, b) or membership.dtype != torch.bool:
        raise ValueError(f"membership must be a bool [N, B, G] tensor with N, B = {n}, {b}, got "
                         f"{membership.dtype} {tuple(membership.shape)}")
    groups = membership.shape[2]
    if weight is not None and weight.shape != (n, groups, h, w):
        raise ValueError(f"weight must have shape [N, G, H, W] = {(n, groups, h, w)}, got {tuple(weight.shape)}")
    for name, band_values in (("scale", scale), ("offset", offset)):
        if band_values is not None and band_values.shape != (n, b):
            raise ValueError(f"{name} must have shape [N, B] = {(n, b)}, got {tuple(band_values.shape)}")
