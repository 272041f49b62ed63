"""Parameter-efficient adaptation of a frozen ViT backbone: coalescent projection, LoRA, or nothing.

Few labelled pixels cannot retrain a foundation model without overfitting it, so the backbone stays frozen and
only a handful of new parameters learn:

    cp      coalescent projection: one matrix C [d, d] per head per layer between queries and keys,
            attention = softmax((q * d**-0.5) C k^T) v, C initialised to identity + trunc-normal(std), so the
            adapted model starts where the frozen one is (``heads * d * d`` parameters per layer)
    lora    a low-rank update of the qkv projection, W x + (alpha / r) B A x, B zero at init (the model starts
            unchanged; ``r * (dim + 3 * dim)`` parameters per layer)
    linear  no adapter: the backbone is frozen whole and only the downstream head trains

:func:`apply_adapter` freezes every parameter of the model and replaces each encoder block's ``attn`` by a wrapper
that reuses the original module's ``qkv`` and ``proj`` (the same frozen parameters, under the same state-dict
names, so an exported backbone loads into an adapted model with ``strict=False`` and only the adapter's keys left
missing). Only the encoder (``model.blocks``) is adapted: few-shot classification reads the encoder's tokens.
Stochastic depth still follows ``model.train()``/``model.eval()``; a frozen backbone is normally kept in eval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from hsfm_train.errors import ConfigError
from hsfm_train.models.vit import Attention

ADAPTER_KINDS = ("cp", "lora", "linear")


@dataclass
class AdapterConfig:
    kind: str = "cp"  # one of ADAPTER_KINDS
    lora_rank: int = 8  # r
    lora_alpha: float = 8.0  # the update is scaled by alpha / r
    cp_init_std: float = 0.02  # C = identity + trunc-normal(std), truncated at +-2 std

    def problems(self) -> list[str]:
        problems = []
        if self.kind not in ADAPTER_KINDS:
            problems.append(f"adapter.kind must be one of {', '.join(ADAPTER_KINDS)}, got {self.kind!r}")
        if self.lora_rank < 1:
            problems.append(f"adapter.lora_rank must be >= 1, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            problems.append(f"adapter.lora_alpha must be > 0, got {self.lora_alpha}")
        if self.cp_init_std < 0:
            problems.append(f"adapter.cp_init_std must be >= 0, got {self.cp_init_std}")
        return problems


class _AdaptedAttention(nn.Module):
    """The frozen attention's computation with two hooks: the qkv projection and the queries."""

    def __init__(self, attention: Attention):
        super().__init__()
        self.num_heads = attention.num_heads
        # the original's own submodules (not copies): frozen weights shared, state-dict names unchanged
        self.qkv = attention.qkv
        self.proj = attention.proj

    @property
    def head_dim(self) -> int:
        return self.qkv.in_features // self.num_heads

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)

    def steer_queries(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.project(x), "n t (three h d) -> three n h t d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(self.steer_queries(q), k, v)
        return self.proj(rearrange(out, "n h t d -> n t (h d)"))


class CoalescentAttention(_AdaptedAttention):
    """softmax((q C) k^T / sqrt(d)) v with one learnable C [d, d] per head: SDPA's own scaling of (q C) is the
    same as scaling q first, so the frozen path and its fused kernels are kept."""

    def __init__(self, attention: Attention, init_std: float = 0.02):
        super().__init__(attention)
        d = self.head_dim
        weight = attention.qkv.weight
        # drawn on the CPU, then moved: the same seed gives the same C on every device
        coalescent = torch.eye(d, dtype=weight.dtype).repeat(self.num_heads, 1, 1)
        noise = torch.empty_like(coalescent)
        if init_std > 0:
            # truncated at +-2 std (torch's default bounds are +-2 absolute, no truncation at this scale)
            nn.init.trunc_normal_(noise, std=init_std, a=-2 * init_std, b=2 * init_std)
        else:
            noise.zero_()
        self.coalescent = nn.Parameter((coalescent + noise).to(weight.device))

    def steer_queries(self, q: torch.Tensor) -> torch.Tensor:
        return torch.matmul(q, self.coalescent.to(q.dtype))  # [n, h, t, d] @ [h, d, d]


class LoRAAttention(_AdaptedAttention):
    """qkv(x) + (alpha / r) B A x: A [r, dim] kaiming-uniform (as nn.Linear initialises its weight), B [3*dim, r]
    zero, so the update, and the change to the model, start at zero while A's gradient path is open."""

    def __init__(self, attention: Attention, rank: int = 8, alpha: float = 8.0):
        super().__init__(attention)
        weight = attention.qkv.weight
        out_features, in_features = weight.shape
        self.scaling = alpha / rank
        start = torch.empty(rank, in_features, dtype=weight.dtype)  # drawn on the CPU, as C above
        nn.init.kaiming_uniform_(start, a=math.sqrt(5))
        self.lora_a = nn.Parameter(start.to(weight.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x) + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)


def _encoder_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(getattr(b, "attn", None), nn.Module) for b in blocks):
        raise ConfigError(f"{type(model).__name__} has no encoder `blocks` with an `attn` module each: "
                          "cp and lora adapt ViT attention only (use kind=linear)")
    return list(blocks)


def apply_adapter(model: nn.Module, config: AdapterConfig | str = "cp", seed: int | None = None,
                  **settings) -> nn.Module:
    """Freeze every parameter of ``model`` and insert the adapter ``config`` (an :class:`AdapterConfig`, or a
    kind with its settings as keywords) into each encoder block; the model is changed in place and returned.
    Only the adapter's parameters require grad afterwards. ``seed``: the adapter's initialisation comes from a
    forked global RNG seeded with it (the global RNG is left as it was); None draws from the global RNG."""
    if isinstance(config, str):
        config = AdapterConfig(kind=config, **settings)
    elif settings:
        raise ConfigError(f"apply_adapter: settings {sorted(settings)} given beside an AdapterConfig")
    problems = config.problems()
    if problems:
        raise ConfigError("adapter config: " + "; ".join(problems))
    if any(isinstance(m, _AdaptedAttention) for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} already has adapters: apply_adapter once per model")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if config.kind == "linear":
        return model
    blocks = _encoder_blocks(model)
    for index, block in enumerate(blocks):
        if not isinstance(block.attn, Attention):
            raise ConfigError(f"block {index}: attn is a {type(block.attn).__name__}, expected "
                              "hsfm_train.models.vit.Attention")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for block in blocks:
            if config.kind == "cp":
                block.attn = CoalescentAttention(block.attn, config.cp_init_std)
            else:
                block.attn = LoRAAttention(block.attn, config.lora_rank, config.lora_alpha)
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_report(model: nn.Module) -> dict[str, float]:
    """{"trainable", "total", "fraction"} of the model's parameters (adapter parameters included in total)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = trainable_parameter_count(model)
    return {"trainable": trainable, "total": total, "fraction": trainable / total if total else 0.0}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only, by state-dict name: what a few-shot run needs to save beside the backbone."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
