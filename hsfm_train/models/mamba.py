"""A Mamba-1 block and the dual-branch spatial-spectral Mamba network for image-level unmixing.

    MambaBlock         pre-norm residual Mamba-1 mixer over sequences (batch, L, d_model)
    SpatialMamba2D     the same mixer over an S x S token grid scanned in four directions (row-major and
                       column-major, each forwards and backwards), the four scans batched into one selective scan
    DualBranchUnmixer  shared conv features F_L [C, H, W] -> (spatial: pool to S x S, 2-D Mamba, bilinear upsample)
                       and (spectral: the H*W pixels in raster order as one sequence of width C) -> concatenated,
                       1x1 conv, per-pixel MLP -> softmax abundances [P, R]; decoder X_hat = A E, E >= 0 [R, B]

The selective scan is ``hsfm_train.kernels.selective_scan_fn`` (Triton on CUDA, a chunked parallel scan on CPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hsfm_train.kernels import selective_scan_fn


class MambaBlock(nn.Module):
    """Mamba-1: in_proj -> (x, z); causal depthwise conv + SiLU on x; x_proj -> (dt, B, C); dt_proj -> delta;
    selective scan with A = -exp(A_log) (S4D-real), D skip and the SiLU(z) gate; out_proj. ``forward`` adds the
    pre-norm residual; ``mix`` is the mixer alone on (batch, D_inner-first) tensors so that callers can reorder
    the sequence between the input projection and the scan (the 2-D block does)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=False)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        # softplus(dt_bias) log-uniform in [dt_min, dt_max], as Mamba initialises its step sizes
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, L, d_model) -> xz (batch, 2 * d_inner, L)."""
        return self.in_proj(self.norm(h)).transpose(1, 2)

    def mix(self, xz: torch.Tensor) -> torch.Tensor:
        """xz (batch, 2 * d_inner, L) in scan order -> y (batch, d_inner, L), before out_proj."""
        length = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :length])  # the left padding keeps the conv causal
        dt, b, c = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)
        a = -torch.exp(self.A_log.float())
        return selective_scan_fn(x, delta, a, b.transpose(1, 2).contiguous(), c.transpose(1, 2).contiguous(), self.D,
                                 z=z, delta_bias=self.dt_bias, delta_softplus=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model), causal along L."""
        return h + self.out_proj(self.mix(self.project(h)).transpose(1, 2))


class SpatialMamba2D(nn.Module):
    """A Mamba block over an S x S grid of tokens (batch, S*S, d_model) in row-major order: the grid is scanned
    row-major and column-major, forwards and backwards (one selective scan over a batch four times larger), each
    output put back in row-major order, and the four averaged, so every token sees the tokens on all sides."""

    def __init__(self, d_model: int, **mamba: int):
        super().__init__()
        self.block = MambaBlock(d_model, **mamba)

    @staticmethod
    def orders(size: int, device: torch.device) -> torch.Tensor:
        """[4, S*S]: the row-major token index at each step of each of the four scans."""
        grid = torch.arange(size * size, device=device).view(size, size)
        rows, columns = grid.flatten(), grid.t().flatten()
        return torch.stack([rows, rows.flip(0), columns, columns.flip(0)])

    def forward(self, h: torch.Tensor, size: int) -> torch.Tensor:
        batch, length, _ = h.shape
        if length != size * size:
            raise ValueError(f"expected {size} x {size} = {size * size} tokens, got {length}")
        orders = self.orders(size, h.device)
        xz = self.block.project(h)  # (batch, 2 d_inner, L)
        scans = xz[:, :, orders].permute(2, 0, 1, 3).reshape(4 * batch, xz.shape[1], length)
        y = self.block.mix(scans).view(4, batch, -1, length)
        back = torch.argsort(orders, dim=1)  # row-major position -> step of each scan
        merged = torch.stack([y[k][:, :, back[k]] for k in range(4)]).mean(0)
        return h + self.block.out_proj(merged.transpose(1, 2))


class DualBranchUnmixer(nn.Module):
    """Image [1, B, H, W] -> abundances [H*W, R] (softmax over R); ``reconstruct`` applies the linear mixing model
    with the non-negative endmember matrix ``endmembers`` [R, B] (a parameter, in the cube's units divided by
    ``scale``; the caller keeps it non-negative after each step)."""

    def __init__(self, bands: int, count: int, features: int = 64, pooled_size: int = 16, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, endmembers: torch.Tensor | None = None, scale: float = 1.0):
        super().__init__()
        self.pooled_size = pooled_size
        groups = math.gcd(8, features)
        self.low_level = nn.Sequential(
            nn.Conv2d(bands, features, 3, padding=1), nn.GroupNorm(groups, features), nn.SiLU(),
            nn.Conv2d(features, features, 3, padding=1), nn.GroupNorm(groups, features), nn.SiLU())
        mamba = {"d_state": d_state, "d_conv": d_conv, "expand": expand}
        self.spatial = SpatialMamba2D(features, **mamba)
        self.spectral = MambaBlock(features, **mamba)
        self.fuse = nn.Conv2d(2 * features, features, 1)
        self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(features, features // 2, 1), nn.SiLU(),
                                  nn.Conv2d(features // 2, count, 1))
        # E in units of the scene's scale, so that the endmember learning rate means the same on every scene
        self.scale = float(scale)
        start = endmembers / self.scale if endmembers is not None else torch.rand(count, bands)
        self.endmembers = nn.Parameter(start.float().clone())

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """[1, B, H, W] -> fused features [1, C, H, W]."""
        low = self.low_level(image / self.scale)
        _, channels, height, width = low.shape
        size = self.pooled_size
        pooled = F.adaptive_avg_pool2d(low, size).flatten(2).transpose(1, 2)  # (1, S*S, C) row-major
        spatial = self.spatial(pooled, size).transpose(1, 2).reshape(1, channels, size, size)
        spatial = F.interpolate(spatial, size=(height, width), mode="bilinear", align_corners=False)
        pixels = low.flatten(2).transpose(1, 2)  # (1, H*W, C): the pixels in raster order are the sequence
        spectral = self.spectral(pixels).transpose(1, 2).reshape(1, channels, height, width)
        return self.fuse(torch.cat([spatial, spectral], dim=1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(image))  # [1, R, H, W]
        return torch.softmax(logits, dim=1).flatten(2)[0].t()  # [H*W, R]

    def endmember_matrix(self) -> torch.Tensor:
        """[R, B] in the cube's units."""
        return self.endmembers * self.scale

    def reconstruct(self, abundances: torch.Tensor) -> torch.Tensor:
        return abundances @ self.endmember_matrix()

    @torch.no_grad()
    def project_endmembers(self) -> None:
        self.endmembers.clamp_(min=0.0)
