"""Fused spectral-angle (SAM / SAD) loss in Triton, following the conventions of ``sam_loss.py`` exactly.

The Liger-Kernel idea: the forward pass reads each row of the prediction and the target once, computes
<p, t>, |p|^2, |t|^2 and the angle, and in the same pass writes the (row-weighted) gradient of the angle with
respect to the prediction. The backward pass then only rescales that stored gradient by ``grad_output`` (and by
1 / denominator for "mean", per row for "none"): no second pass over the inputs, no autograd graph of
elementwise intermediates.

Conventions (as ``spectral_angle_reference``): fp32 accumulation whatever the input dtype; the cosine clamped to
+-COSINE_CLAMP (zero gradient where the clamp is active, so identical / anti-parallel rows are finite); rows with
|p|^2 |t|^2 <= eps^2 are undefined: angle 0, zero gradient, left out of the "mean" denominator.

Differences from the reference: only ``prediction`` gets a gradient (``target`` and ``weight`` get None, even if
they require grad; the objectives never differentiate the target); no double backward.

Two kernels, as the two references: rows [N, B] (``fused_spectral_angle``), and images [N, B, H, W] with spectral
groups (``fused_grouped_spectral_angle``), which reads the images through their strides with a per-sample
band -> group id and keeps one <p, t>, |p|^2, |t|^2 triple per group, so no per-group copy is ever made; it can
also apply the per-band affine map that undoes a normalisation while loading.

Importing this module imports triton; ``hsfm_train.kernels`` itself stays triton-free and loads it on first use.
On CPU tensors the kernel only runs under ``TRITON_INTERPRET=1``, which must be set before this module is
imported (triton decides at decoration time whether a kernel is interpreted).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hsfm_train.kernels.sam_loss import COSINE_CLAMP, check_grouped_arguments

# A program handles a tile of BLOCK_N rows x BLOCK_B bands: many rows per program when B is small (hyperspectral
# pixels: N huge, B ~ 200), one row in chunks of BLOCK_B when B is large. Multi-row tiles hold a 64-bit pointer per
# element, so they are kept to 1024 elements (ptxas, sm_90: 4 x 256 at 4 warps ~64 registers; 16 x 256 at 8
# warps ~254, too few resident warps for a bandwidth-bound kernel); a single row may span up to 4096 bands
# (8 warps, ~69 registers). Not yet timed on a GPU.
_ROWS_TILE_ELEMENTS = 1024
_MAX_BLOCK_B = 4096

_PI = tl.constexpr(3.141592653589793)  # jit code may only read constexpr globals


@triton.jit
def _arccos(x):
    """arccos in fp32 without libdevice (missing under TRITON_INTERPRET): Abramowitz & Stegun 4.4.46,
    acos(|x|) = sqrt(1 - |x|) * poly7(|x|) (absolute error <= 2e-8 on [0, 1]), acos(-x) = pi - acos(x).
    1 - |x| is exact in fp32 near 1 (Sterbenz), so the angle near the clamp keeps its relative accuracy."""
    a = tl.abs(x)
    poly = -0.0012624911
    poly = poly * a + 0.0066700901
    poly = poly * a - 0.0170881256
    poly = poly * a + 0.0308918810
    poly = poly * a - 0.0501743046
    poly = poly * a + 0.0889789874
    poly = poly * a - 0.2145988016
    poly = poly * a + 1.5707963050
    angle = tl.sqrt(1.0 - a) * poly
    return tl.where(x < 0, _PI - angle, angle)


@triton.jit
def _load_chunk(p_rows, t_rows, c, row_ok, B):
    """One [BLOCK_N, BLOCK_B] chunk of prediction and target, as fp32, and its mask."""
    mask = row_ok[:, None] & (c[None, :] < B)
    p = tl.load(p_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
    return p, t, mask


@triton.jit
def _spectral_angle_fwd_kernel(
    p_ptr, t_ptr, w_ptr, grad_ptr, weighted_ptr, row_weight_ptr,
    N, B, stride_p, stride_t, stride_g,
    eps_sq, clamp,
    HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N * B may exceed 2^31 elements
    cols = tl.arange(0, BLOCK_B)
    p_rows = p_ptr + rows64[:, None] * stride_p
    t_rows = t_ptr + rows64[:, None] * stride_t

    # pass 1: the three sums, fp32 (per chunk reduced to [BLOCK_N] to keep register use flat)
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    pp = tl.zeros([BLOCK_N], dtype=tl.float32)
    tt = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SINGLE_CHUNK:
        # the whole row fits one tile: keep it in registers for the gradient below
        p, t, mask = _load_chunk(p_rows, t_rows, cols, row_ok, B)
        dot = tl.sum(p * t, axis=1)
        pp = tl.sum(p * p, axis=1)
        tt = tl.sum(t * t, axis=1)
    else:
        for start in range(0, B, BLOCK_B):
            p, t, mask = _load_chunk(p_rows, t_rows, start + cols, row_ok, B)
            dot += tl.sum(p * t, axis=1)
            pp += tl.sum(p * p, axis=1)
            tt += tl.sum(t * t, axis=1)

    # the angle, exactly as the reference: cosine = dot * rsqrt(|p|^2 |t|^2), clamped; undefined rows -> 0
    norms_sq = pp * tt
    defined = norms_sq > eps_sq
    safe_norms_sq = tl.where(defined, norms_sq, 1.0)  # no inf / NaN in the masked-out lanes
    inv_norms = 1.0 / tl.sqrt(safe_norms_sq)
    raw_cosine = tl.where(defined, dot * inv_norms, 1.0)
    cosine = tl.minimum(tl.maximum(raw_cosine, -clamp), clamp)
    angle = tl.where(defined, _arccos(cosine), 0.0)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_N], 1.0, tl.float32)
    row_weight = w * defined.to(tl.float32)  # the reference's weight.float() * defined
    tl.store(weighted_ptr + rows, angle * row_weight, mask=row_ok)
    tl.store(row_weight_ptr + rows, row_weight, mask=row_ok)

    if COMPUTE_GRAD:
        # d angle / d p = -(1 / sqrt(1 - c^2)) (t / (|p||t|) - c p / |p|^2); zero where the clamp is active (the
        # clamp's gradient, inclusive bounds as torch.clamp) or the row is undefined. (1 - c)(1 + c) keeps
        # 1 - c^2 accurate near |c| = 1.
        active = defined & (raw_cosine >= -clamp) & (raw_cosine <= clamp)
        safe_c = tl.where(active, raw_cosine, 0.0)
        row_scale = tl.where(active, -row_weight / tl.sqrt((1.0 - safe_c) * (1.0 + safe_c)), 0.0)
        t_coef = row_scale * inv_norms
        p_coef = -row_scale * safe_c / tl.where(defined, pp, 1.0)
        g_rows = grad_ptr + rows64[:, None] * stride_g
        if SINGLE_CHUNK:
            g = t_coef[:, None] * t + p_coef[:, None] * p
            tl.store(g_rows + cols[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            # pass 2 (long rows only): re-read the chunks (mostly from L2) and write the gradient
            for start in range(0, B, BLOCK_B):
                c = start + cols
                p, t, mask = _load_chunk(p_rows, t_rows, c, row_ok, B)
                g = t_coef[:, None] * t + p_coef[:, None] * p
                tl.store(g_rows + c[None, :], g.to(grad_ptr.dtype.element_ty), mask=mask)


def _block_sizes(n: int, b: int, block_b: int | None) -> tuple[int, int]:
    if block_b is None:
        block_b = _MAX_BLOCK_B
    elif block_b < 1 or block_b & (block_b - 1):
        raise ValueError(f"block_b must be a power of two, got {block_b}")
    bb = min(triton.next_power_of_2(max(b, 1)), block_b)
    bn = max(1, min(triton.next_power_of_2(max(n, 1)), _ROWS_TILE_ELEMENTS // bb))
    return bn, bb


def _forward(prediction, target, weight, eps, block_b, compute_grad):
    """Launch the kernel: (weight * angle per row [N] fp32, weight * defined per row [N] fp32, gradient or None).

    The stored gradient is d(weight_i angle_i)/dp, in the prediction's dtype (fp32 for fp16 inputs: 1/|p| can
    exceed fp16's range before the "mean" division rescales it)."""
    # only unit stride along the bands is needed; rows may be strided
    prediction = prediction if prediction.stride(1) == 1 else prediction.contiguous()
    target = target if target.stride(1) == 1 else target.contiguous()
    n, b = prediction.shape
    device = prediction.device
    weighted = torch.empty(n, device=device, dtype=torch.float32)
    row_weight = torch.empty(n, device=device, dtype=torch.float32)
    grad = None
    if compute_grad:
        grad_dtype = torch.float32 if prediction.dtype == torch.float16 else prediction.dtype
        grad = torch.empty((n, b), device=device, dtype=grad_dtype)
    if n == 0:
        return weighted, row_weight, grad
    if weight is not None:
        # bool / integer masks: the reference takes weight.float()
        weight = (weight if weight.is_floating_point() else weight.float()).contiguous()
    block_n, bb = _block_sizes(n, b, block_b)
    grid = (triton.cdiv(n, block_n),)
    _spectral_angle_fwd_kernel[grid](
        prediction, target, weight if weight is not None else weighted, grad if grad is not None else weighted,
        weighted, row_weight,
        n, b, prediction.stride(0), target.stride(0), grad.stride(0) if grad is not None else 0,
        eps * eps, COSINE_CLAMP,
        HAS_WEIGHT=weight is not None, COMPUTE_GRAD=compute_grad, SINGLE_CHUNK=b <= bb,
        BLOCK_N=block_n, BLOCK_B=bb, num_warps=8 if block_n * bb >= 4096 else 4,
    )
    return weighted, row_weight, grad


