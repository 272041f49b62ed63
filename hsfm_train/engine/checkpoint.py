"""Step-based, atomic, keep-last-k training checkpoints, with no pickle anywhere.

``directory/step_00000100/`` holds ``model.safetensors``; ``optimizer.safetensors`` + ``optimizer.json``
(the tree, with tensor placeholders); ``state.json`` (format version, step, scheduler_state, extra, rng
tree); ``rng.safetensors``; ``state.safetensors`` only if scheduler_state/extra hold tensors; and, written
last, ``manifest.json`` with every file's size and sha256. ``directory/latest`` holds the current dir name.

Why no pickle: ``torch.load``/``pickle`` run code from the file, so an untrusted checkpoint would be a
code-execution vector. Tensors go to safetensors, the rest to JSON, with int keys and tuples (optimizer
state dicts have both) tagged so they round-trip exactly.

Crash safety: a save is written into ``step_N.partial-<pid>/``, fsynced and renamed into place; only then
is ``latest`` rewritten (temp + fsync + rename), and only after that are old checkpoints deleted, so a
SIGKILL at any instant leaves a complete checkpoint. Readers check the manifest (sizes in ``latest()``,
sha256 in ``load()``) instead of trusting names.

Distributed (format 2): the main process writes the consolidated files (``model.safetensors``, a full
``optimizer_state`` when the engine does not shard it, ``state.json``); with ``rank_state`` every rank also writes
``rank_NNNNN.json`` + ``rank_NNNNN.safetensors`` (its optimiser shard and RNG) into the same partial directory.
The ranks exchange the directory name and their results by broadcast and gather (``ranks``: the job's processes);
the main process writes the manifest, listing every rank's file with the size and sha256 that rank measured, only
after all of them succeeded, so a rank that fails or dies leaves no complete checkpoint behind. Multi-node jobs need ``directory`` on a filesystem every node shares.
Format 1 checkpoints (one process, no rank files) load as before.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch  # called as safetensors.torch.save_file so tests can patch it
import torch

from hsfm_train.io import file_sha256, fsync_path, read_json, write_json_atomic
from hsfm_train.errors import ConfigError, DataFormatError

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
LATEST = "latest"
_REQUIRED = ("model.safetensors", "state.json")
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS)
# A checkpoint directory; ``.replaced-<pid>`` is the old copy of a step being re-saved, which stays
# usable if a crash lands between the two renames that swap it out.
_CHECKPOINT_RE = re.compile(r"^step_(\d+)(?:\.replaced-\d+)?$")


def encode_state(obj: Any) -> tuple[dict, dict[str, torch.Tensor]]:
    """Nested state -> (JSON-able tree with tensor placeholders, flat {name: tensor}).

    Supports dicts with str or int keys, lists, tuples, tensors, int/float/str/bool/None. Tuples and
    dicts with non-str keys are tagged (``{"__tuple__": [...]}``, ``{"__items__": [[key, value], ...]}``)
    because JSON would otherwise turn them into lists and string keys.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach()
            return {_TENSOR: name}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, tuple):
            return {_TUPLE: [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, dict):
            bad = [key for key in value if not isinstance(key, (str, int))]
            if bad:
                raise ConfigError(f"{where}: dict key {bad[0]!r} is a {type(bad[0]).__name__}; only str and int keys")
            # A plain str-keyed dict that happens to look like a tag is stored as items, so it stays a dict.
            if all(isinstance(key, str) for key in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
                return {key: encode(item, f"{where}.{key}") for key, item in value.items()}
            return {_ITEMS: [[key, encode(item, f"{where}[{key!r}]")] for key, item in value.items()]}
        raise ConfigError(f"{where}: a {type(value).__name__} cannot be checkpointed without pickle; use tensors, "
                          "numbers, str, bool, None, lists, tuples and dicts")

    return encode(obj, "state"), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Exact inverse of :func:`encode_state`."""

    def decode(node: Any) -> Any:
        if isinstance(node, list):
            return [decode(item) for item in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((tag, payload),) = node.items()
            if tag == _TENSOR:
                if payload not in tensors:
                    raise DataFormatError(f"checkpoint tree refers to tensor {payload!r}, which is not stored")
                return tensors[payload]
            if tag == _TUPLE:
                return tuple(decode(item) for item in payload)
            if tag == _ITEMS:
                return {key: decode(item) for key, item in payload}
        return {key: decode(item) for key, item in node.items()}

    try:
        return decode(tree)
    except (TypeError, ValueError) as error:
        raise DataFormatError(f"checkpoint tree is malformed: {error}") from error


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python ``random``, numpy's global generator, torch CPU, and every CUDA device if available."""
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(position), int(has_gauss), float(cached)),
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return encode_state(state)


def set_rng_state(tree: dict, tensors: dict[str, torch.Tensor]) -> None:
    state = decode_state(tree, tensors)
    try:
        random.setstate(state["python"])
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch_cpu"])
        cuda = state["cuda"]
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise DataFormatError(f"checkpoint rng state is malformed: {error!r}") from error
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda and available != len(cuda):
        warnings.warn(f"checkpoint has RNG states for {len(cuda)} CUDA devices but {available} are visible; "
                      f"restoring the first {min(available, len(cuda))}", stacklevel=2)
    for index, device_state in enumerate(cuda[:available]):
        torch.cuda.set_rng_state(device_state, index)


@dataclass
class LoadedCheckpoint:
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    scheduler_state: dict | None
    extra: dict | None
    rng: tuple[Any, dict[str, torch.Tensor]] | None  # pass as set_rng_state(*rng)
    path: Path | None = None
    world_size: int = 1  # processes that wrote it
    rank_state: Any = None  # the loading rank's own file, when the checkpoint has one for it


class Ranks:
    """The processes of a job, as the checkpointer needs them; this default is one process. The trainer passes
    one built on torch.distributed."""

    is_main_process, process_index, num_processes = True, 0, 1

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` on every rank."""
        return value

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` on the main process (rank order); other ranks get a list too."""
        return [value]


def rank_file(rank: int, suffix: str) -> str:
    return f"rank_{rank:05d}.{suffix}"


class Checkpointer:
    """Writes ``directory/step_XXXXXXXX/`` checkpoints atomically and keeps the newest ``keep_last``."""

    def __init__(self, directory: str | Path, keep_last: int = 3, is_main_process: bool = True,
                 ranks: Ranks | None = None):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError(f"keep_last must be an int >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.ranks = ranks or Ranks()
        self.is_main_process = is_main_process and self.ranks.is_main_process

    def save(self, step: int, *, model_state: dict[str, torch.Tensor], optimizer_state: dict | None = None,
             scheduler_state: dict | None = None, extra: dict | None = None, include_rng: bool = True,
             rank_state: Any = None) -> Path:
        """Write checkpoint ``step``. ``rank_state``: this rank's own state (every rank passes one, or none
        does); the other arguments matter on the main process only."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"checkpoint step must be an int >= 0, got {step!r}")
        final = self.directory / f"step_{step:08d}"
        if rank_state is not None or self.ranks.num_processes > 1:
            return self._save_with_ranks(final, step, rank_state, model_state=model_state,
                                         optimizer_state=optimizer_state, scheduler_state=scheduler_state,
                                         extra=extra, include_rng=include_rng)
        if not self.is_main_process:
            return final
        # Encode everything before touching the disk so bad input fails with nothing written.
        files = _encode_main(step, model_state=model_state, optimizer_state=optimizer_state,
                             scheduler_state=scheduler_state, extra=extra, include_rng=include_rng)
        self._write_main(self._partial(final), final, step, files, {})
        return final

    def _partial(self, final: Path) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f"{final.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier failed save in this process
        partial.mkdir()
        return partial

    def _save_with_ranks(self, final: Path, step: int, rank_state: Any, **main_files: Any) -> Path:
        """Every rank writes its file into the main process's partial directory; the main process then writes
        its own files and the manifest. Any failure anywhere: the partial directory goes, every rank raises."""
        ranks = self.ranks
        partial, error = None, None
        if ranks.is_main_process:
            try:
                partial = self._partial(final)
            except OSError as failure:
                error = f"cannot create {final.name}'s partial directory: {failure}"
        partial, error = ranks.broadcast((partial, error))
        if error is not None:
            raise DataFormatError(error)
        record: Any
        try:
            tree, tensors = encode_state(rank_state)
            rng_tree, rng_tensors = rng_state()
            tensor_files = {rank_file(ranks.process_index, "rng.safetensors"): _cpu_copies(rng_tensors, "rng")}
            if tensors:
                tensor_files[rank_file(ranks.process_index, "safetensors")] = _cpu_copies(tensors, "rank_state")
            for name, payload in tensor_files.items():
                safetensors.torch.save_file(payload, str(partial / name))
                fsync_path(partial / name)
            name = rank_file(ranks.process_index, "json")
            write_json_atomic(partial / name, {"format_version": FORMAT_VERSION, "rank": ranks.process_index,
                                               "state": tree, "rng": rng_tree})
            record = {n: {"bytes": (partial / n).stat().st_size, "sha256": file_sha256(partial / n)}
                      for n in [*tensor_files, name]}
        except Exception as failure:  # noqa: BLE001 - reported to the main process, raised on every rank below
            record = f"rank {ranks.process_index}: {type(failure).__name__}: {failure}"
        records = ranks.gather(record)
        outcome = None
        if ranks.is_main_process:
            failures = [r for r in records if isinstance(r, str)]
            try:
                if failures:
                    raise DataFormatError("; ".join(failures))
                rank_files = {name: entry for r in records for name, entry in r.items()}
                files = _encode_main(step, world_size=ranks.num_processes, **main_files)
                self._write_main(partial, final, step, files, rank_files)
            except BaseException as failure:
                shutil.rmtree(partial, ignore_errors=True)
                outcome = f"checkpoint {final.name} not written: {failure}"
        outcome = ranks.broadcast(outcome)
        if outcome is not None:
            raise DataFormatError(outcome)
        return final

    def _write_main(self, partial: Path, final: Path, step: int, files: tuple[dict, dict],
                    rank_files: dict[str, dict]) -> None:
        """The main process's encoded ``files``, the manifest (with ``rank_files`` as the ranks measured them),
        then the rename into place, ``latest`` and the clean-up of old checkpoints."""
        tensor_files, json_files = files
        world_size = json_files["state.json"]["world_size"]
        try:
            for name, tensors in tensor_files.items():
                safetensors.torch.save_file(tensors, str(partial / name))
                fsync_path(partial / name)
            for name, payload in json_files.items():
                write_json_atomic(partial / name, payload)  # temp + fsync + rename
            listed = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                      for p in sorted(partial.iterdir()) if p.name not in rank_files}
            write_json_atomic(partial / MANIFEST, {"format_version": FORMAT_VERSION, "step": step,
                                                   "world_size": world_size, "files": {**listed, **rank_files}})
            fsync_path(partial)
            self._install(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        self._write_latest(final.name)
        self._cleanup(keep=final)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names if it is complete (sizes checked), else the newest complete one."""
        if not self.directory.is_dir():
            return None
        pointer = self.directory / LATEST
        try:
            name = pointer.read_text().strip()
            if not _CHECKPOINT_RE.match(name):
                problem = f"{pointer} names {name!r}, which is not a checkpoint directory"
            else:
                _verify(self.directory / name, check_hashes=False)
                return self.directory / name
        except FileNotFoundError:
            problem = f"{pointer} is missing"
        except (OSError, UnicodeDecodeError) as error:
            problem = f"{pointer} is unreadable ({error})"
        except DataFormatError as error:
            problem = f"{pointer} names an incomplete checkpoint: {error}"
        complete = self.list()
        if complete or pointer.exists():
            fallback = complete[-1] if complete else None
            warnings.warn(f"{problem}; falling back to the newest complete checkpoint: {fallback}", stacklevel=2)
            return fallback
        return None  # a fresh directory: nothing saved yet, nothing wrong

    def list(self) -> list[Path]:
        """Complete checkpoints (manifest present, sizes match), oldest first."""
        by_step: dict[int, Path] = {}
        for path in sorted(self._candidates(), key=lambda p: ".replaced-" in p.name):  # plain dirs win
            step = int(_CHECKPOINT_RE.match(path.name).group(1))
            if step not in by_step:
                try:
                    _verify(path, check_hashes=False)
                    by_step[step] = path
                except DataFormatError:
                    pass
        return [by_step[step] for step in sorted(by_step)]

    def load(self, path: str | Path | None = None, rank: int | None = None) -> LoadedCheckpoint:
        """Load a checkpoint (default: :meth:`latest`) after checking every file's size, and the sha256 of each
        file it reads. ``rank``: also read that rank's own file (``rank_state``), when the checkpoint has one."""
        if path is None:
            path = self.latest()
            if path is None:
                raise ConfigError(f"no complete checkpoint to load in {self.directory}")
        path = Path(path)
        if not path.is_absolute() and not path.exists():
            path = self.directory / path
        if not path.is_dir():
            raise ConfigError(f"{path} is not a checkpoint directory")
        own = {rank_file(rank, suffix) for suffix in ("json", "safetensors", "rng.safetensors")} if rank is not None \
            else set()
        files = _verify(path, check_hashes=True, skip_hashes_of=lambda name: name.startswith("rank_") and
                        name not in own)["files"]

        def tensors(name: str) -> dict[str, torch.Tensor]:
            if name not in files:
                return {}
            try:
                return safetensors.torch.load_file(str(path / name))
            except Exception as error:  # safetensors raises its own error types for a bad header
                raise DataFormatError(f"{path / name} is not a valid safetensors file: {error}") from error

        state = read_json(path / "state.json", "checkpoint state")
        try:
            if state["format_version"] > FORMAT_VERSION:
                raise DataFormatError(f"{path / 'state.json'} has format_version {state['format_version']}; "
                                      f"this hsfm_train reads up to {FORMAT_VERSION}")
            optimizer = None
            if "optimizer.json" in files:
                optimizer = decode_state(read_json(path / "optimizer.json", "optimizer state"), tensors("optimizer.safetensors"))
            rest = decode_state(state["state"], tensors("state.safetensors"))
            rng = None if state["rng"] is None else (state["rng"], tensors("rng.safetensors"))
            rank_state = None
            if rank is not None and rank_file(rank, "json") in files:
                mine = read_json(path / rank_file(rank, "json"), f"rank {rank} state")
                rank_state = decode_state(mine["state"], tensors(rank_file(rank, "safetensors")))
                rng = (mine["rng"], tensors(rank_file(rank, "rng.safetensors")))  # this rank's own generators
            return LoadedCheckpoint(step=int(state["step"]), model_state=tensors("model.safetensors"),
                                    optimizer_state=optimizer, scheduler_state=rest["scheduler_state"],
                                    extra=rest["extra"], rng=rng, path=path,
                                    world_size=int(state.get("world_size", 1)), rank_state=rank_state)
        except (KeyError, TypeError) as error:
            raise DataFormatError(f"{path / 'state.json'} is malformed: missing or bad {error}") from error

    def load_newest_intact(self, rank: int | None = None) -> LoadedCheckpoint | None:
        """The newest checkpoint that loads with every checksum intact: ``latest`` first, then the older complete
        ones, newest first, each skipped one warned about by name. None in a directory with no checkpoint."""
        first = self.latest()
        if first is None:
            return None
        first_step = _step_of(first)
        older = [path for path in reversed(self.list()) if _step_of(path) < first_step]
        failures = []
        for number, path in enumerate([first, *older]):
            try:
                return self.load(path, rank=rank)
            except DataFormatError as error:
                failures.append(str(error))
                following = older[number] if number < len(older) else None
                if following is not None:
                    warnings.warn(f"cannot resume from {path.name} ({error}); falling back to the previous "
                                  f"checkpoint {following.name}", stacklevel=2)
        raise DataFormatError(f"no checkpoint in {self.directory} can be loaded: {'; '.join(failures)}. Move the "
                              "damaged ones aside, or start over with trainer.resume=false or another output_dir")

    def _candidates(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.iterdir() if _CHECKPOINT_RE.match(p.name) and p.is_dir()]

    def _install(self, partial: Path, final: Path) -> None:
        replaced = None
        if final.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside, swap, then delete.
            replaced = final.with_name(f"{final.name}.replaced-{os.getpid()}")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(partial, final)
        fsync_path(self.directory)
        if replaced is not None:
            _remove(replaced)

    def _write_latest(self, name: str) -> None:
        temporary = self.directory / f".{LATEST}.tmp-{os.getpid()}"
        with open(temporary, "w") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.directory / LATEST)
        fsync_path(self.directory)

    def _cleanup(self, keep: Path) -> None:
        for entry in self.directory.iterdir():
            # Leftovers of a crashed save or deletion: never a usable checkpoint.
            if entry.name.startswith("step_") and (".partial-" in entry.name or ".deleting-" in entry.name):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(f".{LATEST}.tmp-"):
                entry.unlink(missing_ok=True)
        complete = self.list()
        kept = set(complete[-self.keep_last:]) | {keep}
        # Old complete checkpoints beyond keep_last, and old copies of re-saved steps that are complete
        # again. Incomplete step_N dirs are left alone (for inspection); list() already ignores them.
        for path in self._candidates():
            if path not in kept and (path in complete or ".replaced-" in path.name):
                _remove(path)


