"""Demo shards built only from data shipped in the package, so `hsfm pretrain` runs anywhere with no arguments.

Two sources, tiled by :func:`~hsfm_train.data.shards.build_shards` into ``train/`` and ``eval/`` shard sets:

* Samson (real, 156 bands, 400-899 nm; ``assets/samson_demo.npz``): its bottom ``holdout_rows`` rows are cropped
  into a separate held-out scene, so no evaluation pixel is ever seen in training.
* Linear-mixing scenes from real USGS spectra (:mod:`hsfm_train.data.synthetic`), alternating over several sensor
  band grids because the backbone is wavelength-conditioned and must see more than one band set. Held-out scenes
  come from a seed stream disjoint from the training one. Optionally with Urban's real abundance maps
  (``urban_scenes``, semi-real), varying endmember counts, band-dependent noise, illumination and endmember
  variability.
* Optionally, real cubes from files (``real_scenes``: e.g. the benchmark cubes beside the checkout), read with
  the reader options of `hsfm shards build` manifests. A probe target must not be among them: the experiment
  presets that use them name the scene they leave out.

``demo.json`` (the build's config) is written last, so its presence marks a complete build that later calls reuse.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hsfm_train.data.readers import read_scene
from hsfm_train.data.scene import Scene
from hsfm_train.data.shards import INDEX_FILE, ShardBuildConfig, build_shards
from hsfm_train.io import file_sha256, write_json_atomic
from hsfm_train.data.synthetic import SyntheticSceneConfig, generate_scene, scene_seed, sensor_grid
from hsfm_train.spectra import load_spectral_library
from hsfm_train.data.tiling import TilingConfig
from hsfm_train.errors import ConfigError

SAMSON_ASSET = "samson_demo.npz"
DEMO_FILE = "demo.json"
# Bump when the way demo data is made changes, so builds cached by older code are not reused.
DEMO_BUILD_VERSION = 2
# Training scene i uses scene_seed(seed, i); held-out scene j uses scene_seed(seed, HOLDOUT_SEED_INDEX_BASE + j),
# an index range training never reaches, so the two splits never share a scene.
HOLDOUT_SEED_INDEX_BASE = 2**31
URBAN_SEED_INDEX_BASE = 2**30  # Urban-abundance scenes: a third disjoint range
SPATIAL_FIELDS = ("cube", "labels", "abundances", "nodata_mask", "pair")


@dataclass
class RealSceneConfig:
    path: str = "???"  # a scene file (relative paths: from the working directory)
    reader: dict[str, Any] = field(default_factory=dict)  # read_scene options, e.g. sensor_preset, bands
    holdout_rows: int = 0  # bottom rows moved to the held-out set (0: training only)
    # extra training copies resampled onto these sensor grids (SENSOR_GRIDS or sensor preset names): the same
    # real surfaces seen through other band sets, for a wavelength-conditioned tokenizer
    resample_to: list[str] = field(default_factory=list)


@dataclass
class DemoDataConfig:
    synthetic_scenes: int = 12  # linear-mixing training scenes from real USGS spectra
    synthetic_size: int = 64
    # SENSOR_GRIDS names, used in turn
    synthetic_grids: list[str] = field(default_factory=lambda: ["aviris224", "enmap_like_218"])
    synthetic_endmembers: list[int] = field(default_factory=lambda: [4, 4])  # [fewest, most] per scene
    urban_scenes: int = 0  # extra training scenes whose abundances are crops of Urban's real maps
    noise_model: str = "white"  # or "band_dependent" (see hsfm_train.data.synthetic)
    snr_db: list[float] = field(default_factory=lambda: [30.0, 30.0])  # [lowest, highest] per scene
    illumination_std: float = 0.0
    endmember_variability: float = 0.0
    samson: bool = True  # the packaged Samson scene (its bottom holdout_rows are always the real held-out tiles)
    real_scenes: list[RealSceneConfig] = field(default_factory=list)
    # tile step of the real training scenes (Samson's and real_scenes'), a divisor of stride: a smaller one gives
    # the few real scenes more (overlapping) tiles, i.e. more weight in the mix (None: stride)
    real_stride: int | None = None
    holdout_rows: int = 32  # bottom rows of Samson held out for evaluation
    holdout_synthetic: int = 2  # held-out synthetic scenes (disjoint seeds)
    tile_size: int = 32
    stride: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        self.synthetic_grids = [str(grid) for grid in self.synthetic_grids]
        if not self.synthetic_grids:
            raise ConfigError("DemoDataConfig.synthetic_grids must name at least one sensor grid")
        if self.synthetic_scenes < 0 or self.holdout_synthetic < 0 or self.urban_scenes < 0:
            raise ConfigError("DemoDataConfig.synthetic_scenes, urban_scenes and holdout_synthetic must be >= 0")
        for name, low in (("synthetic_endmembers", 2), ("snr_db", None)):
            pair = list(getattr(self, name))
            if len(pair) != 2 or pair[0] > pair[1] or (low is not None and pair[0] < low):
                raise ConfigError(f"DemoDataConfig.{name} must be [low, high] with low <= high"
                                  + (f" and low >= {low}" if low is not None else "") + f", got {pair}")
        self.real_scenes = [RealSceneConfig(**entry) if isinstance(entry, dict) else entry
                            for entry in self.real_scenes]
        if self.real_stride is not None and (self.real_stride < 1 or self.stride % self.real_stride):
            raise ConfigError(f"DemoDataConfig.real_stride must divide stride {self.stride}, got {self.real_stride}")
        for entry in self.real_scenes:
            if entry.path in ("???", "") or entry.holdout_rows < 0:
                raise ConfigError(f"DemoDataConfig.real_scenes entry {entry}: needs a path and holdout_rows >= 0")
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
    record = {"version": DEMO_BUILD_VERSION, "config": json.loads(json.dumps(asdict(config))),
              # the content of every real file, so an edited file is not served from an old build
              "real_files": [file_sha256(Path(entry.path)) if Path(entry.path).is_file() else None
                             for entry in config.real_scenes]}
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
    train_scenes = [_crop_rows(samson, 0, split_row, "samson-train")] if config.samson else []
    eval_scenes = [_crop_rows(samson, split_row, samson.cube.shape[0], "samson-holdout")]
    for entry in config.real_scenes:
        scene = read_scene(entry.path, **entry.reader)
        rows = scene.cube.shape[0]
        keep = rows - entry.holdout_rows
        if keep < config.tile_size or (entry.holdout_rows and entry.holdout_rows < config.tile_size):
            raise ConfigError(f"DemoDataConfig.real_scenes {entry.path}: {rows} rows split as {keep} training + "
                              f"{entry.holdout_rows} held out; each part needs at least tile_size "
                              f"{config.tile_size} rows")
        train_scenes.append(_crop_rows(scene, 0, keep, f"{scene.name}-train"))
        train_scenes += [resample_scene(train_scenes[-1], grid) for grid in entry.resample_to]
        if entry.holdout_rows:
            eval_scenes.append(_crop_rows(scene, keep, rows, f"{scene.name}-holdout"))
    train_seeds = [scene_seed(config.seed, i) for i in range(config.synthetic_scenes)]
    eval_seeds = [scene_seed(config.seed, HOLDOUT_SEED_INDEX_BASE + j) for j in range(config.holdout_synthetic)]
    train_scenes = [shifted for scene in train_scenes for shifted in _denser_tiling(scene, config)]
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
        synthetic = _synthetic_scenes(config, seeds, prefix)
        if directory is train_dir and config.urban_scenes:
            urban_seeds = [scene_seed(config.seed, URBAN_SEED_INDEX_BASE + j) for j in range(config.urban_scenes)]
            synthetic = itertools.chain(synthetic, _synthetic_scenes(config, urban_seeds, "urban-train", "urban"))
        build_shards([*real, *synthetic], shard_config)
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


def resample_scene(scene: Scene, grid: str) -> Scene:
    """The scene's cube linearly interpolated onto the band centres of ``grid`` that fall inside its own range
    and outside its gaps (a sensor's narrow bands sampled as another's; no spectral response convolution)."""
    source = np.asarray(scene.wavelengths_nm, dtype=np.float64)
    order = np.argsort(source, kind="stable")
    source, cube = source[order], scene.cube[..., order]
    target = sensor_grid(grid).astype(np.float64)
    target = np.sort(target[(target >= source[0]) & (target <= source[-1])])
    # no values made up inside gaps of the source (removed water-absorption bands)
    spacing = np.diff(source)
    gap = spacing > 2.5 * np.median(spacing)
    inside = np.clip(np.searchsorted(source, target) - 1, 0, spacing.size - 1)
    target = target[~gap[inside] | np.isin(target, source)]
    if target.size < 2:
        raise ConfigError(f"cannot resample {scene.name} ({source[0]:.0f}-{source[-1]:.0f} nm) onto {grid}: fewer "
                          "than 2 of its bands fall in that range")
    right = np.clip(np.searchsorted(source, target), 1, source.size - 1)
    left = right - 1
    weight = ((target - source[left]) / np.maximum(source[right] - source[left], 1e-9)).astype(np.float32)
    resampled = cube[..., left] * (1 - weight) + cube[..., right] * weight
    return dataclasses.replace(scene, name=f"{scene.name}-as-{grid}", cube=resampled,
                               wavelengths_nm=target.astype(np.float32), sensor=f"{scene.sensor}-as-{grid}",
                               source=f"{scene.source} resampled onto {grid}", metadata=dict(scene.metadata))


def _denser_tiling(scene: Scene, config: DemoDataConfig) -> list[Scene]:
    """The scene, plus copies cropped by multiples of real_stride so that tiling them at ``stride`` covers the
    scene every real_stride pixels."""
    step = config.real_stride or config.stride
    offsets = range(0, config.stride, step)
    copies = []
    for row in offsets:
        for col in offsets:
            if (row, col) == (0, 0):
                copies.append(scene)
                continue
            cropped = {key: getattr(scene, key)[row:, col:] for key in SPATIAL_FIELDS if getattr(scene, key) is not None}
            if min(cropped["cube"].shape[:2]) >= config.tile_size:
                copies.append(dataclasses.replace(scene, name=f"{scene.name}-shift{row}-{col}",
                                                  source=f"{scene.source} from row {row}, column {col}",
                                                  metadata=dict(scene.metadata), **cropped))
    return copies


def _synthetic_scenes(config: DemoDataConfig, seeds: list[int], prefix: str, abundance_source: str = "gaussian_field"
                      ) -> Iterator[Scene]:
    """One scene per seed, lazily, cycling through the band grids; endmember count and SNR drawn per scene from
    the configured ranges (from the scene's seed, so a scene does not depend on its neighbours)."""
    library = load_spectral_library()
    size = config.synthetic_size
    if abundance_source == "urban":
        size = min(size, 307)  # Urban's maps are 307 x 307
    for number, seed in enumerate(seeds):
        rng = np.random.default_rng([seed, 1])
        low, high = config.synthetic_endmembers
        endmembers = 4 if abundance_source == "urban" else int(rng.integers(low, high + 1))
        snr = float(rng.uniform(*config.snr_db)) if config.snr_db[0] < config.snr_db[1] else float(config.snr_db[0])
        scene_config = SyntheticSceneConfig(
            height=size,
            width=size,
            num_endmembers=endmembers,
            snr_db=snr,
            abundance_source=abundance_source,
            target_wavelengths_nm=config.synthetic_grids[number % len(config.synthetic_grids)],
            name_prefix=prefix,
            noise_model=config.noise_model,
            illumination_std=config.illumination_std,
            endmember_variability=config.endmember_variability,
        )
        yield generate_scene(scene_config, seed, library)
