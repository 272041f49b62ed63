"""Every backbone architecture by name: the one place that knows which class builds which model.

Stages, the trainer, exports and loaders go through :func:`build_model` and :func:`architecture_of`, so a new
architecture is added here (and nowhere else) by registering its class and its config dataclass.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from hsfm_train.config import to_dataclass
from hsfm_train.errors import ConfigError
from hsfm_train.models.mae import ModelConfig, SpectralMAE


@dataclass(frozen=True)
class Architecture:
    name: str
    model_class: Callable[..., nn.Module]  # model_class(config, with_decoder=...) -> nn.Module
    config_class: type


ARCHITECTURES: dict[str, Architecture] = {
    "spectral-mae": Architecture("spectral-mae", SpectralMAE, ModelConfig),
}
DEFAULT_ARCHITECTURE = "spectral-mae"  # exports written before architectures were named


def get_architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def model_config(arch: str, values: Any, where: str) -> Any:
    """The typed config of ``arch`` from a dataclass or a mapping (e.g. an export's config.json)."""
    config_class = get_architecture(arch).config_class
    if isinstance(values, config_class):
        return values
    return to_dataclass(config_class, values, where)


def build_model(config: Any, arch: str = DEFAULT_ARCHITECTURE, with_decoder: bool = True) -> nn.Module:
    """A freshly initialised model (the caller seeds torch for a reproducible initialisation)."""
    spec = get_architecture(arch)
    model = spec.model_class(model_config(arch, config, f"{arch} model config"), with_decoder=with_decoder)
    model.arch = arch
    return model


def architecture_of(model: nn.Module) -> str:
    arch = getattr(model, "arch", None)
    if arch is None:
        arch = next((a.name for a in ARCHITECTURES.values() if type(model) is a.model_class), None)
    if arch is None:
        raise ConfigError(f"{type(model).__name__} is not a registered architecture ({sorted(ARCHITECTURES)})")
    return arch


def config_dict(model: nn.Module) -> dict[str, Any]:
    return asdict(model.config)


def encoder_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the encoder alone (what an encoder-only export keeps)."""
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation leaves the global RNG as it was
        return set(build_model(model.config, architecture_of(model), with_decoder=False).state_dict())