def _encode_main(step: int, *, model_state: dict[str, torch.Tensor], optimizer_state: dict | None,
                 scheduler_state: dict | None, extra: dict | None, include_rng: bool, world_size: int = 1
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The main process's files of a checkpoint, encoded: ({safetensors file: tensors}, {json file: tree})."""
    tensor_files = {"model.safetensors": _cpu_copies(model_state, "model_state")}
    json_files: dict[str, Any] = {}
    if optimizer_state is not None:
        json_files["optimizer.json"], tensors = encode_state(optimizer_state)
        tensor_files["optimizer.safetensors"] = _cpu_copies(tensors, "optimizer_state")
    tree, tensors = encode_state({"scheduler_state": scheduler_state, "extra": extra})
    if tensors:
        tensor_files["state.safetensors"] = _cpu_copies(tensors, "scheduler_state/extra")
    rng_tree = None
    if include_rng:
        rng_tree, tensors = rng_state()
        tensor_files["rng.safetensors"] = _cpu_copies(tensors, "rng")
    json_files["state.json"] = {"format_version": FORMAT_VERSION, "step": step, "state": tree, "rng": rng_tree,
                                "world_size": world_size}
    return tensor_files, json_files


def _step_of(path: Path) -> int:
    return int(_CHECKPOINT_RE.match(path.name).group(1))


def _remove(path: Path) -> None:
    # Rename first so a crash mid-delete leaves a name the next cleanup recognises as garbage.
    doomed = path.with_name(f"{path.name}.deleting-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _cpu_copies(tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Fresh contiguous CPU tensors: safetensors refuses non-contiguous or storage-sharing (tied) tensors."""
    copies = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ConfigError(f"{what}[{name!r}]: expected a str key and a dense tensor, got {type(tensor).__name__}")
        copies[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu").copy_(tensor.detach())
    return copies


def _verify(path: Path, check_hashes: bool, skip_hashes_of: Any = None) -> dict:
    """The manifest of ``path``; raises DataFormatError naming the first file that does not match it."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        listed = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError as error:
        raise DataFormatError(f"{manifest_path} is missing: the checkpoint is incomplete") from error
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataFormatError(f"{manifest_path} is unreadable or malformed: {error!r}") from error
    for name in _REQUIRED:
        if name not in listed:
            raise DataFormatError(f"{manifest_path} does not list {name}")
    for name, (size, digest) in listed.items():
        file = path / name
        if Path(name).name != name:
            raise DataFormatError(f"{manifest_path} lists {name!r}, which is not a plain file name")
        try:
            actual = file.stat().st_size
        except OSError as error:
            raise DataFormatError(f"{file} is listed in the manifest but missing") from error
        if actual != size:
            raise DataFormatError(f"{file} has {actual} bytes but the manifest says {size}: truncated or altered")
        if check_hashes and not (skip_hashes_of and skip_hashes_of(name)) and file_sha256(file) != digest:
            raise DataFormatError(f"{file} does not match its sha256 in the manifest: corrupted or altered")
    return manifest
