"""The larger presets (configs/model/small|base|large|huge.yaml): they compose through Hydra, keep the MAE /
HyperSIGMA dimensions, build, and have the parameter counts their comments state; activation checkpointing is a
command-line option of any of them. The counts are measured on the meta device (no memory, no initialisation):

    python -m tests.test_large_models        # prints the table the yaml comments quote
"""
from __future__ import annotations

import re

import pytest
import torch

from hsfm_train.config import CONFIG_DIR, compose
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.stages.pretrain import PretrainConfig

# name -> (embed_dim, depth, num_heads): ViT-S/B/L/H, as MAE and HyperSIGMA size them
DIMENSIONS = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16)}
# experiment=demo keeps the preset's own 8x8 patches; experiment=main (the default job) sets 4x4
PATCHES = {8: "experiment=demo", 4: "experiment=main"}


def preset(name: str, patch_size: int = 8, *overrides: str) -> ModelConfig:
    config = compose("pretrain", [f"model={name}", PATCHES[patch_size], *overrides], PretrainConfig).model
    assert config.patch_size == patch_size
    return config


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with torch.device("meta"):
        full, encoder = SpectralMAE(config), SpectralMAE(config, with_decoder=False)
    return {"encoder": count(encoder), "blocks": count(full.blocks), "total": count(full)}


def stated_counts(name: str) -> dict[str, int]:
    """The figures in the comment of configs/model/<name>.yaml."""
    text = (CONFIG_DIR / "model" / f"{name}.yaml").read_text()
    number = r"([\d,]+)"
    p8 = re.search(rf"8x8 patches: encoder {number} \(its \d+ blocks {number}\), total {number}", text)
    p4 = re.search(rf"4x4 patches \(experiment=main\) encoder {number}, total {number}", text)
    assert p8 and p4, f"{name}.yaml: no parameter counts in its comment"
    value = lambda s: int(s.replace(",", ""))  # noqa: E731
    return {"8": {"encoder": value(p8[1]), "blocks": value(p8[2]), "total": value(p8[3])},
            "4": {"encoder": value(p4[1]), "total": value(p4[2])}}


@pytest.mark.parametrize("name", list(DIMENSIONS))
def test_preset_has_its_dimensions_and_the_parameter_counts_its_comment_states(name):
    config = preset(name)
    assert (config.embed_dim, config.depth, config.num_heads) == DIMENSIONS[name]
    assert (config.embed_dim // config.num_heads) % 8 == 0  # a head dim the fused SDPA kernels take
    stated = stated_counts(name)
    assert parameter_counts(config) == stated["8"]
    counts4 = parameter_counts(preset(name, 4))
    assert {key: counts4[key] for key in ("encoder", "total")} == stated["4"]
    assert counts4["blocks"] == stated["8"]["blocks"]  # the patch size changes only the tokenizer and the head


@pytest.mark.parametrize("name", ["large", "huge"])
def test_activation_checkpointing_is_a_command_line_option(name):
    assert preset(name).activation_checkpointing is False
    assert preset(name, 8, "model.activation_checkpointing=true").activation_checkpointing is True


def test_base_trains_a_step_with_activation_checkpointing():
    """The base preset built for real (not on meta): one training forward + backward with checkpointing."""
    config = preset("base", 8, "model.activation_checkpointing=true")
    torch.manual_seed(0)
    model = SpectralMAE(config).train()
    wavelengths = torch.linspace(400.0, 2400.0, 12)
    hsi = torch.randn(1, 12, 16, 16)
    out = model(hsi, wavelengths, generator=torch.Generator().manual_seed(0))
    (out.prediction - hsi).square().mean().backward()
    grads = [p.grad for p in model.blocks[0].parameters()] + [p.grad for p in model.decoder_blocks[-1].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


if __name__ == "__main__":
    for name in DIMENSIONS:
        for patch_size in PATCHES:
            counts = parameter_counts(preset(name, patch_size))
            print(f"{name:>6} patch {patch_size}: encoder {counts['encoder']:,} (blocks {counts['blocks']:,}), "
                  f"total {counts['total']:,}")
