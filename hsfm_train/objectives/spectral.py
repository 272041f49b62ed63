"""Spectral terms: the spectral angle of masked reconstructions and KARMA's LSMM physics consistency.

Both are computed in reflectance units (the loader's per-band normalisation undone with the batch's
``band_mean`` / ``band_std``): an angle between band-standardised vectors is not a spectral angle.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from hsfm_train.kernels import grouped_spectral_angle_loss
from hsfm_train.models.heads import LSMMHead
from hsfm_train.models.mae import MAEOutput


def masked_spectral_angle(out: MAEOutput, prediction: torch.Tensor, target: torch.Tensor, band_mask: torch.Tensor,
                          band_mean: torch.Tensor | None = None, band_std: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Mean angle (radians) between predicted and true spectra of masked tokens' pixels, per spectral group:
    each (pixel, group) angle is over that group's bands only.

    prediction, target: [N, B, H, W] in reflectance, or band-normalised when ``band_mean`` / ``band_std`` [N, B]
    are given (the kernel then undoes the normalisation as it reads, instead of building reflectance copies)."""
    rows, cols = out.grid
    p = out.patch_size
    membership = out.membership[:, :, out.present] & band_mask[:, :, None]  # [N, B, G]
    tokens = out.token_mask.view(*out.token_mask.shape[:2], rows, cols)
    pixels = tokens.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3).float()  # [N, G, H, W]
    return grouped_spectral_angle_loss(prediction, target, membership, pixels, reduction="mean",
                                       scale=band_std, offset=band_mean)


def lsmm_physics(out: MAEOutput, head: LSMMHead, hsi: torch.Tensor, wavelengths: torch.Tensor,
                 band_mean: torch.Tensor, band_std: torch.Tensor, band_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error, in band-normalised units, between A x_hat and the input: the patch-mean spectrum
    (patch abundances) or every pixel (pixel abundances), over all patches and the bands the grid covers."""
    if out.abundances is None:
        raise ValueError("the physics term needs the model's LSMM head (model.lsmm.num_endmembers > 0)")
    endmembers, covered = head.endmembers_at(wavelengths)  # [N, B, M]
    rows, cols = out.grid
    p = out.patch_size
    n = hsi.shape[0]
    if head.resolution == "patch":
        mixed = torch.einsum("nbm,npm->nbp", endmembers, out.abundances)  # [N, B, P]
        target = F.avg_pool2d(hsi.float(), p).flatten(2)  # patch means, read in place (no patch-major copy)
    else:
        # pixel abundances [N, P, p*p, M] are patch-major; the mixture is laid out as the image instead
        abundances = out.abundances.view(n, rows, cols, p, p, out.abundances.shape[-1])
        mixed = torch.einsum("nbm,nrcyxm->nbrycx", endmembers, abundances).reshape(n, hsi.shape[1], -1)
        target = hsi.float().flatten(2)  # [N, B, H*W]
    mixed = (mixed - band_mean[:, :, None]) / band_std[:, :, None]
    weight = (covered & band_mask).float()[:, :, None]
    error = ((mixed - target) ** 2) * weight
    return error.sum() / (weight.sum() * target.shape[2]).clamp_min(1.0)
