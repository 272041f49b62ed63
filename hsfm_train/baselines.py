"""Trivial masked-reconstruction baselines: what a model must beat before its scores mean anything.

Both take ``image [N, B, H, W]`` (reflectance), ``masked [N, H, W]`` bool (True = hidden pixel, every band hidden)
and optionally ``band_mask [N, B]`` (False = padded band) and ``valid [N, H, W]`` (False = nodata), and return a
full image: visible pixels are the input (the MAE convention), masked pixels are filled from the *source*
pixels of the same image, i.e. those visible and valid (a nodata pixel holds a placeholder, not a spectrum).
Bands outside ``band_mask`` come back as 0, as padding.

An image without a source pixel (fully masked, or only nodata visible) has nothing of its own to copy: its masked
pixels get the mean spectrum of all source pixels of the batch (per band, over the images that have that band;
0 where no image has a source pixel). That fallback assumes a band index means the same wavelength across the
batch, which holds for bucket batching (one band set per batch; what evaluation uses).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["nearest_visible_fill", "visible_mean_fill"]


def _check(image: torch.Tensor, masked: torch.Tensor, band_mask: torch.Tensor | None,
           valid: torch.Tensor | None) -> None:
    if image.dim() != 4:
        raise ValueError(f"image must be [N, B, H, W]; got shape {tuple(image.shape)}")
    n, b, h, w = image.shape
    for name, tensor, shape in (("masked", masked, (n, h, w)), ("band_mask", band_mask, (n, b)),
                                ("valid", valid, (n, h, w))):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must be {shape} for image {tuple(image.shape)}; got {tuple(tensor.shape)}")


def _sources(masked: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """[N, H, W] bool: the pixels a fill may copy from."""
    source = ~masked.bool()
    return source & valid.bool() if valid is not None else source


def _bands(image: torch.Tensor, band_mask: torch.Tensor | None) -> torch.Tensor:
    """[N, B] float64 weights of the real bands."""
    if band_mask is None:
        return torch.ones(image.shape[:2], dtype=torch.float64, device=image.device)
    return band_mask.to(device=image.device, dtype=torch.float64)


def _source_means(image: torch.Tensor, source: torch.Tensor, bands: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean spectrum of the source pixels [N, B] (float64), and the batch fallback [B]."""
    weight = source.to(torch.float64).unsqueeze(1)  # [N, 1, H, W]
    sums = (image.to(torch.float64) * weight).sum((2, 3))  # [N, B]
    counts = weight.sum((2, 3))  # [N, 1]
    per_image = sums / counts.clamp_min(1)
    # pooled over the batch's source pixels, per band, only from images that have that band
    pooled_counts = (counts * bands).sum(0)  # [B]
    fallback = (sums * bands).sum(0) / pooled_counts.clamp_min(1)
    return per_image, fallback


def _assemble(image: torch.Tensor, masked: torch.Tensor, fill: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    out = torch.where(masked.bool().unsqueeze(1), fill.to(image.dtype), image)
    return out * bands.to(image.dtype)[:, :, None, None]


@torch.no_grad()
def visible_mean_fill(image: torch.Tensor, masked: torch.Tensor, band_mask: torch.Tensor | None = None,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Every masked pixel gets the mean spectrum of its image's source (visible, valid) pixels."""
    _check(image, masked, band_mask, valid)
    source = _sources(masked, valid)
    bands = _bands(image, band_mask)
    per_image, fallback = _source_means(image, source, bands)
    has_source = source.flatten(1).any(1)
    mean = torch.where(has_source[:, None], per_image, fallback[None, :])  # [N, B]
    return _assemble(image, masked, mean[:, :, None, None].expand(image.shape), bands)


@torch.no_grad()
def nearest_visible_fill(image: torch.Tensor, masked: torch.Tensor, band_mask: torch.Tensor | None = None,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """Every masked pixel gets the spectrum of the nearest source (visible, valid) pixel of its image.

    Nearest in Euclidean pixel distance, from scipy's exact distance transform; among equally near pixels the
    transform's choice is deterministic (same input, same answer), not a documented order.
    """
    _check(image, masked, band_mask, valid)
    n, b, h, w = image.shape
    source = _sources(masked, valid)
    bands = _bands(image, band_mask)
    has_source = source.flatten(1).any(1)
    # index of each pixel's nearest source pixel, flattened over H*W; identity where there is no source
    index = np.broadcast_to(np.arange(h * w, dtype=np.int64), (n, h * w)).copy()
    not_source = (~source).cpu().numpy()
    for i in np.flatnonzero(has_source.cpu().numpy()):
        if not not_source[i].any():
            continue  # nothing hidden: every pixel is its own source
        # the transform measures distance to the nearest zero element, so the sources are the zeros
        rows, cols = ndimage.distance_transform_edt(not_source[i], return_distances=False, return_indices=True)
        index[i] = (rows * w + cols).reshape(-1)
    index_t = torch.from_numpy(index).to(image.device)[:, None, :].expand(n, b, h * w)
    nearest = image.flatten(2).gather(2, index_t).view(n, b, h, w)
    if not bool(has_source.all()):
        _, fallback = _source_means(image, source, bands)
        nearest = torch.where(has_source[:, None, None, None], nearest,
                              fallback.to(image.dtype)[None, :, None, None].expand(image.shape))
    return _assemble(image, masked, nearest, bands)