class FusedSpectralAngle(torch.autograd.Function):
    """Forward computes the loss and the prediction's gradient; backward only rescales it.

    Gradient only for ``prediction``: None for ``target`` and ``weight``."""

    @staticmethod
    def forward(ctx, prediction, target, weight, reduction, eps, block_b, grad_enabled):
        # grad mode is always off inside forward, and needs_input_grad ignores torch.no_grad(): the caller's
        # grad mode comes in as an argument, so evaluation allocates and writes no gradient
        compute_grad = grad_enabled and ctx.needs_input_grad[0]
        weighted, row_weight, grad = _forward(prediction, target, weight, eps, block_b, compute_grad)
        if reduction == "none":
            out, denominator = weighted, None
        elif reduction == "sum":
            out, denominator = weighted.sum(), None
        else:
            denominator = row_weight.sum().clamp_min(1e-12)  # as the reference: 0 / 1e-12 = 0 if none defined
            out = weighted.sum() / denominator
        ctx.reduction = reduction
        ctx.prediction_dtype = prediction.dtype
        if compute_grad:
            ctx.save_for_backward(grad, denominator)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad, denominator = ctx.saved_tensors
        grad_output = grad_output.float()
        if ctx.reduction == "none":
            scale = grad_output[:, None]
        elif ctx.reduction == "sum":
            scale = grad_output
        else:
            scale = grad_output / denominator
        # scale in fp32, then cast (a bf16 x 0-dim fp32 product would round the scale to bf16 first)
        grad_prediction = (grad.float() * scale).to(ctx.prediction_dtype)
        return grad_prediction, None, None, None, None, None, None


