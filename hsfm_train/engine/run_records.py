"""Per-run records of the evaluation stages (`hsfm unmix`, `hsfm fewshot`): each run (one seed) is written as
``runs/run_NNN.json`` (its identity and scores) beside ``runs/run_NNN.npz`` (its arrays) as soon as it ends, and a
rerun reuses a finished run whose identity (the settings that shape it) is unchanged. An unreadable record is
treated as unfinished, so the run is simply done again."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hsfm_train.errors import DataFormatError
from hsfm_train.io import read_json, write_json_atomic


def torch_device(name: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_record_path(output: Path, number: int) -> Path:
    return Path(output) / "runs" / f"run_{number:03d}.json"


def run_arrays_path(output: Path, number: int) -> Path:
    return Path(output) / "runs" / f"run_{number:03d}.npz"


def finished_run(output: Path, number: int, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Run ``number``'s saved scores when both its files exist and it was made with ``identity``; else None."""
    record, arrays = run_record_path(output, number), run_arrays_path(output, number)
    if not (record.exists() and arrays.exists()):
        return None
    try:
        saved = read_json(record)
    except DataFormatError:
        return None
    if not isinstance(saved, dict) or saved.get("identity") != identity:
        return None
    return saved.get("run")


def write_run_record(output: Path, number: int, identity: dict[str, Any], run: dict[str, Any]) -> None:
    """Written after the run's arrays, so that a record always has its arrays beside it."""
    write_json_atomic(run_record_path(output, number), {"identity": identity, "run": run})
