"""Wavelength-conditioned spectral-spatial tokens, so one backbone accepts any band set.

Encoding. Each band's centre wavelength is mapped by a small MLP to K coefficients: K learned spectral response
functions r_k(lambda), like the filters of a virtual sensor. A band set is integrated against them,
    v_k(x, y) = sum_b r_k(lambda_b) w_b I_b(x, y),
with quadrature weights w_b proportional to the spectral width each band covers (half the distance to its
neighbours), normalised per group. The virtual channels v are then (approximately) the same for the same
surface seen by Samson (156 bands, 3 nm), AVIRIS (224 bands, 10 nm) or EnMAP (218 bands), so nothing is
re-initialised for a new band count, and the token count does not depend on the band count.

Spectral groups. Bands are grouped by wavelength range (default: VNIR < 1000 nm, SWIR < 100 um, microwave / SAR
beyond), and each present group gives its own token per spatial patch: tokens are (group, patch) pairs, masked
independently (SatMAE found independent masking per band group better than consistent masking). RGB gives one
group (VNIR), a 1-band SAR image one group (microwave), AVIRIS two.

Decoding. The decoder predicts, per token, K' coefficient maps; a second wavelength MLP gives each band a basis
vector d(lambda_b) in R^K' and a bias, and the prediction for band b is <d(lambda_b), coefficients of b's group>
+ bias(lambda_b). Any band set can thus be reconstructed from one head.

Wavelengths are encoded on a log scale: optical (0.4-2.5 um) and C-band SAR (5.5 cm) differ by five orders of
magnitude, and spectral detail scales roughly with wavelength.
"""
from __future__ import annotations

from typing import Callable

import math

import torch
from torch import nn

from hsfm_train.errors import DataFormatError

# log-wavelength range of the Fourier features: 200 nm (UV) to 1 m (L/P-band SAR)
_LOG_MIN, _LOG_MAX = math.log(200.0), math.log(1e9)


class WavelengthFeatures(nn.Module):
    """Fourier features of normalised log-wavelength, frequencies geometric up to a ~3 nm period at 1 um."""

    def __init__(self, num_frequencies: int = 32, max_frequency: float = 4096.0):
        super().__init__()
        frequencies = torch.logspace(0, math.log10(max_frequency), num_frequencies) * math.pi
        self.register_buffer("frequencies", frequencies, persistent=False)
        self.dim = 2 * num_frequencies + 1

    def forward(self, wavelengths_nm: torch.Tensor) -> torch.Tensor:
        u = (torch.log(wavelengths_nm.clamp_min(1.0)) - _LOG_MIN) / (_LOG_MAX - _LOG_MIN)
        angles = u.unsqueeze(-1) * self.frequencies
        return torch.cat([angles.sin(), angles.cos(), u.unsqueeze(-1)], dim=-1)


