"""Export a trained backbone for downstream work: ``model.safetensors`` + ``config.json``; and load it back.

config.json carries what a user needs to feed the backbone correctly: the architecture, how bands are handled
(by centre wavelength; any band set), the per-band normalisation statistics of every band set it was trained on,
provenance (step, samples, objective, data, versions), and the byte size and sha256 of model.safetensors (checked
on load). No pickle: tensors in safetensors, the rest JSON.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from torch import nn

from hsfm_train.engine.checkpoint import Checkpointer
from hsfm_train.errors import DataFormatError
from hsfm_train.io import file_sha256, fsync_path, read_json, write_json_atomic
from hsfm_train.models.normalizer import Normalizer
from hsfm_train.models.registry import (DEFAULT_ARCHITECTURE, architecture_of, build_model, config_dict,
                                        encoder_keys, model_config)

FORMAT = "hsfm-train/export"
OLD_FORMATS = ("hsfm-train/spectral-mae",)  # format 1 named the one architecture there was
FORMAT_VERSION = 2  # 2: "arch", and config.json["weights"] carries the size and sha256 of model.safetensors
REEXPORT = "re-export it from the run's checkpoint with `hsfm export RUN --out DIR`"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
BAND_HANDLING = (
    "Bands are identified by centre wavelength in nm (batch['wavelengths'], [N, B]); any band count and any "
    "sensor work without re-initialising. Bands are grouped by group_edges_nm into spectral groups (VNIR / SWIR / "
    "microwave), one token per group and patch. Inputs are expected normalised per band as (x - mean) / std with "
    "the statistics below for a known band set, or statistics of your own data for a new one.")


def export_model(model: nn.Module, output_dir: str | Path, *, encoder_only: bool = False,
                 normalization: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None) -> Path:
    """Write the export atomically (a staging directory renamed into place); returns the directory. A failure at
    any point leaves an existing export as it was and removes the staging directory."""
    output = Path(output_dir)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if encoder_only:
        keep = encoder_keys(model)
        state = {k: v for k, v in state.items() if k in keep}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": architecture_of(model),
        "encoder_only": encoder_only,
        "model": config_dict(model),
        "band_handling": BAND_HANDLING,
        "normalization": normalization or {},
        "provenance": {**(provenance or {}), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "torch": torch.__version__, "python": platform.python_version(), "git_commit": _git_commit()},
        "parameters": sum(v.numel() for v in state.values()),
    }
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    retired = output.with_name(f".{output.name}.old-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier process of the same id that was killed
    staging.mkdir(parents=True)
    swapped = False
    try:
        weights_path = staging / WEIGHTS_FILE
        save_file(state, str(weights_path), metadata={"format": FORMAT})
        fsync_path(weights_path)
        # Hash what is on disk, not the tensors: that is what a later load reads back.
        config["weights"] = {"file": WEIGHTS_FILE, "bytes": weights_path.stat().st_size,
                             "sha256": file_sha256(weights_path)}
        write_json_atomic(staging / CONFIG_FILE, config)
        if output.exists():
            shutil.rmtree(retired, ignore_errors=True)
            output.rename(retired)
            try:
                staging.rename(output)
            except BaseException:
                retired.rename(output)  # put the old export back: never leave no export behind
                raise
        else:
            staging.rename(output)
        swapped = True
        fsync_path(output.parent)
    except BaseException:
        if not swapped:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return output


def verify_weights(path: Path, config: dict[str, Any]) -> None:
    """Check model.safetensors against the size and sha256 in config.json; format 1 exports carry neither."""
    weights_path, config_path = path / WEIGHTS_FILE, path / CONFIG_FILE
    record = config.get("weights")
    if record is None and config.get("format_version", 0) < 2:
        warnings.warn(f"{path}: export format {config.get('format_version')} carries no checksum, so "
                      f"{WEIGHTS_FILE} cannot be verified; {REEXPORT} to add one", stacklevel=3)
        return
    if not isinstance(record, dict) or not {"bytes", "sha256"} <= set(record):
        raise DataFormatError(f"{config_path}: no 'weights' entry with bytes and sha256; {REEXPORT}")
    if not weights_path.exists():
        raise DataFormatError(f"{weights_path}: missing; {REEXPORT}")
    size = weights_path.stat().st_size
    if size != record["bytes"]:  # free to check, and catches a truncated copy before hashing it
        found = f"{size} bytes, expected {record['bytes']}"
    elif (digest := file_sha256(weights_path)) != record["sha256"]:
        found = f"sha256 {digest[:12]}..., expected {record['sha256'][:12]}..."
    else:
        return
    raise DataFormatError(f"{weights_path}: does not match the checksum in config.json ({found}); the file is "
                          f"corrupted, truncated or altered; {REEXPORT}")


def read_export_config(path: str | Path) -> dict[str, Any]:
    config_path = Path(path) / CONFIG_FILE
    try:
        config = read_json(config_path, "export config")
    except FileNotFoundError:
        raise DataFormatError(f"{config_path}: no config.json; is {path} an `hsfm export` directory?") from None
    if not isinstance(config, dict) or config.get("format") not in (FORMAT, *OLD_FORMATS):
        found = config.get("format") if isinstance(config, dict) else config
        raise DataFormatError(f"{config_path}: format {found!r} is not {FORMAT!r}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise DataFormatError(f"{config_path}: format version {config['format_version']} is newer than this "
                              f"hsfm-train reads ({FORMAT_VERSION}); upgrade hsfm-train")
    return config


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A ready backbone (eval mode) from an export directory, a run directory (its latest checkpoint) or one
    checkpoint directory, of whichever registered architecture it holds. ``model.export_config`` holds the
    export's config.json (for a checkpoint: the same fields); ``model.normalizer`` applies the training
    statistics to a known band set (see :class:`Normalizer`). An export's weights are checked against the size
    and sha256 in its config.json first (format 1 exports, which have none: a warning)."""
    path = Path(path)
    is_checkpoint = (path / "checkpoints").is_dir() or (path / "manifest.json").exists()
    if is_checkpoint and not (path / CONFIG_FILE).exists():
        model = load_checkpoint_model(path)
    else:
        config = read_export_config(path)
        arch = config.get("arch", DEFAULT_ARCHITECTURE)
        model = build_model(model_config(arch, config["model"], f"{path / CONFIG_FILE} model"), arch,
                            with_decoder=not config["encoder_only"])
        verify_weights(path, config)
        _load_weights(model, path / WEIGHTS_FILE)
        model.export_config = config
    model.normalizer = Normalizer(model.export_config.get("normalization") or {})
    return model.to(device).eval()


