"""KARMA's linear-spectral-mixing (LSMM) branch: an abundance head on decoder features and a learned endmember
matrix, so the decoder's features must explain each patch as a convex mixture of a few spectra.

    abundances = softmax(MLP_{D -> D/2 -> M}(z))        (non-negative, sum to one)
    r_phys     = A abundances,   A [bands x M]

KARMA learns A for one 218-band sensor. Here A is stored on a fixed wavelength grid (default 350-2550 nm, 10 nm)
and linearly interpolated to each sample's band centres, so the same head serves every band set; bands outside
the grid (SAR, thermal) are reported as invalid and left out of the physics loss.

Per-patch abundances (the paper's choice) are physically exact for a patch-mean spectrum: the mean of linearly
mixed pixels is the same mixture of the mean abundances. ``resolution: pixel`` predicts one vector per pixel.
"""
from __future__ import annotations

import torch
from torch import nn


class LSMMHead(nn.Module):
    def __init__(self, decoder_dim: int, num_endmembers: int, grid_nm: torch.Tensor, patch_size: int,
                 resolution: str = "patch"):
        super().__init__()
        if resolution not in ("patch", "pixel"):
            raise ValueError(f"LSMM resolution must be 'patch' or 'pixel', got {resolution!r}")
        self.num_endmembers = num_endmembers
        self.resolution = resolution
        self.outputs_per_token = patch_size**2 if resolution == "pixel" else 1
        self.abundance_mlp = nn.Sequential(
            nn.Linear(decoder_dim, decoder_dim // 2), nn.GELU(),
            nn.Linear(decoder_dim // 2, num_endmembers * self.outputs_per_token))
        self.register_buffer("grid_nm", grid_nm.float().clone())
        # reflectance-like random start (KARMA initialises A randomly); see endmembers.py for library / VCA starts
        self.endmembers = nn.Parameter(torch.empty(num_endmembers, grid_nm.numel()).uniform_(0.05, 0.6))

    def abundances(self, features: torch.Tensor) -> torch.Tensor:
        """[N, P, Dd] -> [N, P, M] (patch) or [N, P, p*p, M] (pixel)."""
        logits = self.abundance_mlp(features)
        if self.resolution == "pixel":
            logits = logits.view(*logits.shape[:2], self.outputs_per_token, self.num_endmembers)
        return logits.softmax(dim=-1)

    def endmembers_at(self, wavelengths_nm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A at the given band centres: ([N, B, M], valid [N, B]) by linear interpolation on the grid."""
        grid = self.grid_nm
        lam = wavelengths_nm.nan_to_num(-1.0)
        valid = (lam >= grid[0]) & (lam <= grid[-1])
        right = torch.searchsorted(grid, lam.clamp(grid[0], grid[-1]).contiguous()).clamp(1, grid.numel() - 1)
        left = right - 1
        t = ((lam.clamp(grid[0], grid[-1]) - grid[left]) / (grid[right] - grid[left])).unsqueeze(-1)
        spectra = self.endmembers.t()  # [L, M]
        values = spectra[left] * (1 - t) + spectra[right] * t
        return values * valid.unsqueeze(-1), valid

    @torch.no_grad()
    def set_endmembers(self, spectra: torch.Tensor, wavelengths_nm: torch.Tensor) -> None:
        """Initialise A from spectra [M, B] given at ``wavelengths_nm`` (library or VCA), resampled onto the grid."""
        order = wavelengths_nm.argsort()
        lam, values = wavelengths_nm[order].double(), spectra[:, order].double()
        grid = self.grid_nm.double()
        right = torch.searchsorted(lam, grid.clamp(lam[0], lam[-1])).clamp(1, lam.numel() - 1)
        left = right - 1
        t = (grid.clamp(lam[0], lam[-1]) - lam[left]) / (lam[right] - lam[left]).clamp_min(1e-9)
        self.endmembers.copy_((values[:, left] * (1 - t) + values[:, right] * t).float())
