"""WebDataset shards: the sample schema, safe decoding, the atomic shard writer, the index, build and verify.

The schema is documented for users in ``shards/README.md``; this module is its single implementation.
A sample is a group of tar members sharing a key (``KEY.hsi.npy``, ``KEY.meta.json``, ...). Arrays are
``.npy`` read with ``allow_pickle=False`` and JSON is parsed as data, so decoding never executes code;
members that could only be decoded by unpickling are refused with :class:`UnsafeDataError`.
An index names only plain files inside its own folder; remote or ``pipe:`` sources are never taken from an
index, only from the user's own ``shard_source`` template (:func:`shard_urls`, :func:`open_shard`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import string
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from hsfm_train.data.scene import Scene
from hsfm_train.data.tiling import Tile, TilingConfig, iter_tiles
from hsfm_train.io import fsync_path, write_json_atomic
from hsfm_train.errors import ConfigError, DataFormatError, UnsafeDataError

SCHEMA_VERSION = 1
INDEX_FILE = "index.json"
SHARD_PATTERN = "{name}-{number:06d}.tar"
PARTIAL_SUFFIX = ".partial"
# A shard file named by an index: one plain path component. No separators or "..", no ":" (so no pipe:,
# http:// or s3:// for webdataset.gopen to act on), no leading "." or "-", no whitespace or shell
# metacharacters: an index shared with a dataset can then only ever name files in its own folder.
SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
REMOTE_HINT = "remote or pipe: sources come only from your own loader config (shard_source), never from an index"

# Every member a sample may carry; anything else is ignored and counted.
ARRAY_MEMBERS = (
    "hsi.npy",
    "wavelengths.npy",
    "valid.npy",
    "labels.npy",
    "abundances.npy",
    "endmembers.npy",
    "pair.npy",
    "pair_wavelengths.npy",
)
KNOWN_MEMBERS = frozenset(ARRAY_MEMBERS + ("meta.json",))
# Extensions whose only decoder is pickle (webdataset's .pyd/.pickle, torch.save files).
PICKLE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "joblib"})
TILE_DTYPES = {"float16": np.float16, "float32": np.float32}
FLOAT16_MAX = float(np.finfo(np.float16).max)


class SampleError(DataFormatError):
    """One sample is bad (missing member, NaN, wrong dtype or band count); the loader skips and counts it."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------- encoding


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes, where: str) -> np.ndarray:
    """Read an .npy payload without ever unpickling: object arrays are refused as unsafe."""
    try:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error) or "Object arrays" in str(error):
            raise UnsafeDataError(f"{where}: object-dtype .npy would need unpickling; refused") from None
        raise SampleError("undecodable_array", f"{where}: not a valid .npy array ({error})") from None
    except Exception as error:  # truncated header, bad magic...
        raise SampleError("undecodable_array", f"{where}: not a valid .npy array ({error})") from None


def band_set_id(sensor: str, bands: int, wavelengths_nm: np.ndarray | None) -> str:
    """A readable, stable name for a band configuration: sensor, band count and a digest of the centres."""
    slug = re.sub(r"[^a-z0-9]+", "_", sensor.lower()).strip("_") or "unknown"
    if wavelengths_nm is None:
        digest = "nowl"
    else:
        rounded = np.round(np.asarray(wavelengths_nm, dtype=np.float64), 2)
        digest = hashlib.sha1(rounded.astype("<f8").tobytes()).hexdigest()[:8]
    return f"{slug}-b{bands}-{digest}"