def load_checkpoint_model(source: str | Path) -> nn.Module:
    """The model of a run directory's latest checkpoint (or of one checkpoint directory); its
    ``export_config`` holds what an export of it would carry (model, normalisation, provenance)."""
    source = Path(source)
    if (source / "checkpoints").is_dir():
        source = source / "checkpoints"
    loaded = Checkpointer(source.parent).load(source) if (source / "manifest.json").exists() else \
        Checkpointer(source).load()
    metadata = (loaded.extra or {}).get("run_metadata", {})
    if "model" not in metadata:
        raise DataFormatError(f"{loaded.path}: the checkpoint does not record its model config (not an hsfm "
                              "training checkpoint?)")
    arch = metadata.get("arch", DEFAULT_ARCHITECTURE)
    model = build_model(model_config(arch, metadata["model"], f"{loaded.path} model config"), arch)
    model.load_state_dict(loaded.model_state)
    train_state = (loaded.extra or {}).get("train_state", (loaded.extra or {}).get("trainer", {}))
    provenance = {"checkpoint": str(loaded.path), "step": train_state.get("step"),
                  "samples": train_state.get("samples"), "objective": metadata.get("objective"),
                  "train_shards": metadata.get("train_shards")}
    model.export_config = {"arch": arch, "encoder_only": False, "model": metadata["model"],
                           "normalization": metadata.get("normalization") or {}, "provenance": provenance,
                           "checkpoint": str(loaded.path)}
    return model.eval()


def _load_weights(model: nn.Module, weights_path: Path) -> None:
    try:
        state = load_file(str(weights_path))
    except FileNotFoundError:
        raise DataFormatError(f"{weights_path}: missing") from None
    except Exception as error:  # safetensors raises its own error types for truncated / corrupt files
        raise DataFormatError(f"{weights_path}: cannot be read ({error}); the file is truncated or corrupt") from None
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise DataFormatError(f"{weights_path}: does not match the architecture in config.json "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict(state)


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None
