"""Transformer blocks (pre-norm ViT) on PyTorch's scaled_dot_product_attention, and fixed 2-D sin-cos positions.

Positions are computed for whatever patch grid arrives, so a backbone trained on 32x32 tiles runs on 64x64 ones
without interpolating a learned table (HyperSIGMA's Linear(H*W -> D) embedding ties the model to one size).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # q, k, v are strided views of one projection with the head dim innermost (stride 1), in the projection's
        # dtype (bf16 under autocast) and without a mask: what the flash and memory-efficient kernels accept, so
        # nothing here sends SDPA to its math fallback (tests/test_models.py checks the call's arguments)
        q, k, v = rearrange(self.qkv(x), "n t (three h d) -> three n h t d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "n h t d -> n t (h d)"))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def _residual(self, branch: torch.Tensor) -> torch.Tensor:
        # stochastic depth per sample; identity at evaluation or rate 0
        if not self.training or self.drop_path == 0.0:
            return branch
        keep = torch.rand(branch.shape[0], 1, 1, device=branch.device) >= self.drop_path
        return branch * keep / (1.0 - self.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._residual(self.attn(self.norm1(x)))
        return x + self._residual(self.mlp(self.norm2(x)))


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """``x`` through ``blocks`` in turn; with ``checkpointing`` each block's activations are dropped after its
    forward and recomputed in backward (non-reentrant, the RNG state kept, so stochastic depth draws the same mask
    when recomputed and the global RNG ends where it would without checkpointing)."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False, preserve_rng_state=True) if checkpointing else block(x)
    return x


def sincos_2d(dim: int, rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """[rows*cols, dim] fixed 2-D sin-cos embedding (MAE's): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))
    grid_r, grid_c = torch.meshgrid(torch.arange(rows, dtype=torch.float64, device=device),
                                    torch.arange(cols, dtype=torch.float64, device=device), indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.flatten()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(grid_r), encode(grid_c)], dim=1).float()


def init_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
