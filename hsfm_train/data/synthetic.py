"""Synthetic hyperspectral scenes from real library spectra by the linear mixing model.

Each pixel's spectrum is a convex combination of a few pure-material spectra (endmembers) plus sensor noise:

    Y = A · E + N,    A >= 0, sum_r A[..., r] = 1,    N ~ Normal(0, sigma^2)

with Y the [H, W, B] cube, A the [H, W, R] abundances and E the [R, B] endmembers. Only a handful of real
cubes can be shipped (Samson, Salinas-A, Indian Pines), so scale tests and pretraining demos need corpora of any
size whose ground truth (abundances, endmembers) is known exactly; the linear model is the standard way to make
them (the SUnSAL/CLSUnSAL demos used the same USGS library).

* Endmembers are real reflectance spectra from the USGS splib (224 AVIRIS bands, packaged in
  ``hsfm_train/assets``), drawn at random but at least ``min_spectral_angle_deg`` apart, because the library holds
  many near-duplicates (thousands of pairs under 5°) that would make a scene ill-posed. They can be resampled
  onto another sensor's band centres so corpora with different band counts come from the same materials.
* Abundances are spatially coherent, like real land cover: one Gaussian random field per endmember pushed through
  a softmax ("gaussian_field"), or Urban's real ground-truth maps, randomly cropped, flipped and rotated ("urban").
* Noise is Gaussian at the requested SNR: white (one sigma for every band), or "band_dependent", where each
  band's sigma grows with the square root of its mean signal, as photon noise does, so dark bands (water
  absorption, the SWIR tail) are noisier relative to their signal than bright ones.
* Real scenes are not perfectly linear either: ``illumination_std`` multiplies every pixel by a smooth
  log-normal brightness field (topographic shading, thin cloud), and ``endmember_variability`` scales each
  material's spectrum per pixel by a smooth field around 1 (the same material brighter or darker from place to
  place), so a material is a cloud of spectra rather than one point.

Every scene is a deterministic function of (config, seed), so a corpus never has to be stored: scene i of
``generate_scenes(config, count, seed)`` is ``generate_scene(config, scene_seed(seed, i))``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Iterator

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from hsfm_train.data.scene import Scene
from hsfm_train.data.sensors import preset_names, preset_wavelengths
from hsfm_train.errors import ConfigError
from hsfm_train.spectra import SpectralLibrary, load_spectral_library

URBAN_ABUNDANCE_ASSET = "urban_abundances_end4.npz"
ABUNDANCE_SOURCES = ("gaussian_field", "urban")
NOISE_MODELS = ("white", "band_dependent")
# Greedy selection scans a whole random permutation of the library per attempt, so a failure after this many
# attempts means the requested count/angle is (nearly) impossible, not unlucky.
ENDMEMBER_SELECTION_ATTEMPTS = 10
NOISE_BLOCK_VALUES = 2**20


# Band-centre grids of sensors that synthetic corpora can imitate (nm). Callables, so nothing is read at import.
# sensor_grid() also accepts every sensor preset name (hsfm_train.data.sensors: "enmap", "emit", "sentinel2_msi", ...).
SENSOR_GRIDS: dict[str, Callable[[], np.ndarray]] = {
    # The library's own grid: AVIRIS 224 bands, 383-2508 nm (not monotonic where the spectrometers overlap); the same
    # centres as the "aviris" sensor preset, which is built from this library.
    "aviris224": lambda: load_spectral_library().wavelengths_nm,
    # Approximates EnMAP's VNIR+SWIR band count (218) and range; real EnMAP centres are not evenly spaced (the
    # "enmap" sensor preset has the real 224).
    "enmap_like_218": lambda: np.linspace(420.0, 2450.0, 218, dtype=np.float32),
    # Samson's 156 centres from its ENVI header are evenly spaced: this linspace between the real first and last
    # centres matches all 156 within 1e-4 nm (checked against shared/data/unmixing/samson/samson.npz).
    "samson156": lambda: np.linspace(400.93872, 899.07458, 156, dtype=np.float32),
}


def sensor_grid(name: str) -> np.ndarray:
    """Band centres (nm, float32) of a grid in ``SENSOR_GRIDS`` or of a sensor preset (``sensors.preset_names()``)."""
    if name in SENSOR_GRIDS:
        return np.asarray(SENSOR_GRIDS[name](), dtype=np.float32)
    if name in preset_names():
        return np.asarray(preset_wavelengths(name), dtype=np.float32)
    raise ConfigError(f"unknown sensor grid {name!r}; known grids: {sorted(SENSOR_GRIDS)} and the sensor presets "
                      f"{list(preset_names())}")


@dataclass(eq=False)  # identity equality: a field may hold an array
class SyntheticSceneConfig:
    """What a synthetic scene looks like; every field has a working default.

    ``temperature`` sets how pure pixels are: the softmax of unit-variance fields at temperature T, so small T
    (0.1) gives nearly pure patches with thin mixed borders and large T (5) gives everywhere-mixed pixels.
    ``smoothness`` is the Gaussian random field's length scale in pixels (0 = independent pixels).
    ``target_wavelengths_nm`` is None (the library's grid), a ``SENSOR_GRIDS`` or sensor preset name or an array of
    band centres.
    ``sensor`` defaults to ``synthetic_<grid name>``. The "urban" abundance source has exactly 4 endmembers and
    at most 307x307 pixels, and ignores ``smoothness`` and ``temperature``.
    """

    height: int = 64
    width: int = 64
    num_endmembers: int = 4
    snr_db: float | None = 30.0
    abundance_source: str = "gaussian_field"
    smoothness: float = 8.0
    temperature: float = 0.5
    min_spectral_angle_deg: float = 5.0
    target_wavelengths_nm: np.ndarray | str | None = None
    sensor: str | None = None
    name_prefix: str = "synthetic"
    noise_model: str = "white"
    illumination_std: float = 0.0  # std of the log-brightness field (0: flat illumination)
    endmember_variability: float = 0.0  # std of each material's per-pixel scale around 1 (0: fixed spectra)

    def __post_init__(self) -> None:
        for name in ("height", "width", "num_endmembers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"SyntheticSceneConfig.{name} must be a positive integer, got {value!r}")
        if self.num_endmembers < 2:
            raise ConfigError(f"SyntheticSceneConfig.num_endmembers must be at least 2, got {self.num_endmembers}")
        if self.snr_db is not None and not np.isfinite(self.snr_db):
            raise ConfigError(f"SyntheticSceneConfig.snr_db must be a finite number of dB or None, got {self.snr_db}")
        if self.abundance_source not in ABUNDANCE_SOURCES:
            raise ConfigError(
                f"SyntheticSceneConfig.abundance_source must be one of {ABUNDANCE_SOURCES}, "
                f"got {self.abundance_source!r}"
            )
        if self.abundance_source == "urban":
            urban_height, urban_width = _urban_abundance_maps().shape[:2]
            if self.num_endmembers != 4:
                raise ConfigError(
                    f"SyntheticSceneConfig.num_endmembers must be 4 with abundance_source='urban' "
                    f"(Urban's ground truth has 4 maps), got {self.num_endmembers}"
                )
            if self.height > urban_height or self.width > urban_width:
                raise ConfigError(
                    f"SyntheticSceneConfig.height/width {self.height}x{self.width} exceed the "
                    f"{urban_height}x{urban_width} Urban abundance maps that abundance_source='urban' crops"
                )
        if self.noise_model not in NOISE_MODELS:
            raise ConfigError(f"SyntheticSceneConfig.noise_model must be one of {NOISE_MODELS}, got {self.noise_model!r}")
        for name in ("illumination_std", "endmember_variability"):
            value = getattr(self, name)
            if not (np.isfinite(value) and 0 <= value < 1):
                raise ConfigError(f"SyntheticSceneConfig.{name} must be in [0, 1), got {value!r}")
        if not (np.isfinite(self.smoothness) and self.smoothness >= 0):
            raise ConfigError(f"SyntheticSceneConfig.smoothness must be >= 0 pixels, got {self.smoothness}")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"SyntheticSceneConfig.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.min_spectral_angle_deg < 90:
            raise ConfigError(
                f"SyntheticSceneConfig.min_spectral_angle_deg must be in [0, 90), got {self.min_spectral_angle_deg}"
            )
        grid_name = "aviris224" if self.target_wavelengths_nm is None else None
        if isinstance(self.target_wavelengths_nm, str):
            grid_name = self.target_wavelengths_nm
            self.target_wavelengths_nm = sensor_grid(grid_name)
        if self.target_wavelengths_nm is not None:
            target = np.asarray(self.target_wavelengths_nm, dtype=np.float32)
            if target.ndim != 1 or target.size == 0 or not np.isfinite(target).all() or (target <= 0).any():
                raise ConfigError(
                    "SyntheticSceneConfig.target_wavelengths_nm must be a non-empty 1-D array of positive "
                    f"nanometres, got shape {target.shape}"
                )
            self.target_wavelengths_nm = target
        if self.sensor is None:
            self.sensor = f"synthetic_{grid_name}" if grid_name else "synthetic"
        if not self.name_prefix:
            raise ConfigError("SyntheticSceneConfig.name_prefix must be a non-empty string")


def scene_seed(seed: int, index: int) -> int:
    """Seed of scene ``index`` in the corpus of ``seed`` (independent streams via SeedSequence spawn keys)."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, dtype=np.uint64)[0])


def generate_scene(config: SyntheticSceneConfig, seed: int, library: SpectralLibrary | None = None) -> Scene:
    """One linear-mixing scene, a deterministic function of (config, seed, library)."""
    library = load_spectral_library() if library is None else library
    if config.target_wavelengths_nm is not None:
        library = library.resampled(config.target_wavelengths_nm)
    if config.num_endmembers > len(library):
        raise ConfigError(
            f"SyntheticSceneConfig.num_endmembers={config.num_endmembers} exceeds the {len(library)} spectra "
            f"of {library.source}"
        )
    rng = np.random.default_rng(seed)
    indices = _choose_endmembers(rng, library, config.num_endmembers, config.min_spectral_angle_deg)
    endmembers = library.spectra[indices]

    metadata: dict = {
        "generator": "linear_mixing",
        "seed": int(seed),
        "snr_db": config.snr_db,
        "abundance_source": config.abundance_source,
        "library": library.source,
        "library_indices": [int(i) for i in indices],
    }
    if config.abundance_source == "urban":
        abundances, metadata["urban_crop"] = _urban_abundances(rng, config.height, config.width)
    else:
        abundances = _gaussian_field_abundances(rng, config)
        metadata.update(smoothness=config.smoothness, temperature=config.temperature)

    pixels = abundances.reshape(-1, config.num_endmembers)
    # per-pixel weights of each endmember spectrum: the abundances, times the material's local scale and the
    # pixel's illumination (the abundances themselves stay the sum-to-one ground truth)
    weights = pixels
    if config.endmember_variability > 0:
        scale = 1.0 + config.endmember_variability * _smooth_unit_fields(rng, config, config.num_endmembers)
        weights = weights * np.clip(scale, 0.2, None).reshape(-1, config.num_endmembers)
        metadata["endmember_variability"] = config.endmember_variability
    if config.illumination_std > 0:
        log_brightness = config.illumination_std * _smooth_unit_fields(rng, config, 1)
        brightness = np.exp(log_brightness - config.illumination_std**2 / 2)  # mean ~1
        weights = weights * brightness.reshape(-1, 1)
        metadata["illumination_std"] = config.illumination_std
    weights = weights.astype(np.float32)
    cube = (weights @ endmembers).reshape(config.height, config.width, -1)
    noise_sigma = 0.0
    if config.snr_db is not None:
        # mean(Y^2) = <W^T W, E E^T> / (N B): exact in float64 from two R x R Gram matrices, no cube-sized copy.
        weights64, endmembers64 = weights.astype(np.float64), endmembers.astype(np.float64)
        signal_power = float(np.sum((weights64.T @ weights64) * (endmembers64 @ endmembers64.T)) / cube.size)
        noise_power = signal_power / 10 ** (config.snr_db / 10)
        if config.noise_model == "white":
            noise_sigma = float(np.sqrt(noise_power))
            _add_gaussian_noise(rng, cube, noise_sigma)
        else:
            # sigma_b^2 proportional to the band's mean signal, scaled so the total noise power is the same
            band_mean = np.abs(weights64.mean(axis=0) @ endmembers64)
            sigma = np.sqrt(noise_power * band_mean / max(float(band_mean.mean()), 1e-12))
            _add_gaussian_noise(rng, cube, sigma.astype(np.float32))
            noise_sigma = float(np.sqrt(np.mean(sigma**2)))  # RMS over bands
        metadata["noise_model"] = config.noise_model
    metadata["noise_sigma"] = noise_sigma

    return Scene(
        name=f"{config.name_prefix}_{int(seed):016x}",
        cube=cube,
        wavelengths_nm=library.wavelengths_nm,
        sensor=config.sensor,
        abundances=abundances,
        endmembers=endmembers,
        endmember_names=[library.names[i] for i in indices],
        source="hsfm_train.data.synthetic",
        metadata=metadata,
    )


def generate_scenes(config: SyntheticSceneConfig, count: int, seed: int) -> Iterator[Scene]:
    """``count`` scenes, made lazily one at a time; scene i is ``generate_scene(config, scene_seed(seed, i))``."""
    if count < 0:
        raise ConfigError(f"count must be >= 0, got {count}")
    library = load_spectral_library()
    return (generate_scene(config, scene_seed(seed, index), library) for index in range(count))


def _choose_endmembers(
    rng: np.random.Generator, library: SpectralLibrary, count: int, min_angle_deg: float
) -> np.ndarray:
    """Indices of ``count`` library spectra whose pairwise spectral angles are all >= ``min_angle_deg``."""
    unit = library.spectra / np.linalg.norm(library.spectra, axis=1, keepdims=True)
    max_cosine = np.cos(np.deg2rad(min_angle_deg))
    for _ in range(ENDMEMBER_SELECTION_ATTEMPTS):
        chosen: list[int] = []
        for candidate in rng.permutation(len(library)):
            if not chosen or (unit[chosen] @ unit[candidate] <= max_cosine).all():
                chosen.append(int(candidate))
                if len(chosen) == count:
                    return np.array(chosen)
    raise ConfigError(
        f"could not find {count} spectra in {library.source} with pairwise angles >= {min_angle_deg} degrees "
        f"in {ENDMEMBER_SELECTION_ATTEMPTS} attempts; lower SyntheticSceneConfig.num_endmembers or "
        "min_spectral_angle_deg"
    )


def _add_gaussian_noise(rng: np.random.Generator, cube: np.ndarray, sigma: float | np.ndarray) -> None:
    """Add N(0, sigma^2) noise in place (sigma a scalar or one per band), in blocks of rows so large scenes need
    only ~4 MB more memory."""
    rows_per_block = max(1, NOISE_BLOCK_VALUES // (cube.shape[1] * cube.shape[2]))
    buffer = np.empty((rows_per_block, *cube.shape[1:]), dtype=np.float32)
    for start in range(0, cube.shape[0], rows_per_block):
        block = cube[start : start + rows_per_block]
        noise = buffer[: block.shape[0]]
        rng.standard_normal(dtype=np.float32, out=noise)
        noise *= np.asarray(sigma, dtype=np.float32)
        block += noise


def _gaussian_field_abundances(rng: np.random.Generator, config: SyntheticSceneConfig) -> np.ndarray:
    """[H, W, R] abundances: softmax over endmembers of unit-variance Gaussian random fields."""
    noise = rng.standard_normal((config.height, config.width, config.num_endmembers))
    fields = gaussian_filter(noise, sigma=(config.smoothness, config.smoothness, 0))
    # Filtering shrinks the variance by the kernel's energy; dividing by its theoretical std (not the sample std)
    # keeps the temperature's meaning independent of smoothness without forcing every scene to hold every material.
    fields /= _filtered_noise_std(config.smoothness)
    logits = fields / config.temperature
    weights = np.exp(logits - logits.max(axis=2, keepdims=True))
    return (weights / weights.sum(axis=2, keepdims=True)).astype(np.float32)


def _smooth_unit_fields(rng: np.random.Generator, config: SyntheticSceneConfig, count: int) -> np.ndarray:
    """[H, W, count] smooth Gaussian random fields at the scene's length scale (at least 2 px), each set to mean
    0 and std 1 over the scene, so the configured std is what the scene shows (a long length scale on a small
    scene would otherwise leave almost no variation inside it)."""
    smoothness = max(2.0, config.smoothness)
    noise = rng.standard_normal((config.height, config.width, count))
    fields = gaussian_filter(noise, sigma=(smoothness, smoothness, 0))
    fields -= fields.mean(axis=(0, 1), keepdims=True)
    return fields / np.maximum(fields.std(axis=(0, 1), keepdims=True), 1e-12)


def _filtered_noise_std(smoothness: float) -> float:
    """Std of unit white noise after a 2-D gaussian_filter of this sigma (the 2-D kernel's L2 norm)."""
    if smoothness == 0:
        return 1.0
    radius = int(4.0 * smoothness + 0.5)  # gaussian_filter's default truncate=4.0
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    kernel = gaussian_filter1d(impulse, smoothness, mode="constant")
    return float(np.sum(kernel**2))  # separable: ||k2d||^2 = ||k1d||^4


@functools.lru_cache(maxsize=1)
def _urban_abundance_maps() -> np.ndarray:
    """Urban's real [307, 307, 4] ground-truth abundances (float16 asset, renormalised to sum to one)."""
    resource = resources.files("hsfm_train") / "assets" / URBAN_ABUNDANCE_ASSET
    with resource.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
        maps = archive["abundances"].astype(np.float32)
    maps /= maps.sum(axis=2, keepdims=True)  # float16 storage leaves sums off by up to 4e-4
    maps.flags.writeable = False  # shared by every scene
    return maps


def _urban_abundances(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, dict]:
    """A random crop of Urban's maps after a random rotation by k*90 degrees and optional left-right flip."""
    rotations, flipped = int(rng.integers(4)), bool(rng.integers(2))
    maps = np.rot90(_urban_abundance_maps(), k=rotations)
    if flipped:
        maps = maps[:, ::-1]
    row = int(rng.integers(maps.shape[0] - height + 1))
    col = int(rng.integers(maps.shape[1] - width + 1))
    crop = {"rot90": rotations, "flip_lr": flipped, "row": row, "col": col}
    return maps[row : row + height, col : col + width].copy(), crop  # the cached maps are read-only
