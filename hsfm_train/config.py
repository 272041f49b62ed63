"""Config files -> typed dataclasses. Hydra/OmegaConf mappings are validated against the dataclass schema, so
an unknown key or a value of the wrong type fails at start-up with one message naming the key."""
from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import fields, is_dataclass
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


def free_mapping_overrides(overrides: list[str], mappings: tuple[str, ...]) -> list[str]:
    """Overrides of keys inside free mappings (``data.reader.bands=corrected``, where ``data.reader`` is a
    ``dict[str, Any]`` of reader options) rewritten as Hydra's add-or-replace ``++key=value``: Hydra would
    otherwise want ``+`` to add a key the schema cannot list."""
    def inside(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+")
        return any(key == m or key.startswith(m + ".") for m in mappings)
    return [f"++{o.lstrip('+')}" if inside(o) else o for o in overrides]


def compose(config_name: str, overrides: list[str], schema: type[T]) -> T:
    """Compose ``configs/<config_name>.yaml`` with Hydra command-line style overrides (``group=option``,
    ``a.b=value``) and validate it against ``schema``; every mistake is one ConfigError naming the key.

    The dataclass is the one source of every default: it is registered with Hydra's ConfigStore as
    ``<config_name>_schema``, which the YAML lists first in its defaults, so YAML files hold only deviations."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException as OmegaError

    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            values = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaError) as error:
        text = f"{error}\n{error.__cause__ or ''}"
        unknown = re.search(r"Could not override '([^']+)'", text)
        if unknown and ("not in struct" in text or re.search(r"Key '[^']+' not in '", text)):
            key = unknown.group(1)
            raise ConfigError(f"{config_name} config: unknown key '{key}'{_closest_key(schema, key)}") from None
        options = re.search(r"Available options in '[^']+':\s*(.*?)(?:\n\S|$)", text, re.S)
        message = text.strip().splitlines()[0]
        cause = str(error.__cause__ or "").strip().splitlines()
        if cause and not options and cause[0] not in message:
            message += f" ({cause[0]})"
        if options:
            message += f" (available: {', '.join(options.group(1).split())})"
        raise ConfigError(f"{config_name} config: {message}") from None
    return to_dataclass(schema, values, f"{config_name} config")


def _closest_key(schema: type, dotted_key: str) -> str:
    """A "did you mean" hint for a mistyped key; nested dataclasses are reached through the field types."""
    *parents, leaf = dotted_key.split(".")
    for parent in parents:
        nested = _dataclass_of(schema, parent)
        if nested is None:
            return ""
        schema = nested
    matches = difflib.get_close_matches(leaf, [f.name for f in fields(schema)], n=1)
    return f" (did you mean '{'.'.join(parents + matches)}'?)" if matches else ""


def _dataclass_of(schema: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``schema`` (unwrapping ``X | None``), or None."""
    try:
        hints = typing.get_type_hints(schema)
    except (NameError, TypeError):
        return None
    hint = hints.get(name)
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((c for c in candidates if is_dataclass(c)), None)
