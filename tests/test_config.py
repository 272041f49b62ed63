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