class SpectralResponse(nn.Module):
    """wavelength (nm) -> a vector of ``out_dim`` learned response values (MLP on Fourier features)."""

    def __init__(self, out_dim: int, hidden_dim: int = 128, num_frequencies: int = 32):
        super().__init__()
        self.features = WavelengthFeatures(num_frequencies)
        self.mlp = nn.Sequential(nn.Linear(self.features.dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, wavelengths_nm: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(wavelengths_nm))


def band_groups(wavelengths_nm: torch.Tensor, band_mask: torch.Tensor, edges_nm: list[float]) -> torch.Tensor:
    """One-hot group membership [N, B, G] (G = len(edges) + 1); padded bands belong to no group."""
    boundaries = torch.tensor(edges_nm, dtype=wavelengths_nm.dtype, device=wavelengths_nm.device)
    index = torch.bucketize(wavelengths_nm.nan_to_num(0.0), boundaries, right=True)
    membership = nn.functional.one_hot(index, len(edges_nm) + 1).to(torch.bool)
    return membership & band_mask.unsqueeze(-1)


def quadrature_weights(wavelengths_nm: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """Per-band weights [N, B] proportional to the spectral width each band covers within its group, summing to
    one per (sample, group): a band-density-independent average over the group's bands."""
    weights = torch.zeros_like(wavelengths_nm)
    for group in range(membership.shape[-1]):
        member = membership[..., group]
        if not member.any():
            continue
        # sort the group's bands (non-members pushed to +inf); width = half the distance between neighbours
        lam = torch.where(member, wavelengths_nm, torch.full_like(wavelengths_nm, float("inf")))
        lam_sorted, order = lam.sort(dim=1)
        finite = torch.isfinite(lam_sorted)
        prev = torch.cat([lam_sorted[:, :1], lam_sorted[:, :-1]], dim=1)
        nxt = torch.cat([lam_sorted[:, 1:], lam_sorted[:, -1:]], dim=1)
        nxt = torch.where(torch.isfinite(nxt), nxt, lam_sorted)  # the last real band has no right neighbour
        left, right = lam_sorted - prev, nxt - lam_sorted  # 0 on the open side of the end bands
        # trapezoid widths, but a side may count at most twice the other: a band beside a gap (removed water
        # bands) does not take the gap's weight, and a change of sampling density stays a local effect
        both = (left > 0) & (right > 0)
        width = torch.where(both, (torch.minimum(left, 2 * right) + torch.minimum(right, 2 * left)) / 2,
                            (left + right) / 2)
        width = torch.where(finite, width, torch.zeros_like(width))
        counts = finite.sum(dim=1, keepdim=True)
        # one-band groups (SAR) and coincident wavelengths: fall back to equal weights
        degenerate = (width.sum(dim=1, keepdim=True) <= 0) | (counts == 1)
        width = torch.where(degenerate & finite, torch.ones_like(width), width)
        width = width / width.sum(dim=1, keepdim=True).clamp_min(1e-12)
        weights = weights + torch.zeros_like(width).scatter(1, order, width) * member
    return weights


def check_wavelengths(wavelengths_nm: torch.Tensor, band_mask: torch.Tensor) -> None:
    """Every real band needs a finite, positive centre wavelength: the tokenizer is defined by it."""
    bad = band_mask & ~(torch.isfinite(wavelengths_nm) & (wavelengths_nm > 0))
    if bad.any():
        sample, band = (int(i) for i in bad.nonzero()[0])
        raise DataFormatError(
            f"band {band} of sample {sample} has no valid wavelength ({float(wavelengths_nm[sample, band])}); the "
            "wavelength-conditioned tokenizer needs every band's centre wavelength in nm: rebuild the shards with "
            "wavelengths (reader option wavelengths_nm)")


def run_group_modules(per_group: nn.ModuleList, present: torch.Tensor, inputs: Callable[[int, int], torch.Tensor],
                      every_module: bool, example: Callable[[], torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The outputs of the group modules a batch uses (``inputs(slot, group)`` feeds the module of ``group``, the
    ``slot``-th present one), and 0. With ``every_module``, the 0 is computed by running every other group module on
    a zero ``example()``, all in group order, so that each module runs and gets a zero gradient rather than none on
    every rank. Sharded engines need it: FSDP2 reduces one gradient layout on every rank and ZeRO-3 gathers a
    module's parameters when it runs, so ranks whose batches hold other spectral groups would otherwise disagree."""
    slots = {group: slot for slot, group in enumerate(present.tolist())}
    outputs, unused = [], []
    for group in (range(len(per_group)) if every_module else slots):
        if group in slots:
            outputs.append(per_group[group](inputs(slots[group], group)))
        else:
            unused.append(per_group[group](example()).sum())
    return outputs, (torch.stack(unused).sum() * 0.0 if unused else None)


class SpectralPatchEmbed(nn.Module):
    """[N, B, H, W] + wavelengths [N, B] -> tokens [N, G_present, P, D] and the group bookkeeping."""

    every_parameter_in_graph = False  # set by engines that need a gradient for every parameter on every rank

    def __init__(self, embed_dim: int, patch_size: int, spectral_channels: int, group_edges_nm: list[float]):
        super().__init__()
        self.patch_size = patch_size
        self.group_edges_nm = list(group_edges_nm)
        self.num_groups = len(self.group_edges_nm) + 1
        self.response = SpectralResponse(spectral_channels)
        # one patch projection per spectral group: VNIR, SWIR and SAR statistics differ
        self.projections = nn.ModuleList(
            nn.Conv2d(spectral_channels, embed_dim, patch_size, stride=patch_size) for _ in range(self.num_groups))

    def forward(self, hsi: torch.Tensor, wavelengths_nm: torch.Tensor, band_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns tokens [N, Gp, P, D], membership [N, B, G] and the present group ids [Gp]."""
        n, _, height, width = hsi.shape
        if height % self.patch_size or width % self.patch_size:
            raise DataFormatError(f"tile {height}x{width} is not divisible by the patch size {self.patch_size}; "
                                  "set data.crop_size to a multiple of it")
        check_wavelengths(wavelengths_nm, band_mask)
        membership = band_groups(wavelengths_nm, band_mask, self.group_edges_nm)
        weights = quadrature_weights(wavelengths_nm, membership)
        response = self.response(wavelengths_nm.nan_to_num(1.0)) * weights.unsqueeze(-1)  # [N, B, K]
        present = membership.flatten(0, 1).any(dim=0).nonzero().flatten()
        def virtual_bands(slot: int, group: int) -> torch.Tensor:
            group_response = response * membership[..., group].unsqueeze(-1)
            return torch.einsum("nbk,nbhw->nkhw", group_response, hsi)

        channels = self.projections[0].in_channels
        outputs, zero = run_group_modules(self.projections, present, virtual_bands, self.every_parameter_in_graph,
                                          lambda: hsi.new_zeros(1, channels, self.patch_size, self.patch_size))
        tokens = torch.stack([out.flatten(2).transpose(1, 2) for out in outputs], dim=1)  # [N, Gp, P, D]
        if zero is not None:
            tokens = tokens + zero
        return tokens, membership, present


class SpectralPatchDecoder(nn.Module):
    """Decoder tokens [N, Gp, P, Dd] -> per-band prediction [N, B, H, W] for any band set."""

    every_parameter_in_graph = False  # see SpectralPatchEmbed

    def __init__(self, decoder_dim: int, patch_size: int, basis_size: int, num_groups: int):
        super().__init__()
        self.patch_size = patch_size
        self.basis_size = basis_size
        self.heads = nn.ModuleList(nn.Linear(decoder_dim, basis_size * patch_size**2) for _ in range(num_groups))
        self.basis = SpectralResponse(basis_size + 1)  # basis vector d(lambda) and a per-band bias

    def forward(self, tokens: torch.Tensor, wavelengths_nm: torch.Tensor, membership: torch.Tensor,
                present: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, _, patches, _ = tokens.shape
        rows, cols = grid
        p = self.patch_size
        basis = self.basis(wavelengths_nm.nan_to_num(1.0))  # [N, B, K'+1]
        basis, bias = basis[..., :-1], basis[..., -1]
        prediction = bias[:, :, None, None].expand(-1, -1, patches, p * p) * 1.0
        outputs, zero = run_group_modules(self.heads, present, lambda slot, group: tokens[:, slot],
                                          self.every_parameter_in_graph, lambda: tokens.new_zeros(1, tokens.shape[-1]))
        for output, group in zip(outputs, present.tolist()):
            coefficients = output.view(n, patches, self.basis_size, p * p)
            member = membership[..., group].to(tokens.dtype)
            prediction = prediction + torch.einsum("nbk,npkx->nbpx", basis * member.unsqueeze(-1), coefficients)
        if zero is not None:
            prediction = prediction + zero
        # [N, B, P, p*p] -> [N, B, H, W]
        bands = prediction.shape[1]
        prediction = prediction.view(n, bands, rows, cols, p, p).permute(0, 1, 2, 4, 3, 5)
        return prediction.reshape(n, bands, rows * p, cols * p)