def fused_spectral_angle(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                         reduction: str = "mean", eps: float = 1e-8, block_b: int | None = None) -> torch.Tensor:
    """Spectral angle (radians) of rows [N, B] with the reference's conventions and reductions (see module doc).

    weight: optional [N] row weights (a mask selects rows). block_b: optional power-of-two chunk width along B
    (default: the whole row up to 4096 bands); rows longer than it are processed in chunks. Returns fp32.
    Only ``prediction`` receives a gradient."""
    if prediction.shape != target.shape or prediction.dim() != 2:
        raise ValueError(f"expected two [N, B] tensors of one shape, got {tuple(prediction.shape)} and "
                         f"{tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if weight is not None and weight.shape != prediction.shape[:1]:
        raise ValueError(f"weight must have shape [N] = {tuple(prediction.shape[:1])}, got {tuple(weight.shape)}")
    if target.device != prediction.device or (weight is not None and weight.device != prediction.device):
        raise ValueError("prediction, target and weight must be on one device")
    return FusedSpectralAngle.apply(prediction, target, weight, reduction, eps, block_b, torch.is_grad_enabled())


# ------------------------------------------------------------------------------------------ grouped images

# A program handles one sample and BLOCK_PIX consecutive pixels (contiguous in memory for [N, B, H, W] images, so
# loads coalesce), walking the bands in chunks of BLOCK_B: 16 x 128 fp32 tiles keep ~16 values per thread per
# tile at 4 warps. Not yet timed on a GPU.
_GROUPED_BLOCK_B = 16
_GROUPED_BLOCK_PIX = 128


@triton.jit
def _load_band_chunk(p_pixels, t_pixels, group_ptr, scale_ptr, offset_ptr, sample, c, pixel_ok, B,
                     stride_pb, stride_tb, HAS_AFFINE: tl.constexpr):
    """Bands c of BLOCK_PIX pixels: (spectra of prediction and target [BLOCK_B, BLOCK_PIX] as fp32 after the
    affine map, group id per band (-1: none, or past B), scale per band, mask)."""
    band_ok = c < B
    mask = band_ok[:, None] & pixel_ok[None, :]
    c64 = c.to(tl.int64)
    p = tl.load(p_pixels[None, :] + c64[:, None] * stride_pb, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_pixels[None, :] + c64[:, None] * stride_tb, mask=mask, other=0.0).to(tl.float32)
    band = sample * B + c64
    group = tl.load(group_ptr + band, mask=band_ok, other=-1)
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + band, mask=band_ok, other=0.0)
        offset = tl.load(offset_ptr + band, mask=band_ok, other=0.0)
        p = p * scale[:, None] + offset[:, None]
        t = t * scale[:, None] + offset[:, None]
    else:
        scale = tl.full(c.shape, 1.0, tl.float32)
    return p, t, group, scale, mask


