"""Config files -> typed dataclasses. Hydra/OmegaConf mappings are validated against the dataclass schema, so
an unknown key or a value of the wrong type fails at start-up with one message naming the key."""
from __future__ import annotations

import difflib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from hsfm_train.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
T = TypeVar("T")


def to_dataclass(schema: type[T], values: Mapping[str, Any] | Any, where: str) -> T:
    """Merge ``values`` over the defaults of dataclass ``schema`` and build it; ``where`` names the source."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigKeyError as error:
        key = str(error.full_key or error.key)
        hint = _closest_key(schema, key)
        raise ConfigError(f"{where}: unknown key '{key}'{hint}") from None
    except MissingMandatoryValue as error:
        raise ConfigError(f"{where}: '{error.full_key}' must be set") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: '{error.full_key}': {str(error).splitlines()[0]}") from None


def _closest_key(schema: type, dotted_key: str) -> str:
    """A "did you mean" hint for a mistyped key; nested dataclasses are reached through their factories."""
    *parents, leaf = dotted_key.split(".")
    for parent in parents:
        match = next((f for f in fields(schema) if f.name == parent), None)
        if match is None or match.default_factory is MISSING:
            return ""
        schema = type(match.default_factory())
    matches = difflib.get_close_matches(leaf, [f.name for f in fields(schema)], n=1)
    return f" (did you mean '{'.'.join(parents + matches)}'?)" if matches else ""
