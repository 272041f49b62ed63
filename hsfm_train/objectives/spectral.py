"""Spectral terms: the spectral angle of masked reconstructions and KARMA's LSMM physics consistency.

Both are computed in reflectance units (the loader's per-band normalisation undone with the batch's
``band_mean`` / ``band_std``): an angle between band-standardised vectors is not a spectral angle.
"""
from __future__ import annotations

import torch

from hsfm_train.kernels import spectral_angle_loss
from hsfm_train.models.heads import LSMMHead
from hsfm_train.models.mae import MAEOutput


def masked_spectral_angle(out: MAEOutput, prediction: torch.Tensor, target: torch.Tensor,
                          band_mask: torch.Tensor) -> torch.Tensor:
    """Mean angle (radians) between predicted and true spectra of masked tokens' pixels, per spectral group:
    bands outside a group are zeroed, which removes them from dot products and norms alike."""
    rows, cols = out.grid
    p = out.patch_size
    predicted, true, weights = [], [], []
    for slot in range(out.present.numel()):
        member = (out.membership[..., int(out.present[slot])] & band_mask).to(prediction.dtype)[:, :, None, None]
        predicted.append((prediction * member).permute(0, 2, 3, 1).reshape(-1, prediction.shape[1]))
        true.append((target * member).permute(0, 2, 3, 1).reshape(-1, target.shape[1]))
        pixels = out.token_mask[:, slot].view(-1, rows, cols).repeat_interleave(p, 1).repeat_interleave(p, 2)
        weights.append(pixels.flatten().float())
    return spectral_angle_loss(torch.cat(predicted), torch.cat(true), torch.cat(weights), reduction="mean")


def lsmm_physics(out: MAEOutput, head: LSMMHead, hsi: torch.Tensor, wavelengths: torch.Tensor,
                 band_mean: torch.Tensor, band_std: torch.Tensor, band_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error, in band-normalised units, between A x_hat and the input: the patch-mean spectrum
    (patch abundances) or every pixel (pixel abundances), over all patches and the bands the grid covers."""
    if out.abundances is None:
        raise ValueError("the physics term needs the model's LSMM head (model.lsmm.num_endmembers > 0)")
    endmembers, covered = head.endmembers_at(wavelengths)  # [N, B, M]
    rows, cols = out.grid
    p = out.patch_size
    n, bands = hsi.shape[:2]
    pixels = hsi.float().view(n, bands, rows, p, cols, p).permute(0, 1, 2, 4, 3, 5).reshape(n, bands, rows * cols, p * p)
    if head.resolution == "patch":
        mixed = torch.einsum("nbm,npm->nbp", endmembers, out.abundances).unsqueeze(-1)
        target = pixels.mean(dim=-1, keepdim=True)
    else:
        mixed = torch.einsum("nbm,npxm->nbpx", endmembers, out.abundances)
        target = pixels
    mixed = (mixed - band_mean[:, :, None, None]) / band_std[:, :, None, None]
    weight = (covered & band_mask).float()[:, :, None, None]
    error = ((mixed - target) ** 2) * weight
    return error.sum() / (weight.sum() * target.shape[2] * target.shape[3]).clamp_min(1.0)