@triton.jit
def _grouped_spectral_angle_fwd_kernel(
    p_ptr, t_ptr, group_ptr, scale_ptr, offset_ptr, w_ptr, grad_ptr, weighted_ptr, pixel_weight_ptr,
    B, HW, W,
    stride_pn, stride_pb, stride_ph, stride_pw, stride_tn, stride_tb, stride_th, stride_tw,
    stride_gn, stride_gb, stride_gh, stride_gw,
    eps_sq, clamp,
    GROUPS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_AFFINE: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_PIX: tl.constexpr,
):
    sample = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0) * BLOCK_PIX + tl.arange(0, BLOCK_PIX)
    pixel_ok = pixels < HW
    row, col = (pixels // W).to(tl.int64), (pixels % W).to(tl.int64)
    p_pixels = p_ptr + sample * stride_pn + row * stride_ph + col * stride_pw
    t_pixels = t_ptr + sample * stride_tn + row * stride_th + col * stride_tw
    bands = tl.arange(0, BLOCK_B)
    group_rows = tl.arange(0, BLOCK_G)[:, None]  # [BLOCK_G, 1]: row g of the per-group sums

    # pass 1: <p, t>, |p|^2, |t|^2 per (group, pixel), fp32; a band adds to its own group's row only
    dot = tl.zeros([BLOCK_G, BLOCK_PIX], dtype=tl.float32)
    pp = tl.zeros([BLOCK_G, BLOCK_PIX], dtype=tl.float32)
    tt = tl.zeros([BLOCK_G, BLOCK_PIX], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        p, t, group, _, _ = _load_band_chunk(p_pixels, t_pixels, group_ptr, scale_ptr, offset_ptr, sample,
                                             start + bands, pixel_ok, B, stride_pb, stride_tb, HAS_AFFINE)
        for g in tl.static_range(GROUPS):
            member = (group == g)[:, None]
            this_row = group_rows == g
            dot += tl.where(this_row, tl.sum(tl.where(member, p * t, 0.0), axis=0)[None, :], 0.0)
            pp += tl.where(this_row, tl.sum(tl.where(member, p * p, 0.0), axis=0)[None, :], 0.0)
            tt += tl.where(this_row, tl.sum(tl.where(member, t * t, 0.0), axis=0)[None, :], 0.0)

    # the angle, exactly as the row kernel
    norms_sq = pp * tt
    defined = norms_sq > eps_sq
    safe_norms_sq = tl.where(defined, norms_sq, 1.0)
    inv_norms = 1.0 / tl.sqrt(safe_norms_sq)
    raw_cosine = tl.where(defined, dot * inv_norms, 1.0)
    cosine = tl.minimum(tl.maximum(raw_cosine, -clamp), clamp)
    angle = tl.where(defined, _arccos(cosine), 0.0)
    out_mask = (group_rows < GROUPS) & pixel_ok[None, :]
    out_index = (sample * GROUPS + group_rows) * HW + pixels[None, :]  # [N, G, H*W], contiguous
    if HAS_WEIGHT:
        given_weight = tl.load(w_ptr + out_index, mask=out_mask, other=0.0).to(tl.float32)
    else:
        given_weight = tl.full([BLOCK_G, BLOCK_PIX], 1.0, tl.float32)
    pixel_weight = given_weight * defined.to(tl.float32)
    tl.store(weighted_ptr + out_index, angle * pixel_weight, mask=out_mask)
    tl.store(pixel_weight_ptr + out_index, pixel_weight, mask=out_mask)

    if COMPUTE_GRAD:
        # as the row kernel, per (group, pixel); then each band takes its group's coefficients, and the affine
        # map's scale (d spectrum / d prediction) multiplies the result
        active = defined & (raw_cosine >= -clamp) & (raw_cosine <= clamp)
        safe_c = tl.where(active, raw_cosine, 0.0)
        pixel_scale = tl.where(active, -pixel_weight / tl.sqrt((1.0 - safe_c) * (1.0 + safe_c)), 0.0)
        t_coef = pixel_scale * inv_norms
        p_coef = -pixel_scale * safe_c / tl.where(defined, pp, 1.0)
        g_pixels = grad_ptr + sample * stride_gn + row * stride_gh + col * stride_gw
        # pass 2: re-read the chunks (mostly from L2) and write the gradient
        for start in range(0, B, BLOCK_B):
            c = start + bands
            p, t, group, scale, mask = _load_band_chunk(p_pixels, t_pixels, group_ptr, scale_ptr, offset_ptr,
                                                        sample, c, pixel_ok, B, stride_pb, stride_tb, HAS_AFFINE)
            band_t_coef = tl.zeros([BLOCK_B, BLOCK_PIX], dtype=tl.float32)
            band_p_coef = tl.zeros([BLOCK_B, BLOCK_PIX], dtype=tl.float32)
            for g in tl.static_range(GROUPS):
                member = (group == g)[:, None]
                this_row = group_rows == g
                band_t_coef = tl.where(member, tl.sum(tl.where(this_row, t_coef, 0.0), axis=0)[None, :],
                                       band_t_coef)
                band_p_coef = tl.where(member, tl.sum(tl.where(this_row, p_coef, 0.0), axis=0)[None, :],
                                       band_p_coef)
            gradient = (band_t_coef * t + band_p_coef * p) * scale[:, None]
            gradient_ptrs = g_pixels[None, :] + c.to(tl.int64)[:, None] * stride_gb
            tl.store(gradient_ptrs, gradient.to(grad_ptr.dtype.element_ty), mask=mask)


def _grouped_forward(prediction, target, membership, weight, scale, offset, eps, blocks, compute_grad):
    """Launch the grouped kernel: (weight * angle [N, G, H, W] fp32, weight * defined [N, G, H, W] fp32, the
    gradient d(sum of weighted angles)/d prediction [N, B, H, W] or None)."""
    n, b, h, w = prediction.shape
    groups = membership.shape[2]
    device = prediction.device
    grad_dtype = torch.float32 if prediction.dtype == torch.float16 else prediction.dtype
    if n * groups * h * w == 0 or b == 0:  # nothing to launch: no angle is defined
        weighted = torch.zeros((n, groups, h, w), device=device, dtype=torch.float32)
        grad = torch.zeros((n, b, h, w), device=device, dtype=grad_dtype) if compute_grad else None
        return weighted, torch.zeros_like(weighted), grad
    # every element of these is written by the kernel
    weighted = torch.empty((n, groups, h, w), device=device, dtype=torch.float32)
    pixel_weight = torch.empty_like(weighted)
    grad = torch.empty((n, b, h, w), device=device, dtype=grad_dtype) if compute_grad else None
    # band -> group id per sample (-1: in no group); bands are in at most one group
    group_ids = torch.where(membership.any(dim=2), membership.to(torch.int32).argmax(dim=2), -1)
    group_ids = group_ids.to(torch.int32).contiguous()
    if weight is not None:
        weight = (weight if weight.is_floating_point() else weight.float()).contiguous()
    has_affine = scale is not None or offset is not None
    if has_affine:
        scale = (torch.ones((n, b), device=device) if scale is None else scale).float().contiguous()
        offset = (torch.zeros((n, b), device=device) if offset is None else offset).float().contiguous()
    block_b, block_pix = blocks
    for name, size in (("block_b", block_b), ("block_pix", block_pix)):
        if size is not None and (size < 1 or size & (size - 1)):
            raise ValueError(f"{name} must be a power of two, got {size}")
    block_b = min(block_b or _GROUPED_BLOCK_B, triton.next_power_of_2(b))
    block_pix = min(block_pix or _GROUPED_BLOCK_PIX, triton.next_power_of_2(h * w))
    grid = (triton.cdiv(h * w, block_pix), n)
    unused = weighted  # any tensor, for pointer arguments a specialisation never reads
    _grouped_spectral_angle_fwd_kernel[grid](
        prediction, target, group_ids, scale if has_affine else unused, offset if has_affine else unused,
        weight if weight is not None else unused, grad if grad is not None else unused, weighted, pixel_weight,
        b, h * w, w, *prediction.stride(), *target.stride(), *(grad.stride() if grad is not None else (0,) * 4),
        eps * eps, COSINE_CLAMP,
        GROUPS=groups, HAS_WEIGHT=weight is not None, HAS_AFFINE=has_affine, COMPUTE_GRAD=compute_grad,
        BLOCK_G=triton.next_power_of_2(groups), BLOCK_B=block_b, BLOCK_PIX=block_pix, num_warps=4,
    )
    return weighted, pixel_weight, grad


class FusedGroupedSpectralAngle(torch.autograd.Function):
    """As ``FusedSpectralAngle`` for grouped images: forward computes the loss and the prediction's gradient,
    backward rescales it (per band by its group's ``grad_output`` for reduction "none").

    Gradient only for ``prediction``: None for everything else."""

    @staticmethod
    def forward(ctx, prediction, target, membership, weight, scale, offset, reduction, eps, blocks, grad_enabled):
        compute_grad = grad_enabled and ctx.needs_input_grad[0]
        weighted, pixel_weight, grad = _grouped_forward(prediction, target, membership, weight, scale, offset,
                                                        eps, blocks, compute_grad)
        if reduction == "none":
            out, denominator = weighted, None
        elif reduction == "sum":
            out, denominator = weighted.sum(), None
        else:
            denominator = pixel_weight.sum().clamp_min(1e-12)
            out = weighted.sum() / denominator
        ctx.reduction = reduction
        ctx.prediction_dtype = prediction.dtype
        if compute_grad:
            ctx.save_for_backward(grad, denominator, membership if reduction == "none" else None)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grad, denominator, membership = ctx.saved_tensors
        grad_output = grad_output.float()
        if ctx.reduction == "none":
            # each band's gradient belongs to its group's angle at that pixel (padded bands: zero anyway)
            scale = torch.einsum("nbg,nghw->nbhw", membership.float(), grad_output)
        elif ctx.reduction == "sum":
            scale = grad_output
        else:
            scale = grad_output / denominator
        grad_prediction = (grad.float() * scale).to(ctx.prediction_dtype)
        return grad_prediction, None, None, None, None, None, None, None, None, None


def fused_grouped_spectral_angle(prediction: torch.Tensor, target: torch.Tensor, membership: torch.Tensor,
                                 weight: torch.Tensor | None = None, reduction: str = "mean", eps: float = 1e-8,
                                 scale: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                                 block_b: int | None = None, block_pix: int | None = None) -> torch.Tensor:
    """Spectral angle per (sample, group, pixel) of images [N, B, H, W], with the conventions, arguments and
    reductions of ``grouped_spectral_angle_reference`` (see sam_loss.py). Every band must be in at most one group.
    Any strides; returns fp32. Only ``prediction`` receives a gradient.

    block_b, block_pix: optional power-of-two tile sizes (bands per chunk, pixels per program; defaults 16, 128),
    so that tests can cover several chunks and programs on tiny images."""
    check_grouped_arguments(prediction, target, membership, weight, scale, offset)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    others = [t for t in (target, membership, weight, scale, offset) if t is not None]
    if any(t.device != prediction.device for t in others):
        raise ValueError("prediction, target, membership, weight, scale and offset must be on one device")
    return FusedGroupedSpectralAngle.apply(prediction, target, membership, weight, scale, offset, reduction, eps,
                                           (block_b, block_pix), torch.is_grad_enabled())