def encode_tile(tile: Tile, scene: Scene, dtype: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Members of one sample and its meta record; ``tile.hsi``/``tile.pair`` are cast to ``dtype`` in place
    so the caller's statistics see exactly the stored values."""
    np_dtype = TILE_DTYPES[dtype]
    tile.hsi = hsi = tile.hsi.astype(np_dtype, copy=False)
    meta: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "scene": scene.name,
        "sensor": scene.sensor,
        "band_set": band_set_id(scene.sensor, scene.num_bands, scene.wavelengths_nm),
        "bands": scene.num_bands,
        "origin": [tile.row, tile.col],
        "size": list(tile.hsi.shape[1:]),
        "dtype": dtype,
        "valid_fraction": 1.0 if tile.valid is None else float(tile.valid.mean()),
    }
    members = {"hsi.npy": encode_npy(hsi)}
    if scene.wavelengths_nm is not None:
        members["wavelengths.npy"] = encode_npy(scene.wavelengths_nm.astype(np.float32))
    if tile.valid is not None:
        members["valid.npy"] = encode_npy(tile.valid.astype(np.uint8))
    if tile.labels is not None:
        members["labels.npy"] = encode_npy(tile.labels.astype(np.int16))
    if tile.abundances is not None:
        members["abundances.npy"] = encode_npy(tile.abundances.astype(np.float32))
    if scene.endmembers is not None:
        members["endmembers.npy"] = encode_npy(scene.endmembers.astype(np.float32))
        if scene.endmember_names:
            meta["endmember_names"] = scene.endmember_names
    if tile.pair is not None:
        pair_sensor = scene.pair_sensor or "unknown"
        tile.pair = tile.pair.astype(np_dtype, copy=False)
        members["pair.npy"] = encode_npy(tile.pair)
        if scene.pair_wavelengths_nm is not None:
            members["pair_wavelengths.npy"] = encode_npy(scene.pair_wavelengths_nm.astype(np.float32))
        meta["pair_sensor"] = pair_sensor
        meta["pair_bands"] = int(tile.pair.shape[0])
        meta["pair_band_set"] = band_set_id(pair_sensor, int(tile.pair.shape[0]), scene.pair_wavelengths_nm)
    members["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return members, meta


# --------------------------------------------------------------------------------------------- decoding


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/KEY.hsi.npy`` -> (``dir/KEY``, ``hsi.npy``): the key ends at the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    key, dot, extension = base.partition(".")
    if not dot or not key:
        return "", ""
    return (f"{directory}/{key}" if directory else key), extension.lower()


def check_member_safe(extension: str, where: str) -> None:
    if extension.rsplit(".", 1)[-1] in PICKLE_EXTENSIONS:
        raise UnsafeDataError(f"{where}: member type .{extension} can only be decoded by unpickling; refused")


def decode_sample(raw: dict[str, bytes], key: str, where: str) -> dict[str, Any]:
    """Decode and validate one sample's members (images returned as float32); raises SampleError (skippable)
    or UnsafeDataError."""
    for extension in raw:
        check_member_safe(extension, f"{where}: {key}.{extension}")
    if "meta.json" not in raw or "hsi.npy" not in raw:
        missing = [m for m in ("meta.json", "hsi.npy") if m not in raw]
        raise SampleError("incomplete_sample", f"{where}: sample {key!r} lacks {', '.join(missing)}")
    try:
        meta = json.loads(raw["meta.json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SampleError("bad_meta", f"{where}: {key}.meta.json is not JSON ({error})") from None
    if not isinstance(meta, dict) or not {"bands", "band_set", "scene"} <= meta.keys():
        raise SampleError("bad_meta", f"{where}: {key}.meta.json lacks bands/band_set/scene")

    sample: dict[str, Any] = {"key": key, "meta": meta}
    for member in ARRAY_MEMBERS:
        if member in raw:
            sample[member.removesuffix(".npy")] = decode_npy(raw[member], f"{where}: {key}.{member}")

    hsi = sample["hsi"]
    bands = meta["bands"]
    if hsi.dtype not in (np.float16, np.float32):
        raise SampleError("wrong_dtype", f"{where}: {key}.hsi.npy has dtype {hsi.dtype}, expected float16/float32")
    for name in ("hsi", "pair"):  # images are float32 in memory, whatever their dtype on disk
        if name in sample and sample[name].dtype.kind == "f":
            sample[name] = _to_float32(sample[name])
    hsi = sample["hsi"]
    if hsi.ndim != 3 or hsi.shape[0] != bands:
        raise SampleError(
            "wrong_band_count", f"{where}: {key}.hsi.npy has shape {hsi.shape}, meta says {bands} bands [B, H, W]"
        )
    if not np.isfinite(hsi).all():
        raise SampleError("non_finite", f"{where}: {key}.hsi.npy contains NaN or Inf")
    spatial = hsi.shape[1:]
    _check_vector(sample, "wavelengths", bands, key, where)
    for name, leading in (("valid", None), ("labels", None), ("abundances", -1), ("pair", -1)):
        array = sample.get(name)
        if array is None:
            continue
        expected_ndim = 2 if leading is None else 3
        if array.ndim != expected_ndim or tuple(array.shape[-2:]) != tuple(spatial):
            raise SampleError("wrong_shape", f"{where}: {key}.{name}.npy shape {array.shape} does not match tile {spatial}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise SampleError("non_finite", f"{where}: {key}.{name}.npy contains NaN or Inf")
    if "pair" in sample:
        if sample["pair"].shape[0] != meta.get("pair_bands"):
            raise SampleError("wrong_band_count", f"{where}: {key}.pair.npy band count disagrees with meta")
        _check_vector(sample, "pair_wavelengths", sample["pair"].shape[0], key, where)
    if "labels" in sample and sample["labels"].dtype.kind not in "iu":
        raise SampleError("wrong_dtype", f"{where}: {key}.labels.npy must be integer, got {sample['labels'].dtype}")
    return sample


def _to_float32(array: np.ndarray) -> np.ndarray:
    # torch's float16 -> float32 cast is ~15x faster than numpy's (whose float16 ufuncs are emulated);
    # finiteness is then checked on the float32 copy for the same reason.
    if array.dtype == np.float32:
        return array
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).float().numpy()


def _check_vector(sample: dict[str, Any], name: str, length: int, key: str, where: str) -> None:
    vector = sample.get(name)
    if vector is not None and (vector.shape != (length,) or not np.isfinite(vector).all()):
        raise SampleError("wrong_band_count", f"{where}: {key}.{name}.npy has shape {vector.shape}, expected ({length},)")


def iter_raw_samples(stream: io.BufferedIOBase, where: str, counters: dict[str, int]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a tar stream's members into (key, {extension: bytes}).

    Pickle-only members raise UnsafeDataError at once; unknown members are dropped and counted in
    ``counters``. A truncated or corrupt tar raises SampleError("corrupt_shard") after the complete samples
    before the damage have been yielded; the sample being read when it broke is dropped.
    """
    current_key, current = None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for info in archive:
                if not info.isreg():
                    continue
                key, extension = split_member_name(info.name)
                if not key:
                    counters["unknown_member"] = counters.get("unknown_member", 0) + 1
                    continue
                check_member_safe(extension, f"{where}: {info.name}")
                data = archive.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} truncated")
                if key != current_key:
                    if current:
                        yield current_key, current
                    current_key, current = key, {}
                if extension not in KNOWN_MEMBERS:
                    counters["unknown_member"] = counters.get("unknown_member", 0) + 1
                    continue
                current[extension] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise SampleError("corrupt_shard", f"{where}: corrupt or truncated tar ({error})") from None
    if current:
        yield current_key, current


# --------------------------------------------------------------------------------------------- writing


def check_shard_name(name: str) -> None:
    """The writer must never produce a file name that :func:`load_index` would refuse."""
    example = SHARD_PATTERN.format(name=name, number=0)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not SAFE_FILE_NAME.fullmatch(example):
        raise ConfigError(f"shard name {name!r} may only contain letters, digits, '_' and '-', "
                          "and may not start with '-'")


class ShardWriter:
    """Writes numbered tar shards; each appears under its final name only once complete (write, fsync, rename)."""

    def __init__(self, output_dir: Path, name: str, max_samples: int, max_bytes: int):
        check_shard_name(name)
        self.output_dir = Path(output_dir)
        self.name = name
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.records: list[dict[str, Any]] = []
        self._file = None
        self._archive = None
        self._hasher = None
        self._samples = 0
        self._bytes = 0
        self._band_sets: dict[str, int] = {}

    def write(self, key: str, members: dict[str, bytes], band_set: str) -> None:
        size = sum(len(d) for d in members.values())
        if self._archive is not None and (self._samples >= self.max_samples or self._bytes + size > self.max_bytes):
            self._finish_shard()
        if self._archive is None:
            self._start_shard()
        for extension in sorted(members):
            data = members[extension]
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: byte-identical rebuilds
            self._archive.addfile(info, io.BytesIO(data))
        self._samples += 1
        self._bytes += size
        self._band_sets[band_set] = self._band_sets.get(band_set, 0) + 1

    def close(self) -> list[dict[str, Any]]:
        if self._archive is not None:
            self._finish_shard()
        return self.records

    def abort(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._file.close()
            Path(self._file.name).unlink(missing_ok=True)
            self._archive = None

    def _final_path(self) -> Path:
        return self.output_dir / SHARD_PATTERN.format(name=self.name, number=len(self.records))

    def _start_shard(self) -> None:
        final = self._final_path()
        self._hasher = hashlib.sha256()
        self._file = _HashingFile(final.with_name(f".{final.name}{PARTIAL_SUFFIX}"), self._hasher)
        self._archive = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._samples, self._bytes, self._band_sets = 0, 0, {}

    def _finish_shard(self) -> None:
        final = self._final_path()
        self._archive.close()
        self._file.close_synced()
        os.replace(self._file.name, final)
        fsync_path(self.output_dir)
        self.records.append(
            {
                "file": final.name,
                "samples": self._samples,
                "bytes": final.stat().st_size,
                "sha256": self._hasher.hexdigest(),
                "band_sets": dict(sorted(self._band_sets.items())),
            }
        )
        self._archive = None


class _HashingFile(io.FileIO):
    def __init__(self, path: Path, hasher: Any):
        super().__init__(path, "w")
        self._hasher = hasher

    def write(self, data: Any) -> int:
        self._hasher.update(data)
        return super().write(data)

    def close_synced(self) -> None:
        self.flush()
        os.fsync(self.fileno())
        self.close()


class BandStatistics:
    """Per-band mean/std over valid pixels, merged tile by tile (Chan et al.) in float64."""

    def __init__(self, bands: int):
        self.count = 0
        self.mean = np.zeros(bands)
        self.m2 = np.zeros(bands)

    def update(self, tile: np.ndarray, valid: np.ndarray | None) -> None:
        pixels = tile.reshape(tile.shape[0], -1).astype(np.float64)
        if valid is not None:
            pixels = pixels[:, valid.reshape(-1)]
        count = pixels.shape[1]
        if count == 0:
            return
        mean = pixels.mean(axis=1)
        m2 = ((pixels - mean[:, None]) ** 2).sum(axis=1)
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta**2 * self.count * count / total
        self.count = total

    def summary(self) -> dict[str, Any]:
        std = np.sqrt(self.m2 / max(self.count - 1, 1))
        return {"pixels": self.count, "mean": _floats(self.mean), "std": _floats(std)}


def _floats(values: Iterable[float]) -> list[float]:
    return [float(f"{v:.7g}") for v in values]


# --------------------------------------------------------------------------------------------- build


@dataclass
class ShardBuildConfig:
    output_dir: str
    name: str = "shard"
    tiling: TilingConfig = field(default_factory=TilingConfig)
    dtype: str = "float16"
    max_samples_per_shard: int = 256
    max_shard_bytes: int = 256 * 2**20
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in TILE_DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(TILE_DTYPES)}, got {self.dtype!r}")
        check_shard_name(self.name)
        if self.max_samples_per_shard < 1 or self.max_shard_bytes < 1:
            raise ConfigError("max_samples_per_shard and max_shard_bytes must be positive")


def build_shards(scenes: Iterable[Scene], config: ShardBuildConfig, progress: bool = False) -> dict[str, Any]:
    """Tile ``scenes`` and write shards plus ``index.json``; deterministic for the same scenes and seed.

    Tiles of each scene are written in an order permuted by (seed, scene number); scenes are processed one
    at a time, so memory holds one scene. The index is written last: a build that dies part-way leaves no
    index (and never a truncated shard under a final name).
    """
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    index_path = output / INDEX_FILE
    if index_path.exists() and not config.overwrite:
        raise FileExistsError(f"{index_path} exists; pass overwrite=True (--overwrite) to rebuild")
    for stale in output.glob(f".{config.name}-*{PARTIAL_SUFFIX}"):
        stale.unlink()

    writer = ShardWriter(output, config.name, config.max_samples_per_shard, config.max_shard_bytes)
    band_sets: dict[str, dict[str, Any]] = {}
    statistics: dict[str, BandStatistics] = {}
    scene_records: list[dict[str, Any]] = []
    dropped: dict[str, int] = {}
    seen_names: set[str] = set()
    progress_bar = _progress(progress, "tiling scenes")
    try:
        for scene_number, scene in enumerate(scenes):
            if scene.name in seen_names:
                raise DataFormatError(f"two input scenes are named {scene.name!r}; scene names must be unique")
            seen_names.add(scene.name)
            if config.dtype == "float16" and float(np.abs(scene.cube).max(initial=0.0)) > FLOAT16_MAX:
                raise DataFormatError(
                    f"scene {scene.name!r} ({scene.source}) has values beyond float16 range; use dtype float32"
                )
            scene_dropped: dict[str, int] = {}
            tiles = list(iter_tiles(scene, config.tiling, scene_dropped))
            order = np.random.default_rng(np.random.SeedSequence([config.seed, scene_number])).permutation(len(tiles))
            for position in order:
                tile = tiles[position]
                members, meta = encode_tile(tile, scene, config.dtype)
                writer.write(tile.key, members, meta["band_set"])
                _register_band_set(band_sets, statistics, meta["band_set"], scene.sensor, scene.wavelengths_nm,
                                   tile.hsi, tile.valid)
                if tile.pair is not None:
                    _register_band_set(band_sets, statistics, meta["pair_band_set"], meta["pair_sensor"],
                                       scene.pair_wavelengths_nm, tile.pair, tile.valid)
            for reason, count in scene_dropped.items():
                dropped[reason] = dropped.get(reason, 0) + count
            scene_records.append(_scene_record(scene, len(tiles), scene_dropped))
            progress_bar.update(1)
        shard_records = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress_bar.close()

    for band_set, stats in statistics.items():
        band_sets[band_set].update(stats.summary())
    previous = {p.name for p in output.glob(f"{config.name}-*.tar")}
    index = {
        "schema": f"hsfm-shards/{SCHEMA_VERSION}",
        "name": config.name,
        "build": {
            **asdict(config.tiling),
            "dtype": config.dtype,
            "seed": config.seed,
            "max_samples_per_shard": config.max_samples_per_shard,
            "max_shard_bytes": config.max_shard_bytes,
        },
        "total_samples": sum(r["samples"] for r in shard_records),
        "shards": shard_records,
        "band_sets": dict(sorted(band_sets.items())),
        "scenes": scene_records,
        "dropped": dict(sorted(dropped.items())),
    }
    if index["total_samples"] == 0:
        raise DataFormatError(f"no tiles were written to {output} (dropped: {dropped or 'no input scenes'})")
    write_json_atomic(index_path, index)
    for stale in previous - {r["file"] for r in shard_records}:
        (output / stale).unlink()  # left over from an earlier, larger build of the same name
    return {**index, "root": str(output)}


def _register_band_set(
    band_sets: dict[str, dict[str, Any]],
    statistics: dict[str, BandStatistics],
    band_set: str,
    sensor: str,
    wavelengths_nm: np.ndarray | None,
    stored: np.ndarray,
    valid: np.ndarray | None,
) -> None:
    if band_set not in band_sets:
        band_sets[band_set] = {
            "sensor": sensor,
            "bands": int(stored.shape[0]),
            "wavelengths_nm": None if wavelengths_nm is None else _floats(wavelengths_nm),
            "samples": 0,
        }
        statistics[band_set] = BandStatistics(int(stored.shape[0]))
    band_sets[band_set]["samples"] += 1
    statistics[band_set].update(stored, valid)


def _scene_record(scene: Scene, tiles: int, dropped: dict[str, int]) -> dict[str, Any]:
    return {
        "name": scene.name,
        "source": scene.source,
        "sensor": scene.sensor,
        "shape": list(scene.shape),
        "band_set": band_set_id(scene.sensor, scene.num_bands, scene.wavelengths_nm),
        "tiles": tiles,
        "dropped": dropped,
        "has_labels": scene.labels is not None,
        "has_abundances": scene.abundances is not None,
        "has_pair": scene.pair is not None,
    }


def _progress(enabled: bool, description: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(desc=description, unit="scene", disable=not enabled)


# --------------------------------------------------------------------------------------------- reading back


def load_index(path: str | os.PathLike) -> dict[str, Any]:
    """The index of a shard directory (or the index file itself), checked for the fields the loader needs."""
    path = Path(path)
    index_path = path / INDEX_FILE if path.is_dir() else path
    if not index_path.exists():
        raise FileNotFoundError(f"no shard index at {index_path}; build shards with `hsfm shards build`")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{index_path} is not valid JSON ({error})") from None
    if not isinstance(index, dict) or not str(index.get("schema", "")).startswith("hsfm-shards/"):
        raise DataFormatError(f"{index_path} is not an hsfm shard index (no 'schema': 'hsfm-shards/N')")
    for required in ("shards", "band_sets", "total_samples"):
        if required not in index:
            raise DataFormatError(f"{index_path} lacks '{required}'")
    if not isinstance(index["shards"], list):
        raise DataFormatError(f"{index_path}: 'shards' must be a list of shard entries")
    for number, record in enumerate(index["shards"]):
        check_shard_entry(record, number, index_path)
    index["root"] = str(index_path.parent)
    return index


def check_shard_entry(record: Any, number: int, where: str | os.PathLike) -> None:
    """One ``shards`` entry of an index: a mapping with a safe ``file`` name and int counts.

    Raises UnsafeDataError for a file name that could leave the folder or reach a shell/URL opener,
    DataFormatError for a malformed entry.
    """
    entry = f"{where}: shards[{number}]"
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise DataFormatError(f"{entry} must be a mapping with a 'file' name, got {record!r}; {REMOTE_HINT}")
    file = record["file"]
    if not SAFE_FILE_NAME.fullmatch(file):
        raise UnsafeDataError(f"{entry} has file {file!r}, which is not a plain file name inside the shard "
                              f"folder (letters, digits, '_', '.', '+', '-'); refused; {REMOTE_HINT}")
    for key, required in (("samples", True), ("bytes", False)):
        value = record.get(key)
        if value is None and not required:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:  # bool is an int subclass
            raise DataFormatError(f"{entry} ({file!r}) '{key}' must be an integer >= 0, got {value!r}")


def check_shard_source(source: str) -> None:
    """A user's ``shard_source`` template must use ``{file}`` and nothing else as a placeholder."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(source) if name is not None]
    except ValueError as error:
        raise ConfigError(f"shard_source {source!r} is not a valid template ({error}); "
                          "write literal braces as {{ and }}") from None
    if "file" not in fields or set(fields) != {"file"}:
        raise ConfigError(f"shard_source {source!r} must contain {{file}} and no other placeholder, "
                          "e.g. 'pipe:aws s3 cp s3://bucket/ds/{file} -' or '/mnt/other/{file}'")


def shard_urls(index: dict[str, Any], source: str | None = None) -> list[str]:
    """Where each shard is read from: the index's own folder, or ``source`` (a user-given template such as
    ``"https://host/ds/{file}"``) with each checked file name substituted."""
    where = Path(index.get("root", "")) / INDEX_FILE
    for number, record in enumerate(index["shards"]):  # again here, for indexes not read by load_index
        check_shard_entry(record, number, where)
    files = [record["file"] for record in index["shards"]]
    if source is None:
        return [str(Path(index["root"]) / file) for file in files]
    check_shard_source(source)
    return [source.format(file=file) for file in files]


def open_shard(url: str, remote: bool) -> BinaryIO:
    """A binary stream of one shard. Local paths are opened with ``open`` and never with ``gopen`` (which
    would run a ``pipe:`` path); ``gopen`` is used only when the user configured a remote ``shard_source``."""
    if not remote:
        return open(url, "rb")
    import webdataset

    return webdataset.gopen(url, "rb")


def check_shard_files(index: dict[str, Any]) -> list[str]:
    """Cheap check of a local shard folder without reading shards: each listed file exists and has the
    size the index records. One problem string per bad file."""
    problems: list[str] = []
    for record, path in zip(index["shards"], shard_urls(index)):
        try:
            status = os.stat(path)
        except FileNotFoundError:
            problems.append(f"{path}: listed in the index but missing")
            continue
        if not stat.S_ISREG(status.st_mode):
            problems.append(f"{path}: not a regular file")
        elif "bytes" in record and status.st_size != record["bytes"]:
            problems.append(f"{path}: {status.st_size} bytes on disk, index says {record['bytes']} "
                            "(truncated or changed)")
    return problems


def verify_shards(index: dict[str, Any]) -> dict[str, Any]:
    """Read every shard: sample counts and checksums against the index, and every sample decoded."""
    problems: list[str] = []
    counts: dict[str, int] = {}
    samples = 0
    for record, url in zip(index["shards"], shard_urls(index)):
        counters: dict[str, int] = {}
        hasher = hashlib.sha256()
        found = 0
        try:
            with open(url, "rb") as handle:
                stream = _HashingReader(handle, hasher)
                try:
                    for key, raw in iter_raw_samples(stream, url, counters):
                        try:
                            decode_sample(raw, key, url)
                            found += 1
                        except SampleError as error:
                            counters[error.reason] = counters.get(error.reason, 0) + 1
                            problems.append(str(error))
                except SampleError as error:
                    counters[error.reason] = counters.get(error.reason, 0) + 1
                    problems.append(str(error))
                stream.drain()
        except FileNotFoundError:
            problems.append(f"{url}: listed in the index but missing")
            continue
        if found != record["samples"]:
            problems.append(f"{url}: {found} readable samples, index says {record['samples']}")
        if "sha256" in record and hasher.hexdigest() != record["sha256"]:
            problems.append(f"{url}: sha256 differs from the index (file changed or corrupt)")
        samples += found
        for reason, count in counters.items():
            counts[reason] = counts.get(reason, 0) + count
    return {"shards": len(index["shards"]), "samples": samples, "problems": problems, "counts": counts}


class _HashingReader(io.RawIOBase):
    def __init__(self, handle: Any, hasher: Any):
        self._handle, self._hasher = handle, hasher

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._handle.readinto(buffer)
        self._hasher.update(memoryview(buffer)[:count])
        return count

    def drain(self) -> None:
        while self._handle.readable() and (chunk := self._handle.read(1 << 20)):
            self._hasher.update(chunk)


def summarise_tar(path: str | os.PathLike) -> dict[str, Any]:
    """One shard on its own (no index needed): sample count, member types, first meta, decoding problems."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"shard {path} does not exist")
    counters: dict[str, int] = {}
    members: dict[str, int] = {}
    problems: list[str] = []
    samples, first_meta = 0, None
    with open(path, "rb") as handle:
        try:
            for key, raw in iter_raw_samples(handle, str(path), counters):
                for extension in raw:
                    members[extension] = members.get(extension, 0) + 1
                try:
                    sample = decode_sample(raw, key, str(path))
                    first_meta = first_meta or sample["meta"]
                    samples += 1
                except SampleError as error:
                    problems.append(str(error))
        except SampleError as error:
            problems.append(str(error))
    if counters.get("unknown_member"):
        problems.append(f"{path}: {counters['unknown_member']} member(s) of unknown type ignored")
    return {"path": str(path), "samples": samples, "members": members, "first_meta": first_meta, "problems": problems}
