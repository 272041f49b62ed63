"""Run logging: W&B (never fatal), a local ``metrics.jsonl`` / ``summary.json`` mirror, and progress bars.
Figures are drawn in ``hsfm_train/figures.py``."""
from __future__ import annotations

import json
import netrc
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from tqdm.auto import tqdm

from hsfm_train.io import write_text_atomic

def _wandb_key_configured() -> bool:
    """True when W&B credentials exist in the environment or the .netrc file (read without network use)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        return bool(host) and netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _json_value(value: Any) -> Any:
    """Python scalar for one-element tensors and numpy values, so they serialise to JSON."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (np.ndarray, np.generic)) and value.size == 1:
        return value.item()
    return value


class RunLogger:
    """Logs a run to W&B and to ``run_dir`` (``metrics.jsonl``, ``summary.json``).

    W&B mode: ``mode`` if given, else ``$WANDB_MODE`` if set, else "online" when an API key is configured
    and "offline" otherwise; always "disabled" when ``enabled`` is False or on non-main processes, which
    log nothing at all. A W&B failure (at init or later) is warned about once and W&B is switched off; the
    local files keep being written. ``metrics.jsonl`` holds one ``{"step": ..., **metrics}`` object per
    :meth:`log` call (non-finite values are written as NaN/Infinity, which Python's json reads back).
    """

    def __init__(self, run_dir: str | os.PathLike, config: dict, project: str = "hsfm-train",
                 run_name: str | None = None, enabled: bool = True, is_main_process: bool = True,
                 mode: str | None = None, run_id: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.is_main_process = is_main_process
        self._summary: dict[str, Any] = {}
        self._finished = False
        self._wandb = None  # the wandb module, once a run is up
        self._run = None
        self._metrics_file = None
        if not is_main_process:
            self.mode = "disabled"
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if not enabled:
            self.mode = "disabled"
        else:
            self.mode = mode or os.environ.get("WANDB_MODE") or (
                "online" if _wandb_key_configured() else "offline")
        if self.mode != "disabled":
            self._start_wandb(project, run_name, config, run_id)

    def _start_wandb(self, project: str, run_name: str | None, config: dict, run_id: str | None) -> None:
        try:
            import wandb  # imported lazily: slow, and not needed when W&B is off

            # a stable id makes a restarted (resumed) job continue the same W&B run instead of starting another
            resume = {"id": run_id, "resume": "allow"} if run_id else {}
            self._run = wandb.init(project=project, name=run_name, config=config, dir=str(self.run_dir),
                                   mode=self.mode, **resume)
            self._wandb = wandb
        except Exception as error:  # noqa: BLE001 - logging must never stop training
            self._wandb_failed("init", error)

    def _wandb_failed(self, what: str, error: Exception) -> None:
        warnings.warn(f"W&B {what} failed ({type(error).__name__}: {error}); continuing without W&B, "
                      f"metrics are still written to {self.run_dir / 'metrics.jsonl'}", RuntimeWarning,
                      stacklevel=3)
        self._run = None
        self._wandb = None

    def _call_wandb(self, what: str, fn) -> None:
        if self._run is None:
            return
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - logging must never stop training
            self._wandb_failed(what, error)

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("RunLogger is already finished")

    @property
    def wandb_run(self):
        """The live ``wandb`` run, or None when W&B is off."""
        return self._run

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._check_open()
        if not self.is_main_process:
            return
        values = {key: _json_value(value) for key, value in metrics.items()}
        self._call_wandb("log", lambda: self._run.log(values, step=step))
        self._metrics_file.write(json.dumps({"step": step, **values}) + "\n")
        self._metrics_file.flush()

    def rewind(self, step: int) -> int:
        """Drop the ``metrics.jsonl`` lines logged after ``step`` (a resumed run logs those steps again) and any
        line torn by a kill mid-write; the file is rewritten atomically. Returns how many lines were dropped."""
        self._check_open()
        if not self.is_main_process:
            return 0
        path = self.run_dir / "metrics.jsonl"
        self._metrics_file.close()
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if entry_step <= step:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            write_text_atomic(path, "".join(kept))
        self._metrics_file = open(path, "a", encoding="utf-8")
        return dropped

    def log_image(self, key: str, path: str | os.PathLike, step: int) -> None:
        self._check_open()
        self._call_wandb("log_image", lambda: self._run.log({key: self._wandb.Image(str(path))}, step=step))

    def progress(self, total: int, initial: int = 0, desc: str | None = None, enabled: bool = True) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and self.is_main_process),
                    dynamic_ncols=True)

    def summary(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the run summary (W&B and ``summary.json``, rewritten atomically)."""
        self._check_open()
        if not self.is_main_process:
            return
        values = {key: _json_value(value) for key, value in values.items()}
        self._summary.update(values)
        self._call_wandb("summary", lambda: self._run.summary.update(values))
        text = json.dumps(self._summary, indent=2, sort_keys=True)
        write_text_atomic(self.run_dir / "summary.json", text)

    def finish(self, exit_code: int | None = None) -> None:
        """Close the local files and the W&B run; later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        if self._metrics_file is not None:
            self._metrics_file.close()
        self._call_wandb("finish", lambda: self._run.finish(exit_code=exit_code))
        self._run = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)
