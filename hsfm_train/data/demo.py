"""Demo shards built only from data shipped in the package, so `hsfm pretrain` runs anywhere with no arguments.

Two sources, tiled by :func:`~hsfm_train.data.shards.build_shards` into ``train/`` and ``eval/`` shard sets:

* Samson (real, 156 bands, 400-899 nm; ``assets/samson_demo.npz``): its bottom ``holdout_rows`` rows are cropped
  into a separate held-out scene, so no evaluation pixel is ever seen in training.
* Linear-mixing scenes from real USGS spectra (:mod:`hsfm_train.data.synthetic`), alternating over several sensor
  band grids because the backbone is wavelength-conditioned and must see more than one band set. Held-out scenes
  come from a seed stream disjoint from the training one.

``demo.json`` (the build's config) is written last, so its presence marks a complete build that later calls reuse.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator


from hsfm_train.data.readers import read_scene
from hsfm_train.data.scene import Scene
from hsfm_train.data.shards import INDEX_FILE, ShardBuildConfig, build_shards
from hsfm_train.io import write_json_atomic
from hsfm_train.data.synthetic import SyntheticSceneConfig, generate_scene, scene_seed
from hsfm_train.spectra import load_spectral_library
from hsfm_train.data.tiling import TilingConfig
from hsfm_train.errors import ConfigError

SAMSON_ASSET = "samson_demo.npz"
DEMO_FILE = "demo.json"
# Bump when the way demo data is made changes, so builds cached by older code are not reused.
DEMO_BUILD_VERSION = 1
# Training scene i uses scene_seed(seed, i); held-out scene j uses scene_seed(seed, HOLDOUT_SEED_INDEX_BASE + j),
# an index range training never reaches, so the two splits never share a scene.
HOLDOUT_SEED_INDEX_BASE = 2**31
SPATIAL_FIELDS = ("cube", "labels", "abundances", "nodata_mask", "pair")


@dataclass
class DemoDataConfig:
    synthetic_scenes: int = 12  # linear-mixing training scenes from real USGS spectra
    synthetic_size: int = 64
    # SENSOR_GRIDS names, used in turn
    synthetic_grids: list[str] = field(default_factory=lambda: ["aviris224", "enmap_like_218"])
    holdout_rows: int = 32  # bottom rows of Samson held out for evaluation
    holdout_synthetic: int = 2  # held-out synthetic scenes (disjoint seeds)
    tile_size: int = 32
    stride: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        self.synthetic_grids = [str(grid) for grid in self.synthetic_grids]
        if not self.synthetic_grids:
            raise ConfigError("DemoDataConfig.synthetic_grids must name at least one sensor grid")
        if self.synthetic_scenes < 0 or self.holdout_synthetic < 0:
            raise ConfigError("DemoDataConfig.synthetic_scenes and holdout_synthetic must be >= 0")
        if min(self.tile_size, self.stride) < 1:
            raise ConfigError("DemoDataConfig.tile_size and stride must be >= 1")
        if self.synthetic_size < self.tile_size:
            raise ConfigError(
                f"DemoDataConfig.synthetic_size {self.synthetic_size} is smaller than tile_size {self.tile_size}"
            )
        # Fewer held-out rows than a tile would leave evaluation without any real-data tile.
        if self.holdout_rows < self.tile_size:
            raise ConfigError(
                f"DemoDataConfig.holdout_rows {self.holdout_rows} must be >= tile_size {self.tile_size}"
            )


def load_demo_samson() -> Scene:
    """The packaged Samson scene: [95, 95, 156] float32 cube, wavelengths, 3 endmembers and their abundances."""
    with resources.as_file(resources.files("hsfm_train") / "assets" / SAMSON_ASSET) as path:
        scene = read_scene(path, sensor="samson", name="samson")
    scene.source = f"hsfm_train/assets/{SAMSON_ASSET}"
    scene.abundances /= scene.abundances.sum(axis=2, keepdims=True)  # float16 storage leaves sums off by <4e-4
    return scene


def build_demo_shards(
    output_dir: str | Path, config: DemoDataConfig | None = None, overwrite: bool = False
) -> tuple[Path, Path]:
    """Write ``output_dir/train`` and ``output_dir/eval`` shard sets (each with index.json); return their dirs.

    A complete earlier build whose recorded config matches is reused (so repeated `hsfm pretrain` runs do not
    rebuild) unless ``overwrite``; any other content of the two directories is replaced.
    """
    config = config or DemoDataConfig()
    output = Path(output_dir)
    train_dir, eval_dir = output / "train", output / "eval"
    record_path = output / DEMO_FILE
    record = {"version": DEMO_BUILD_VERSION, "config": json.loads(json.dumps(asdict(config)))}
    complete = all((directory / INDEX_FILE).exists() for directory in (train_dir, eval_dir))
    if not overwrite and complete and _read_record(record_path) == record:
        return train_dir, eval_dir

    samson = load_demo_samson()
    split_row = samson.cube.shape[0] - config.holdout_rows
    if split_row < config.tile_size:
        raise ConfigError(
            f"DemoDataConfig.holdout_rows {config.holdout_rows} leaves {split_row} Samson rows for training, "
            f"fewer than tile_size {config.tile_size}"
        )
    # Drop the old record first: a rebuild that dies part-way must not leave it vouching for mixed shards.
    record_path.unlink(missing_ok=True)
    train_scenes = [_crop_rows(samson, 0, split_row, "samson-train")]
    eval_scenes = [_crop_rows(samson, split_row, samson.cube.shape[0], "samson-holdout")]
    train_seeds = [scene_seed(config.seed, i) for i in range(config.synthetic_scenes)]
    eval_seeds = [scene_seed(config.seed, HOLDOUT_SEED_INDEX_BASE + j) for j in range(config.holdout_synthetic)]
    for directory, real, seeds, prefix in (
        (train_dir, train_scenes, train_seeds, "synthetic-train"),
        (eval_dir, eval_scenes, eval_seeds, "synthetic-holdout"),
    ):
        shard_config = ShardBuildConfig(
            output_dir=str(directory),
            name=directory.name,
            tiling=TilingConfig(tile_size=config.tile_size, stride=config.stride),
            dtype="float16",
            seed=config.seed,
            overwrite=True,
        )
        build_shards([*real, *_synthetic_scenes(config, seeds, prefix)], shard_config)
    write_json_atomic(record_path, record)
    return train_dir, eval_dir


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _crop_rows(scene: Scene, start: int, stop: int, name: str) -> Scene:
    """Rows [start, stop) of every spatial array; the row range is kept in ``source`` for traceability."""
    cropped = {key: getattr(scene, key)[start:stop] for key in SPATIAL_FIELDS if getattr(scene, key) is not None}
    return dataclasses.replace(
        scene, name=name, source=f"{scene.source} rows {start}:{stop}", metadata=dict(scene.metadata), **cropped
    )


def _synthetic_scenes(config: DemoDataConfig, seeds: list[int], prefix: str) -> Iterator[Scene]:
    """One scene per seed, lazily, cycling through the band grids."""
    library = load_spectral_library()
    grid_configs = [
        SyntheticSceneConfig(
            height=config.synthetic_size,
            width=config.synthetic_size,
            target_wavelengths_nm=grid,
            name_prefix=prefix,
        )
        for grid in config.synthetic_grids
    ]
    for number, seed in enumerate(seeds):
        yield generate_scene(grid_configs[number % len(grid_configs)], seed, library)
