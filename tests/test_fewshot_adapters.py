"""Adapters on a frozen micro SpectralMAE: CP and LoRA start at (or near) the frozen model, train only
themselves, and count the parameters their shapes say."""
from __future__ import annotations

import copy

import pytest
import torch
from einops import rearrange

from hsfm_train.errors import ConfigError
from hsfm_train.fewshot.adapters import (AdapterConfig, CoalescentAttention, LoRAAttention, adapter_state_dict,
                                         apply_adapter, parameter_report, trainable_parameter_count)
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.models.vit import Attention

MICRO = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8)
DIM, DEPTH, HEADS = MICRO["embed_dim"], MICRO["depth"], MICRO["num_heads"]
HEAD_DIM = DIM // HEADS


def _micro(seed: int = 0) -> SpectralMAE:
    torch.manual_seed(seed)
    return SpectralMAE(ModelConfig(**MICRO), with_decoder=False).eval()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 12, 8, 8, generator=generator), torch.linspace(400.0, 2400.0, 12)


def _adapted(kind: str, **settings) -> tuple[SpectralMAE, SpectralMAE]:
    frozen = _micro()
    return frozen, apply_adapter(copy.deepcopy(frozen), kind, seed=0, **settings)


def test_cp_with_identity_matrices_reproduces_the_frozen_encoder():
    frozen, adapted = _adapted("cp")
    with torch.no_grad():
        for block in adapted.blocks:
            block.attn.coalescent.copy_(torch.eye(HEAD_DIM).repeat(HEADS, 1, 1))
        hsi, wavelengths = _batch()
        torch.testing.assert_close(adapted.encode(hsi, wavelengths), frozen.encode(hsi, wavelengths),
                                   rtol=1e-6, atol=1e-6)


def test_cp_at_default_init_is_near_the_frozen_encoder_but_not_equal():
    frozen, adapted = _adapted("cp")
    for block in adapted.blocks:
        offset = block.attn.coalescent.detach() - torch.eye(HEAD_DIM)
        assert 0 < offset.abs().max() <= 2 * 0.02 + 1e-7  # trunc-normal(0.02), truncated at 2 std
    with torch.no_grad():
        hsi, wavelengths = _batch()
        base, steered = frozen.encode(hsi, wavelengths), adapted.encode(hsi, wavelengths)
    difference = (steered - base).abs().max()
    assert difference > 1e-5
    assert difference < 0.1 * base.abs().max()


def test_cp_attention_is_softmax_of_scaled_q_c_kt_times_v():
    torch.manual_seed(0)
    attention = Attention(DIM, HEADS).eval()
    cp = CoalescentAttention(attention, init_std=0.3)  # far from identity, so the order of the product shows
    x = torch.randn(3, 5, DIM)
    q, k, v = rearrange(attention.qkv(x), "n t (three h d) -> three n h t d", three=3, h=HEADS)
    scores = (q * HEAD_DIM ** -0.5) @ cp.coalescent @ k.transpose(-1, -2)
    expected = attention.proj(rearrange(scores.softmax(-1) @ v, "n h t d -> n t (h d)"))
    torch.testing.assert_close(cp(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_at_init_equals_the_frozen_encoder_and_later_equals_the_merged_weight():
    frozen, adapted = _adapted("lora", lora_rank=4, lora_alpha=8.0)
    hsi, wavelengths = _batch()
    with torch.no_grad():
        torch.testing.assert_close(adapted.encode(hsi, wavelengths), frozen.encode(hsi, wavelengths),
                                   rtol=0, atol=0)
        lora = adapted.blocks[0].attn
        lora.lora_b.normal_()
        merged = copy.deepcopy(frozen.blocks[0].attn)
        merged.qkv.weight += (8.0 / 4) * lora.lora_b @ lora.lora_a
        x = torch.randn(2, 7, DIM)
        torch.testing.assert_close(lora(x), merged(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cp", "lora"])
def test_training_steps_change_the_adapter_and_leave_every_backbone_weight_alone(kind):
    frozen, adapted = _adapted(kind)
    before = {name: value.clone() for name, value in adapted.state_dict().items()}
    adapter_names = set(adapter_state_dict(adapted))
    # the optimiser is given every parameter, with weight decay: frozen ones must still not move
    optimiser = torch.optim.AdamW(adapted.parameters(), lr=1e-2, weight_decay=0.05)
    hsi, wavelengths = _batch()
    target = torch.randn_like(frozen.encode(hsi, wavelengths))
    for _ in range(2):  # two steps: LoRA's A only gets a gradient once B has left zero
        optimiser.zero_grad()
        (adapted.encode(hsi, wavelengths) - target).pow(2).mean().backward()
        optimiser.step()
    after = adapted.state_dict()
    for name, value in before.items():
        if name in adapter_names:
            assert not torch.equal(after[name], value), f"adapter parameter {name} did not train"
        else:
            assert torch.equal(after[name], value), f"backbone weight {name} changed"
    for name, parameter in adapted.named_parameters():
        assert parameter.requires_grad == (name in adapter_names)


def test_trainable_counts_follow_the_shapes():
    _, cp = _adapted("cp")
    assert trainable_parameter_count(cp) == DEPTH * HEADS * HEAD_DIM * HEAD_DIM
    rank = 3
    _, lora = _adapted("lora", lora_rank=rank)
    assert trainable_parameter_count(lora) == DEPTH * rank * (DIM + 3 * DIM)
    _, linear = _adapted("linear")
    assert trainable_parameter_count(linear) == 0
    report = parameter_report(cp)
    assert report["total"] == sum(p.numel() for p in _micro().parameters()) + report["trainable"]
    assert report["fraction"] == pytest.approx(report["trainable"] / report["total"])


def test_backbone_state_dict_names_are_kept_so_an_export_loads_into_an_adapted_model():
    frozen, adapted = _adapted("lora")
    assert all(isinstance(block.attn, LoRAAttention) for block in adapted.blocks)
    result = adapted.load_state_dict(frozen.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == set(adapter_state_dict(adapted))


def test_the_same_seed_gives_the_same_adapter():
    first = adapter_state_dict(apply_adapter(_micro(), "cp", seed=3))
    second = adapter_state_dict(apply_adapter(_micro(), "cp", seed=3))
    other = adapter_state_dict(apply_adapter(_micro(), "cp", seed=4))
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_unknown_kind_bad_settings_and_double_application_are_refused():
    with pytest.raises(ConfigError, match="cp, lora, linear"):
        apply_adapter(_micro(), "prompt")
    with pytest.raises(ConfigError, match="lora_rank"):
        apply_adapter(_micro(), AdapterConfig(kind="lora", lora_rank=0))
    adapted = apply_adapter(_micro(), "cp")
    with pytest.raises(ConfigError, match="already has adapters"):
        apply_adapter(adapted, "lora")
    assert AdapterConfig().problems() == []
