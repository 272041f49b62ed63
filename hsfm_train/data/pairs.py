"""Co-registered optical-SAR image pairs: reading them, and the held-out split.

A pair is an optical image and the SAR image of the same ground, [H, W, C] each, with their band centres (the
wavelength-aware backbone reads both through one tokenizer). Sources:

* an optical-SAR stack (``.npz`` with ``optical`` and ``sar``, e.g. the Volkov S2 RGB / S1 VH set), read with
  :func:`hsfm_train.data.readers.read_scenes`;
* a YAML manifest: a list of ``{path: optical.png, pair: sar.png, <reader option>: ...}`` entries (relative paths
  are relative to the manifest), each read with ``read_scene(path, pair=..., **options)``; PNGs carry no band
  centres, so an entry (or the reader options given to :func:`read_pairs`) needs ``sensor_preset`` or
  ``wavelengths_nm`` for the optical image; SAR without ``pair_wavelengths_nm`` is taken as Sentinel-1 C band.

The split is by *source*: crops cut from one source image stay on one side, so a held-out pair never shares
ground with a training pair. A source is held out when the first 8 bytes of the sha256 of its name, read as a
fraction of 2^64, fall below ``held_out_fraction``: stable under reordering and subsetting, no seed to carry.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hsfm_train.errors import DataFormatError

SPLITS = ("all", "held_out", "train")
DEFAULT_SAR_WAVELENGTHS_NM = (5.5465763e7,)  # Sentinel-1 C band, 5.405 GHz


@dataclass
class ImagePair:
    name: str
    source: str  # the source image: pairs of one source share a side of the split
    optical: np.ndarray  # [H, W, C] float32
    optical_wavelengths: np.ndarray  # [C] nm
    sar: np.ndarray  # [H, W, C'] float32
    sar_wavelengths: np.ndarray  # [C'] nm


def held_out(source: str, fraction: float) -> bool:
    """Whether the pairs of ``source`` belong to the held-out split (see the module docstring)."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


def scene_source(scene) -> str:
    """The source image a scene was cut from (its ``source_image`` metadata), else its own name."""
    return str((scene.metadata or {}).get("source_image", scene.name))


def split_scenes(scenes: Iterable, split: str, fraction: float, unpair_fraction: float = 0.0) -> Iterator:
    """The scenes of ``split`` (by source, as :func:`held_out` decides); with ``unpair_fraction``, the scenes of
    that fraction of sources (by a second, independent hash) lose their paired image, so that a stream holds
    paired and unpaired samples of the same sensors."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    for scene in scenes:
        source = scene_source(scene)
        if split != "all" and held_out(source, fraction) != (split == "held_out"):
            continue
        if unpair_fraction > 0 and scene.pair is not None and held_out(f"unpaired:{source}", unpair_fraction):
            scene = replace(scene, pair=None, pair_wavelengths_nm=None, pair_sensor=None)
        yield scene


def select_split(pairs: list[ImagePair], split: str, fraction: float) -> list[ImagePair]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if split == "all":
        return list(pairs)
    keep = split == "held_out"
    return [pair for pair in pairs if held_out(pair.source, fraction) == keep]


def _manifest_entries(path: Path) -> list[dict[str, Any]]:
    import yaml

    entries = yaml.safe_load(path.read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e and "pair" in e
                                                for e in entries):
        raise DataFormatError(f"manifest {path} must be a list of mappings, each with 'path' (optical) and 'pair' "
                              "(SAR)")
    for entry in entries:
        for key in ("path", "pair"):
            if not Path(entry[key]).is_absolute():
                entry[key] = str(path.parent / entry[key])
    return entries


def _pair_of(scene, where: str) -> ImagePair:
    if scene.pair is None:
        raise DataFormatError(f"{where}: scene {scene.name} has no paired SAR image")
    if scene.wavelengths_nm is None:
        raise DataFormatError(f"{where}: scene {scene.name} has no optical band centres (reader option "
                              "sensor_preset= or wavelengths_nm=)")
    sar_wavelengths = scene.pair_wavelengths_nm
    if sar_wavelengths is None:
        sar_wavelengths = np.full(scene.pair.shape[2], DEFAULT_SAR_WAVELENGTHS_NM[0], dtype=np.float32)
    return ImagePair(scene.name, scene_source(scene), np.asarray(scene.cube, dtype=np.float32),
                     np.asarray(scene.wavelengths_nm, dtype=np.float32).reshape(-1),
                     np.asarray(scene.pair, dtype=np.float32), np.asarray(sar_wavelengths, dtype=np.float32))


def read_pairs(path: str | Path, reader: dict[str, Any] | None = None) -> list[ImagePair]:
    """Every pair in an optical-SAR stack or a YAML manifest (see the module docstring)."""
    from hsfm_train.data.readers import read_scene, read_scenes

    path = Path(path)
    reader = dict(reader or {})
    if not path.exists():
        raise DataFormatError(f"{path} does not exist")
    if path.suffix.lower() in (".yaml", ".yml"):
        pairs = []
        for number, entry in enumerate(_manifest_entries(path)):
            options = {**reader, **{k: v for k, v in entry.items() if k != "path"}}
            pairs.append(_pair_of(read_scene(entry["path"], **options), f"{path} entry {number}"))
        return pairs
    return [_pair_of(scene, str(path)) for scene in read_scenes(path, **reader)]


# ------------------------------------------------------------------------------------------- shard sets


@dataclass
class PairShardsConfig:
    """The train and held-out shard sets of an optical-SAR stack, built once into ``output_dir`` and reused."""
    path: str = "../shared/data/optical_sar/volkov_s1s2_aligned/volkov_s1s2_256.npz"
    reader: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "shards/pairs"
    tile_size: int = 64
    held_out_fraction: float = 0.2
    unpair_fraction: float = 0.0  # this share of the training sources loses its SAR image (unpaired samples)


PAIRS_FILE = "pairs.json"


def build_pair_shards(config: PairShardsConfig) -> tuple[Path, Path]:
    """``output_dir/train`` (the sources :func:`held_out` keeps out, ``unpair_fraction`` of them unpaired) and
    ``output_dir/held_out`` (always paired). A complete earlier build of the same file and settings is reused."""
    from hsfm_train.data.readers import read_scenes
    from hsfm_train.data.shards import INDEX_FILE, ShardBuildConfig, build_shards
    from hsfm_train.data.tiling import TilingConfig
    from hsfm_train.io import file_sha256, read_json, write_json_atomic

    source = Path(config.path)
    if not source.exists():
        raise DataFormatError(f"optical-SAR pairs {source} do not exist (the Volkov stack ships in ../shared/data; "
                              "set data.pairs.path)")
    output = Path(config.output_dir)
    train_dir, held_dir = output / "train", output / "held_out"
    record = {"config": asdict(config), "sha256": file_sha256(source)}
    record_path = output / PAIRS_FILE
    complete = all((d / INDEX_FILE).exists() for d in (train_dir, held_dir))
    if complete and record_path.exists():
        try:
            if read_json(record_path) == json.loads(json.dumps(record)):
                return train_dir, held_dir
        except DataFormatError:
            pass
    record_path.unlink(missing_ok=True)
    for split, directory, unpair in (("train", train_dir, config.unpair_fraction), ("held_out", held_dir, 0.0)):
        scenes = split_scenes(read_scenes(source, **config.reader), split, config.held_out_fraction, unpair)
        build_shards(scenes, ShardBuildConfig(output_dir=str(directory), tiling=TilingConfig(config.tile_size),
                                              overwrite=True))
    write_json_atomic(record_path, record)
    return train_dir, held_dir
