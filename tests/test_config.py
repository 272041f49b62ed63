"""Config files compose into the typed dataclasses; mistakes fail at start-up naming the key."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from hsfm_train.config import CONFIG_DIR, to_dataclass
from hsfm_train.data.pipeline import LoaderConfig
from hsfm_train.errors import ConfigError


@pytest.mark.parametrize("name", ["train", "eval"])
def test_data_configs_build_loader_configs(name):
    values = OmegaConf.load(CONFIG_DIR / "loader" / f"{name}.yaml")
    values.shards = "/some/shards"
    config = to_dataclass(LoaderConfig, values, f"loader/{name}.yaml")
    assert isinstance(config, LoaderConfig) and config.shards == "/some/shards"
    assert config.resampled is (name == "train") and config.augment.enabled is (name == "train")


def test_config_mistakes_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown key 'batchsize' \(did you mean 'batch_size'\?\)"):
        to_dataclass(LoaderConfig, {"shards": "x", "batchsize": 8}, "data")
    with pytest.raises(ConfigError, match=r"unknown key 'augment.blurr' \(did you mean 'augment.blur'\?\)"):
        to_dataclass(LoaderConfig, {"shards": "x", "augment": {"blurr": 0.1}}, "data")
    with pytest.raises(ConfigError, match="'batch_size'"):
        to_dataclass(LoaderConfig, {"shards": "x", "batch_size": "eight"}, "data")
    with pytest.raises(ConfigError, match="'shards' must be set"):
        to_dataclass(LoaderConfig, OmegaConf.load(CONFIG_DIR / "loader" / "train.yaml"), "loader/train.yaml")
    with pytest.raises(ConfigError, match="batching must be 'bucket' or 'pad'"):
        to_dataclass(LoaderConfig, {"shards": "x", "batching": "mix"}, "data")


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("group, schema", [("model", "ModelConfig"), ("objective", "ObjectiveConfig"),
                                           ("trainer", "TrainerConfig"), ("loader", "LoaderConfig")])
def test_yaml_files_hold_only_deviations_from_the_dataclass_defaults(group, schema):
    # one source of truth: a default lives in its dataclass; restating it in YAML lets the two drift apart
    from dataclasses import asdict

    from hsfm_train.data.pipeline import LoaderConfig
    from hsfm_train.engine.trainer import TrainerConfig
    from hsfm_train.models.mae import ModelConfig
    from hsfm_train.objectives.pretrain import ObjectiveConfig

    classes = {"ModelConfig": ModelConfig, "ObjectiveConfig": ObjectiveConfig, "TrainerConfig": TrainerConfig,
               "LoaderConfig": LoaderConfig}
    defaults = dict(_leaves(asdict(classes[schema](**({"shards": "x"} if schema == "LoaderConfig" else {})))))
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path))
        values.pop("defaults", None)
        for key, value in _leaves(values or {}):
            if key == "name" or key not in defaults:
                continue
            assert value != defaults[key], f"{path.name}: {key}: {value!r} restates the {schema} default"
