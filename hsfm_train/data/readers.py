"""Read scene files into :class:`~hsfm_train.data.scene.Scene` objects.

Supported formats (chosen by suffix, confirmed by the file's magic bytes):

* ``.npz`` — our convention (``cube`` [H, W, B], ``wavelengths_nm``, ``labels``, ``abundances``, ``endmembers``,
  ``endmember_names``, ``sensor``, ``nodata_mask``; any other array goes to ``scene.metadata``), a ground-truth-only
  file (``abundances`` + ``endmembers``, read with ``synthesize_cube=True``), or an optical-SAR stack
  (``optical`` [N, H, W, 3], ``sar`` [N, H, W, 1], ``source_image``, ``crop_offset_rc``: N scenes).
  Loaded with ``allow_pickle=False``; an object array is refused with :class:`UnsafeDataError`.
* ``.mat`` — MATLAB v5 (scipy) or v7.3 (HDF5, h5py): a 3-D [H, W, B] array (UPV/EHU style) or Zhu's
  ``V``/``Y`` (B, H*W) column-major matrix with ``nRow``/``nCol``; wavelengths from an ENVI header
  (``header=`` or a ``<stem>.img.hdr`` / ``<stem>.hdr`` sidecar); Zhu ground truth (``A``, ``M``, ``cood``) via
  ``ground_truth=``.
* ``.hdr`` (or its ENVI binary ``.img .dat .bsq .bil .bip .raw``) — ENVI via ``spectral``.
* ``.tif`` / ``.tiff`` — GeoTIFF via rasterio.
* ``.png`` — an optical image, optionally with a co-registered SAR image ``pair=``.

``read_scenes`` yields every scene in a file; ``read_scene`` returns the only one.
"""
from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import rasterio
import scipy.io
import spectral.io.envi as envi
from PIL import Image
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError
from spectral.io.spyfile import InvalidFileError

from hsfm_train.data import sensors
from hsfm_train.data.scene import Scene
from hsfm_train.errors import ConfigError, DataFormatError, HsfmError, UnsafeDataError

PathLike = str | os.PathLike

SUPPORTED_FORMATS = (
    ".npz (hsfm convention or optical-SAR stack), .mat (MATLAB v5 or v7.3), "
    ".hdr/.img/.dat/.bsq/.bil/.bip/.raw (ENVI), .tif/.tiff (GeoTIFF), .png (optical, optional SAR pair=)"
)

_ENVI_BINARY_SUFFIXES = (".img", ".dat", ".bsq", ".bil", ".bip", ".raw")
_FORMAT_BY_SUFFIX = {
    ".npz": "npz",
    ".mat": "mat",
    ".hdr": "envi",
    **{suffix: "envi" for suffix in _ENVI_BINARY_SUFFIXES},
    ".tif": "geotiff",
    ".tiff": "geotiff",
    ".png": "png",
}
_MAGIC_BYTES = {
    "npz": (b"PK\x03\x04",),
    "geotiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),  # classic and BigTIFF, both byte orders
    "png": (b"\x89PNG\r\n\x1a\n",),
}

# Used only when neither the file nor sensor= names the sensor; matched against the lower-case file stem.
_DEFAULT_SENSOR_BY_STEM_PREFIX = {
    "samson": "samson",
    "salinas": "aviris",
    "indian_pines": "aviris",
    "urban": "hydice",
}

# The Volkov optical-SAR stack: Sentinel-2A L1C RGB over Sentinel-1A IW GRD VH (MANIFEST §3.2).
_OPTICAL_SAR_NAME_PREFIX = "volkov"
_OPTICAL_SENSOR = "sentinel2_rgb"
_SAR_SENSOR = "sentinel1_vh"
_SENTINEL2A_RGB_CENTRES_NM = (664.6, 559.8, 492.4)  # bands B4, B3, B2
# SAR has no optical band centre; we record the radar wavelength so every image carries one in the same unit:
# Sentinel-1 C-band, 5.405 GHz -> c / f = 0.055466 m = 5.5466 cm = 5.5465763e7 nm.
_SENTINEL1_C_BAND_NM = (5.5465763e7,)

# Zhu-style .mat variables that are never the cube: image size, endmember count and ground truth.
_ZHU_AUXILIARY_VARIABLES = frozenset({"nRow", "nCol", "nBand", "nEnd", "A", "M", "cood"})

_MICROMETRE_UNITS = frozenset(
    {"micrometers", "micrometres", "micrometer", "micrometre", "microns", "micron", "um", "µm"}
)
_NANOMETRE_UNITS = frozenset({"nanometers", "nanometres", "nanometer", "nanometre", "nm"})


@dataclass(frozen=True)
class _Options:
    sensor: str | None = None
    name: str | None = None
    key: str | None = None
    ground_truth: PathLike | None = None
    header: PathLike | None = None
    wavelengths_nm: Any = None
    scale: float | None = None
    labels: Any = None
    bands: str | None = None
    synthesize_cube: bool = False
    indices: Sequence[int] | None = None
    pair: PathLike | None = None
    sensor_preset: str | None = None
    preset_bands: Any = None

    def given(self) -> set[str]:
        return {f.name for f in fields(self) if getattr(self, f.name) is not f.default}


_COMMON_OPTIONS = frozenset({"sensor", "name", "wavelengths_nm", "scale", "sensor_preset", "preset_bands"})
# A file's own centres that differ from a sensor preset's by more than this many preset FWHM are reported.
_PRESET_DISAGREEMENT_FWHM = 0.5
_SINGLE_SCENE_OPTIONS = _COMMON_OPTIONS | {"labels", "ground_truth", "bands"}
_OPTIONS_BY_FORMAT = {
    "npz": _SINGLE_SCENE_OPTIONS | {"key", "synthesize_cube"},
    "optical-SAR npz": _COMMON_OPTIONS | {"indices"},
    "mat": _SINGLE_SCENE_OPTIONS | {"key", "header"},
    "envi": _SINGLE_SCENE_OPTIONS,
    "geotiff": _SINGLE_SCENE_OPTIONS,
    "png": _SINGLE_SCENE_OPTIONS | {"pair"},
}


def read_scenes(
    path: PathLike,
    *,
    sensor: str | None = None,
    name: str | None = None,
    key: str | None = None,
    ground_truth: PathLike | None = None,
    header: PathLike | None = None,
    wavelengths_nm: Any = None,
    scale: float | None = None,
    labels: Any = None,
    bands: str | None = None,
    synthesize_cube: bool = False,
    indices: Sequence[int] | None = None,
    pair: PathLike | None = None,
    sensor_preset: str | None = None,
    preset_bands: Sequence[int | str] | str | None = None,
) -> Iterator[Scene]:
    """Yield every scene stored in ``path``.

    Options (all keyword-only and optional; one that does not apply to the file's format raises TypeError):
      sensor, name: override what the file says (a multi-scene file uses ``name`` as the prefix).
      key: the .npz/.mat variable that holds the cube.
      ground_truth: Zhu-style .mat with ``A`` (R, H*W) abundances, ``M`` (B, R) endmembers, ``cood`` names.
      header: ENVI .hdr to take a .mat cube's wavelengths from.
      wavelengths_nm: band centres in nm, replacing the file's.
      scale: multiply the cube by this factor (after the format's own normalisation).
      labels: an [H, W] integer array or a .mat/.npz file holding one.
      bands: "corrected" keeps the bands listed in the file's ``corrected_bands_1based``.
      synthesize_cube: build the cube as abundances @ endmembers for a ground-truth-only .npz.
      indices: which scenes of a multi-scene .npz to read (reads only those).
      pair: SAR .png co-registered with an optical .png.
      sensor_preset: a name from ``hsfm_train.data.sensors.preset_names()`` ("aviris", "enmap", "sentinel2_msi",
        ...) whose band centres (and FWHM, band names) describe the cube's bands as the file stores them, i.e.
        before ``bands="corrected"``; ``bands="corrected"`` then drops bands from the cube and the centres together.
        So Salinas-A (224 stored bands) read with ``sensor_preset="aviris", bands="corrected"`` gets the 204 centres
        of its corrected AVIRIS channels. Replaces the file's own centres (kept in ``metadata["file_wavelengths_nm"]``,
        with a warning when they disagree by more than half a FWHM); FWHM goes to ``metadata["fwhm_nm"]``, band
        names to ``metadata["band_names"]``; ``scene.sensor`` becomes the preset name unless ``sensor`` is given.
        A cube whose band count differs from the preset's (or the subset's) is a ConfigError naming the file, the
        preset and both counts. Cannot be combined with ``wavelengths_nm``.
      preset_bands: the preset bands the stored cube holds, when it holds a subset: 1-based band numbers of the
        preset (1..N) or its band names (["B2", "B3", "B4", "B8"]), or "corrected" for the bands listed in the
        file's ``corrected_bands_1based`` (a file that ships only its corrected bands, like Indian Pines' 200 of
        the 220 bands of ``aviris_1992``). The numbers are the preset's own, so they must be counted in the
        preset's numbering.

    The path is checked, and single-scene files are read, before this returns; the optical-SAR stack is
    read lazily as the iterator advances.
    """
    options = _Options(sensor=sensor, name=name, key=key, ground_truth=ground_truth, header=header,
                       wavelengths_nm=wavelengths_nm, scale=scale, labels=labels, bands=bands,
                       synthesize_cube=synthesize_cube, indices=indices, pair=pair,
                       sensor_preset=sensor_preset, preset_bands=preset_bands)
    _check_preset_options(options, path)
    if bands not in (None, "corrected"):
        raise ValueError(f"bands must be None or 'corrected', got {bands!r}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    path = _existing_file(path)
    file_format = _format_of(path)
    if file_format == "npz":
        return _read_npz(path, options)
    _reject_inapplicable_options(options, file_format, path)
    if file_format == "mat":
        return iter([_read_mat(path, options)])
    if file_format == "envi":
        return iter([_read_envi(path, options)])
    if file_format == "geotiff":
        return iter([_read_geotiff(path, options)])
    return iter([_read_png(path, options)])


def read_scene(path: PathLike, **options: Any) -> Scene:
    """Read a file that holds exactly one scene (same options as :func:`read_scenes`)."""
    scenes = read_scenes(path, **options)
    first = next(scenes, None)
    if first is None:
        raise DataFormatError(f"{path}: expected exactly one scene, found 0")
    remaining = sum(1 for _ in scenes)
    if remaining:
        raise DataFormatError(
            f"{path}: expected exactly one scene, found {1 + remaining}; use read_scenes() (or indices=[i])"
        )
    return first


# ----------------------------------------------------------------------------------------------- dispatch


def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected a scene file: {SUPPORTED_FORMATS})")
    if not path.is_file():
        raise DataFormatError(f"{path}: is a directory or special file, expected a scene file: {SUPPORTED_FORMATS}")
    return path


def _format_of(path: Path) -> str:
    file_format = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if file_format is None:
        raise DataFormatError(f"{path}: unknown suffix {path.suffix!r}; supported formats: {SUPPORTED_FORMATS}")
    _check_magic(path, file_format)
    return file_format


def _check_magic(path: Path, file_format: str) -> None:
    magics = _MAGIC_BYTES.get(file_format)
    if magics is None:
        return
    with path.open("rb") as file:
        start = file.read(max(len(magic) for magic in magics))
    if not start.startswith(magics):
        raise DataFormatError(
            f"{path}: suffix {path.suffix!r} but the content is not {file_format} (starts with {start[:8]!r})"
        )


def _reject_inapplicable_options(options: _Options, file_format: str, path: Path) -> None:
    inapplicable = sorted(options.given() - _OPTIONS_BY_FORMAT[file_format])
    if inapplicable:
        raise TypeError(f"{path}: option(s) {', '.join(inapplicable)} do not apply to {file_format} files")


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn a library's failure to parse ``path`` into one DataFormatError naming the file and the format."""
    try:
        yield
    except HsfmError:
        raise
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile,
            InvalidFileError, envi.EnviException, RasterioError) as exc:
        raise DataFormatError(f"{path}: cannot read as {what}: {exc}") from exc


# --------------------------------------------------------------------------------------------- finishing


def _finish(draft: dict[str, Any], path: Path, options: _Options) -> Scene:
    """Apply the options every format shares, then build (and so validate) the Scene."""
    metadata = draft.setdefault("metadata", {})
    height, width = draft["cube"].shape[:2]
    if options.ground_truth is not None:
        draft.update(_read_zhu_ground_truth(_existing_file(options.ground_truth), height, width))
        metadata["ground_truth"] = str(options.ground_truth)
    if options.labels is not None:
        draft["labels"] = _label_map(options.labels)
    if options.wavelengths_nm is not None:
        draft["wavelengths_nm"] = options.wavelengths_nm
    elif options.sensor_preset is not None:
        _apply_sensor_preset(draft, path, options)
    if options.bands == "corrected":
        _select_corrected_bands(draft, path)
    if options.scale is not None:
        draft["cube"] = np.asarray(draft["cube"], dtype=np.float32) * np.float32(options.scale)
    preset_sensor = None if options.sensor_preset is None else sensors.get_preset(options.sensor_preset).name
    draft["sensor"] = options.sensor or preset_sensor or draft.get("sensor") or _default_sensor(path)
    draft["name"] = options.name or draft.get("name") or path.stem
    return Scene(source=str(path), **draft)


def _default_sensor(path: Path) -> str:
    stem = path.stem.lower()
    for prefix, sensor in _DEFAULT_SENSOR_BY_STEM_PREFIX.items():
        if stem.startswith(prefix):
            return sensor
    return "unknown"


def _select_corrected_bands(draft: dict[str, Any], path: Path) -> None:
    corrected = draft["metadata"].get("corrected_bands_1based")
    if corrected is None:
        raise DataFormatError(f"{path}: bands='corrected' needs a corrected_bands_1based array; the file has none")
    all_bands = draft["cube"].shape[2]
    keep = np.asarray(corrected, dtype=np.int64).reshape(-1) - 1
    if keep.size == all_bands:  # the cube already is the corrected set (Indian Pines ships it that way)
        return
    if keep.min() < 0 or keep.max() >= all_bands:
        raise DataFormatError(f"{path}: corrected_bands_1based indexes outside the cube's {all_bands} bands")
    draft["cube"] = draft["cube"][..., keep]
    # Wavelengths and endmembers follow the cube when they describe all of its bands.
    if draft.get("wavelengths_nm") is not None and np.size(draft["wavelengths_nm"]) == all_bands:
        draft["wavelengths_nm"] = np.asarray(draft["wavelengths_nm"]).reshape(-1)[keep]
    if draft.get("endmembers") is not None and np.shape(draft["endmembers"])[1] == all_bands:
        draft["endmembers"] = np.asarray(draft["endmembers"])[:, keep]
    for key in ("fwhm_nm", "band_names"):  # per-band metadata of a sensor preset follows too
        if key in draft["metadata"] and np.size(draft["metadata"][key]) == all_bands:
            draft["metadata"][key] = np.asarray(draft["metadata"][key]).reshape(-1)[keep]


def _check_preset_options(options: _Options, path: PathLike) -> None:
    """Fail before the file is read: a preset together with explicit centres, an unknown preset, a bad subset."""
    if options.sensor_preset is None:
        if options.preset_bands is not None:
            raise ConfigError(f"{path}: preset_bands= needs sensor_preset= (the preset whose bands they number)")
        return
    if options.wavelengths_nm is not None:
        raise ConfigError(
            f"{path}: give either wavelengths_nm= or sensor_preset= ({options.sensor_preset!r}), not both: "
            "each sets the band centres"
        )
    preset = sensors.get_preset(options.sensor_preset)
    if isinstance(options.preset_bands, str):
        if options.preset_bands != "corrected":
            raise ConfigError(f"{path}: preset_bands must be a list of band numbers or names, or 'corrected'; "
                              f"got {options.preset_bands!r}")
    elif options.preset_bands is not None:
        try:
            sensors.band_numbers(preset, options.preset_bands)
        except ConfigError as exc:
            raise ConfigError(f"{path}: preset_bands: {exc}") from None


def _apply_sensor_preset(draft: dict[str, Any], path: Path, options: _Options) -> None:
    """Centres, FWHM and names of the preset (or its preset_bands subset) for the cube's bands as stored."""
    preset = sensors.get_preset(options.sensor_preset)
    metadata = draft["metadata"]
    subset = options.preset_bands
    if isinstance(subset, str):  # "corrected", checked by _check_preset_options
        listed = metadata.get("corrected_bands_1based")
        if listed is None:
            raise DataFormatError(f"{path}: preset_bands='corrected' needs a corrected_bands_1based array; "
                                  "the file has none")
        subset = np.asarray(listed, dtype=np.int64).reshape(-1).tolist()
    numbers = list(range(1, preset.num_bands + 1)) if subset is None else list(sensors.band_numbers(preset, subset))
    stored = int(draft["cube"].shape[2])
    if len(numbers) != stored:
        described = (f"sensor preset {preset.name!r} has {preset.num_bands} bands" if subset is None else
                     f"preset_bands={options.preset_bands!r} selects {len(numbers)} of the {preset.num_bands} "
                     f"bands of sensor preset {preset.name!r}")
        listed = metadata.get("corrected_bands_1based")
        hint = ""
        if subset is None and listed is not None and np.size(listed) == stored:
            hint = (f"; the file's corrected_bands_1based lists {stored} bands, as many as the cube: if it stores "
                    "only those, pass preset_bands='corrected'")
        elif isinstance(options.preset_bands, str) and preset.num_bands == stored:
            hint = (f"; the cube still holds all {stored} bands: drop preset_bands and pass bands='corrected' to "
                    "drop the others")
        raise ConfigError(f"{path}: {described}, but the cube has {stored} bands{hint}")
    centres, fwhm, names = sensors.select_bands(preset, numbers)
    own = draft.get("wavelengths_nm")
    if own is not None:
        own = np.asarray(own, dtype=np.float64).reshape(-1)
        metadata["file_wavelengths_nm"] = own
        if own.size == centres.size and np.isfinite(own).all():
            worst = int(np.argmax(np.abs(own - centres)))
            if abs(own[worst] - centres[worst]) > _PRESET_DISAGREEMENT_FWHM * fwhm[worst]:
                warnings.warn(
                    f"{path}: the file's own band centres differ from sensor preset {preset.name!r} by up to "
                    f"{abs(own[worst] - centres[worst]):.1f} nm (band {names[worst] if names else numbers[worst]}: "
                    f"{own[worst]:.2f} vs "
                    f"{centres[worst]:.2f} nm); using the preset's, as asked (the file's are in "
                    "metadata['file_wavelengths_nm'])",
                    UserWarning, stacklevel=4,
                )
    if "fwhm_nm" in metadata:
        metadata["file_fwhm_nm"] = metadata.pop("fwhm_nm")
    draft["wavelengths_nm"] = centres
    metadata["fwhm_nm"] = fwhm.astype(np.float32)
    if names is not None:
        metadata["band_names"] = np.asarray(names)
    metadata["sensor_preset"] = preset.name
    metadata["preset_bands_1based"] = np.asarray(numbers, dtype=np.int64)


def _wavelengths_in_nm(values: Any, unit: str | None, where: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    unit_name = (unit or "").strip().lower()
    if unit_name in _MICROMETRE_UNITS:
        factor = 1000.0
    elif unit_name in _NANOMETRE_UNITS:
        factor = 1.0
    elif unit_name in ("", "unknown"):
        # Headers often omit the unit; band centres below 100 can only be micrometres.
        factor = 1000.0 if values.size and values.max() < 100 else 1.0
    else:
        raise DataFormatError(f"{where}: wavelength units {unit!r} cannot be converted to nm; pass wavelengths_nm=")
    return (values * factor).astype(np.float32)


def _label_map(labels: Any) -> np.ndarray:
    """An [H, W] integer label map from an array or from a .mat/.npz file holding one 2-D array (or `labels`)."""
    if not isinstance(labels, (str, os.PathLike)):
        return np.asarray(labels)
    path = _existing_file(labels)
    file_format = _format_of(path)
    if file_format == "mat":
        variables, _ = _load_mat_variables(path)
    elif file_format == "npz":
        variables = _load_npz_arrays(path)
    else:
        raise DataFormatError(f"{path}: labels= must be an array, a .mat or a .npz file")
    if "labels" in variables:
        label_map = np.asarray(variables["labels"])
    else:
        maps = [value for value in variables.values() if isinstance(value, np.ndarray) and value.ndim == 2
                and np.issubdtype(value.dtype, np.number)]
        if len(maps) != 1:
            raise DataFormatError(
                f"{path}: expected one 2-D label array (or one named 'labels'), found {len(maps)} among "
                f"{sorted(variables)}; load it yourself and pass labels=array"
            )
        label_map = maps[0]
    if not np.issubdtype(label_map.dtype, np.integer):
        if not np.array_equal(label_map, np.round(label_map)):
            raise DataFormatError(f"{path}: label map holds non-integer values")
        label_map = label_map.astype(np.int64)
    return label_map


# --------------------------------------------------------------------------------------------------- npz


def _read_npy_header(stream: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise DataFormatError(f"{where}: unsupported .npy format version {version}")


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], bool, np.dtype]]:
    """Shape, Fortran order and dtype of every array, read without loading data; refuses object arrays."""
    headers = {}
    with _reading(path, ".npz archive"), zipfile.ZipFile(path) as archive:
        for member_name in archive.namelist():
            key = member_name.removesuffix(".npy")
            with archive.open(member_name) as member:
                headers[key] = _read_npy_header(member, f"{path}[{key!r}]")
            if headers[key][2].hasobject:
                raise UnsafeDataError(
                    f"{path}: array {key!r} has dtype object, which would need unpickling; refused "
                    "(store numbers or fixed-width strings instead)"
                )
    return headers


def _load_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    _npz_headers(path)  # refuses object arrays by name before numpy sees them
    with _reading(path, ".npz archive"), np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _read_npz(path: Path, options: _Options) -> Iterator[Scene]:
    headers = _npz_headers(path)
    if {"optical", "sar"} <= headers.keys():
        _reject_inapplicable_options(options, "optical-SAR npz", path)
        return _read_optical_sar_npz(path, headers, options)
    _reject_inapplicable_options(options, "npz", path)
    return iter([_read_scene_npz(path, options)])


def _read_scene_npz(path: Path, options: _Options) -> Scene:
    arrays = _load_npz_arrays(path)
    cube_key = options.key or "cube"
    has_ground_truth = {"abundances", "endmembers"} <= arrays.keys()
    if options.synthesize_cube:
        if cube_key in arrays:
            raise ValueError(f"{path}: synthesize_cube=True, but the file already has a {cube_key!r} array")
        if not has_ground_truth:
            raise DataFormatError(f"{path}: synthesize_cube=True needs 'abundances' and 'endmembers' arrays")
        # A noise-free semi-real scene: real abundance maps [H, W, R] times real endmember spectra [R, B].
        cube = arrays["abundances"].astype(np.float32) @ arrays["endmembers"].astype(np.float32)
    elif cube_key in arrays:
        cube = arrays.pop(cube_key)
    else:
        hint = (" It holds ground truth only: pass synthesize_cube=True to build the cube as abundances @ endmembers."
                if has_ground_truth else " Pass key= to name the cube array.")
        raise DataFormatError(f"{path}: no {cube_key!r} array (found {sorted(arrays)}).{hint}")
    names = arrays.pop("endmember_names", None)
    sensor = arrays.pop("sensor", None)
    draft = {
        "cube": cube,
        "wavelengths_nm": arrays.pop("wavelengths_nm", None),
        "labels": arrays.pop("labels", None),
        "abundances": arrays.pop("abundances", None),
        "endmembers": arrays.pop("endmembers", None),
        "endmember_names": None if names is None else [str(n) for n in names.reshape(-1)],
        "nodata_mask": arrays.pop("nodata_mask", None),
        "sensor": None if sensor is None else str(sensor.item()),
        "metadata": {"format": "npz", "synthesized_cube": options.synthesize_cube, **arrays},
    }
    return _finish(draft, path, options)


def _read_optical_sar_npz(path: Path, headers: dict, options: _Options) -> Iterator[Scene]:
    optical_shape, _, optical_dtype = headers["optical"]
    sar_shape, _, sar_dtype = headers["sar"]
    if len(optical_shape) != 4 or len(sar_shape) != 4 or optical_shape[:3] != sar_shape[:3]:
        raise DataFormatError(
            f"{path}: optical {optical_shape} and sar {sar_shape} must both be [N, H, W, C] with the same N, H, W"
        )
    if headers["optical"][1] or headers["sar"][1]:
        raise DataFormatError(f"{path}: optical/sar are stored in Fortran order; re-save them C-ordered")
    count = optical_shape[0]
    chosen = list(range(count)) if options.indices is None else [int(i) for i in options.indices]
    outside = [i for i in chosen if not 0 <= i < count]
    if outside:
        raise IndexError(f"{path}: indices {outside} outside 0..{count - 1}")
    with _reading(path, ".npz archive"), np.load(path, allow_pickle=False) as npz:
        source_images = npz["source_image"] if "source_image" in npz.files else None
        crop_offsets = npz["crop_offset_rc"] if "crop_offset_rc" in npz.files else None
    optical_scale = _unit_interval_divisor(optical_dtype, f"{path}['optical']")
    sar_scale = _unit_interval_divisor(sar_dtype, f"{path}['sar']")
    prefix = options.name or _OPTICAL_SAR_NAME_PREFIX

    def scenes() -> Iterator[Scene]:
        with zipfile.ZipFile(path) as archive:
            optical_rows = _npz_rows(archive, "optical", optical_shape, optical_dtype, chosen, path)
            sar_rows = _npz_rows(archive, "sar", sar_shape, sar_dtype, chosen, path)
            for index, optical, sar in zip(chosen, optical_rows, sar_rows):
                metadata: dict[str, Any] = {"format": "optical-SAR npz", "index": index}
                label = f"{index:03d}"
                if source_images is not None:
                    metadata["source_image"] = str(source_images[index])
                    label = f"{source_images[index]}_{index:03d}"
                if crop_offsets is not None:
                    metadata["crop_offset_rc"] = tuple(int(v) for v in crop_offsets[index])
                draft = {
                    "name": f"{prefix}_{label}",
                    "cube": optical.astype(np.float32) / optical_scale,
                    "wavelengths_nm": np.asarray(_SENTINEL2A_RGB_CENTRES_NM),
                    "sensor": _OPTICAL_SENSOR,
                    "pair": sar.astype(np.float32) / sar_scale,
                    "pair_sensor": _SAR_SENSOR,
                    "pair_wavelengths_nm": np.asarray(_SENTINEL1_C_BAND_NM),
                    "metadata": metadata,
                }
                yield _finish(draft, path, options)

    return scenes()


def _npz_rows(archive: zipfile.ZipFile, key: str, shape: tuple[int, ...], dtype: np.dtype,
              indices: Sequence[int], path: Path) -> Iterator[np.ndarray]:
    """Yield array[i] for each i by seeking in the compressed member, so a few rows cost a few rows' inflation."""
    row_shape = shape[1:]
    row_bytes = dtype.itemsize * math.prod(row_shape)
    with _reading(path, ".npz archive"), archive.open(f"{key}.npy") as member:
        _read_npy_header(member, f"{path}[{key!r}]")
        data_start = member.tell()
        for index in indices:
            member.seek(data_start + index * row_bytes)
            row = member.read(row_bytes)
            if len(row) != row_bytes:
                raise DataFormatError(f"{path}: array {key!r} is truncated at row {index}")
            yield np.frombuffer(row, dtype=dtype).reshape(row_shape)


def _unit_interval_divisor(dtype: np.dtype, where: str) -> np.float32:
    """Integer images are scaled to [0, 1] by their type's full range."""
    if dtype == np.uint8:
        return np.float32(255)
    if dtype == np.uint16:
        return np.float32(65535)
    raise DataFormatError(f"{where}: expected uint8 or uint16 pixels, got {dtype}")


# --------------------------------------------------------------------------------------------------- mat


def _load_mat_variables(path: Path) -> tuple[dict[str, Any], str]:
    """Every variable of a MATLAB file in MATLAB axis order, so v5 and v7.3 share the code that follows."""
    with path.open("rb") as file:
        text_header = file.read(128)
    if h5py.is_hdf5(path):
        with _reading(path, "MATLAB v7.3 (HDF5) file"), h5py.File(path, "r") as file:
            variables = {name: _h5_matlab_value(file, item) for name, item in file.items()
                         if isinstance(item, h5py.Dataset)}  # groups are structs, sparse matrices or #refs#
        return variables, "mat-v7.3"
    if text_header.startswith(b"MATLAB 7.3"):
        raise DataFormatError(f"{path}: MATLAB 7.3 header but no readable HDF5 content (truncated file?)")
    with _reading(path, "MATLAB v5 file"):
        variables = scipy.io.loadmat(path)
    return {name: value for name, value in variables.items() if not name.startswith("__")}, "mat-v5"


def _h5_matlab_value(file: h5py.File, dataset: h5py.Dataset) -> Any:
    matlab_class = dataset.attrs.get("MATLAB_class", b"")
    if isinstance(matlab_class, bytes):
        matlab_class = matlab_class.decode()
    if matlab_class == "cell":
        # A cell is an array of references to its elements; h5py's C order over the reversed axes is
        # MATLAB's column-major element order.
        return [_h5_matlab_value(file, file[reference]) for reference in dataset[()].reshape(-1)]
    values = np.transpose(dataset[()])  # h5py sees MATLAB's column-major arrays with their axes reversed
    if matlab_class == "char":
        rows = ["".join(map(chr, row)) for row in np.atleast_2d(values)]
        return rows[0] if len(rows) == 1 else rows
    return values


def _mat_scalar(variables: dict[str, Any], name: str, path: Path) -> int:
    try:
        return int(np.asarray(variables[name]).item())
    except (KeyError, ValueError, TypeError) as exc:
        raise DataFormatError(f"{path}: expected a scalar {name!r}") from exc


def _column_major_images(matrix: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, H*W) -> [H, W, K]: each row is an image flattened column-major by MATLAB; order="C" would transpose it."""
    return np.reshape(matrix.T, (height, width, matrix.shape[0]), order="F")


def _choose_cube_variable(variables: dict[str, Any], path: Path) -> str:
    candidates = {name: value for name, value in variables.items()
                  if name not in _ZHU_AUXILIARY_VARIABLES and isinstance(value, np.ndarray)
                  and value.ndim in (2, 3) and np.issubdtype(value.dtype, np.number)}
    if not candidates:
        raise DataFormatError(f"{path}: no 2-D or 3-D numeric array to use as the cube among {sorted(variables)}")
    return max(candidates, key=lambda name: candidates[name].size)


def _read_mat(path: Path, options: _Options) -> Scene:
    variables, version = _load_mat_variables(path)
    cube_key = options.key or _choose_cube_variable(variables, path)
    if cube_key not in variables:
        raise DataFormatError(f"{path}: no variable {cube_key!r}; it has {sorted(variables)}")
    values = variables[cube_key]
    if not (isinstance(values, np.ndarray) and np.issubdtype(values.dtype, np.number)):
        raise DataFormatError(f"{path}: variable {cube_key!r} is not a numeric array")
    if values.ndim == 3:
        cube, layout = values, "[H, W, B]"
    elif values.ndim == 2:
        if not {"nRow", "nCol"} <= variables.keys():
            raise DataFormatError(
                f"{path}: variable {cube_key!r} is 2-D {values.shape} but there is no nRow/nCol to reshape a "
                "(bands, pixels) matrix; if it is a label map pass it as labels="
            )
        height, width = _mat_scalar(variables, "nRow", path), _mat_scalar(variables, "nCol", path)
        if values.shape[1] != height * width:
            raise DataFormatError(
                f"{path}: {cube_key!r} has shape {values.shape}, expected (bands, nRow*nCol = {height * width})"
            )
        cube, layout = _column_major_images(values, height, width), "zhu (B, H*W) column-major"
    else:
        raise DataFormatError(f"{path}: variable {cube_key!r} has shape {values.shape}, expected 2-D or 3-D")
    metadata: dict[str, Any] = {"format": version, "key": cube_key, "layout": layout}
    wavelengths = None
    if options.wavelengths_nm is None:
        header_path = _mat_wavelength_header(path, options.header)
        if header_path is not None:
            wavelengths = _envi_wavelengths(_read_envi_header(header_path), str(header_path))
            if wavelengths is None and options.header is not None:
                raise DataFormatError(f"{header_path}: header= given but it has no 'wavelength' field")
            metadata["wavelength_header"] = str(header_path)
    return _finish({"cube": cube, "wavelengths_nm": wavelengths, "metadata": metadata}, path, options)


def _mat_wavelength_header(path: Path, header: PathLike | None) -> Path | None:
    if header is not None:
        return _existing_file(header)
    for sidecar in (path.with_name(f"{path.stem}.img.hdr"), path.with_suffix(".hdr")):
        if sidecar.is_file():
            return sidecar
    return None


def _read_zhu_ground_truth(path: Path, height: int, width: int) -> dict[str, Any]:
    """Zhu's endN.mat: A (R, H*W) column-major abundances, M (B, R) endmembers, cood names."""
    if _format_of(path) != "mat":
        raise DataFormatError(f"{path}: ground_truth= must be a Zhu-style .mat file (A, M, cood)")
    variables, _ = _load_mat_variables(path)
    missing = {"A", "M"} - variables.keys()
    if missing:
        raise DataFormatError(f"{path}: ground truth needs variables A and M; missing {sorted(missing)}")
    abundance_matrix = np.asarray(variables["A"])
    if abundance_matrix.ndim != 2 or abundance_matrix.shape[1] != height * width:
        raise DataFormatError(
            f"{path}: A has shape {abundance_matrix.shape}, expected (endmembers, {height}*{width} pixels)"
        )
    names = _cell_strings(variables["cood"], path) if "cood" in variables else None
    return {
        "abundances": _column_major_images(abundance_matrix, height, width),
        "endmembers": np.asarray(variables["M"]).T,
        "endmember_names": names,
    }


def _cell_strings(value: Any, path: Path) -> list[str]:
    """Flatten a MATLAB cell of strings (scipy object array or h5py list) into a list of str."""
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        return [text.strip() for text in value.reshape(-1, order="F")]
    if isinstance(value, list) or (isinstance(value, np.ndarray) and value.dtype == object):
        items = value if isinstance(value, list) else value.reshape(-1, order="F")
        return [text for item in items for text in _cell_strings(item, path)]
    raise DataFormatError(f"{path}: expected a cell of strings for 'cood', found {type(value).__name__}")


# -------------------------------------------------------------------------------------------------- ENVI


def _read_envi_header(path: Path) -> dict[str, Any]:
    with _reading(path, "ENVI header"):
        return envi.read_envi_header(str(path))


def _envi_wavelengths(header: dict[str, Any], where: str) -> np.ndarray | None:
    if "wavelength" not in header:
        return None
    with _reading(Path(where), "ENVI header wavelengths"):
        values = [float(value) for value in header["wavelength"]]
    return _wavelengths_in_nm(values, header.get("wavelength units"), where)


def _envi_header_and_binary(path: Path) -> tuple[Path, Path | None]:
    if path.suffix.lower() == ".hdr":
        return path, None  # spectral finds the binary next to the header
    for header in (Path(f"{path}.hdr"), path.with_suffix(".hdr")):
        if header.is_file():
            return header, path
    raise DataFormatError(f"{path}: ENVI binary without a header; expected {path}.hdr or {path.with_suffix('.hdr')}")


def _read_envi(path: Path, options: _Options) -> Scene:
    header_path, binary_path = _envi_header_and_binary(path)
    with _reading(header_path, "ENVI image"):
        image = envi.open(str(header_path), None if binary_path is None else str(binary_path))
        if isinstance(image, envi.SpectralLibrary):
            raise DataFormatError(f"{header_path}: an ENVI spectral library, expected an image")
        raw = np.asarray(image.load(dtype=np.float32, scale=False))  # [rows, columns, bands]
    header = image.metadata
    nodata_mask = None
    if "data ignore value" in header:
        ignore_value = np.float32(float(header["data ignore value"]))
        # A pixel is nodata when every band holds the ignore value: single-band zeros are valid in clipped data.
        nodata_mask = np.all(raw == ignore_value, axis=2)
    # ENVI's reflectance scale factor means value / factor is reflectance; applied after the raw nodata test.
    cube = raw / np.float32(image.scale_factor) if image.scale_factor != 1 else raw
    sensor_type = header.get("sensor type", "").strip()
    draft = {
        "cube": cube,
        "wavelengths_nm": None if options.wavelengths_nm is not None else _envi_wavelengths(header, str(header_path)),
        "nodata_mask": nodata_mask,
        "sensor": None if sensor_type.lower() in ("", "unknown") else sensor_type,
        "name": header_path.name.split(".")[0],
        "metadata": {"format": "envi", "header": str(header_path)},
    }
    return _finish(draft, path, options)


# ----------------------------------------------------------------------------------------------- GeoTIFF


def _read_geotiff(path: Path, options: _Options) -> Scene:
    with _reading(path, "GeoTIFF"), rasterio.open(path) as source:
        cube = np.transpose(source.read(), (1, 2, 0))  # rasterio reads bands first
        declares_nodata = any(MaskFlags.all_valid not in flags for flags in source.mask_flag_enums)
        # The dataset mask is 0 only where every band is masked (nodata value, per-band mask or alpha).
        nodata_mask = source.dataset_mask() == 0 if declares_nodata else None
        wavelengths = None if options.wavelengths_nm is not None else _geotiff_wavelengths(source, path)
        metadata: dict[str, Any] = {"format": "geotiff"}
        if source.crs is not None:
            metadata["crs"] = source.crs.to_string()
            metadata["transform"] = tuple(source.transform)[:6]
        draft = {
            "cube": cube,
            "wavelengths_nm": wavelengths,
            "nodata_mask": nodata_mask,
            "sensor": source.tags().get("sensor"),
            "metadata": metadata,
        }
    return _finish(draft, path, options)


def _geotiff_wavelengths(source: Any, path: Path) -> np.ndarray | None:
    """Per-band ``wavelength`` (+ ``wavelength_units``) tags, or GDAL's IMAGERY ``CENTRAL_WAVELENGTH_UM``."""
    centres: list[float | None] = []
    for band in source.indexes:
        tags = source.tags(band)
        imagery = source.tags(band, ns="IMAGERY")
        if "wavelength" in tags:
            centres.append(float(_wavelengths_in_nm(float(tags["wavelength"]), tags.get("wavelength_units"),
                                                    f"{path} band {band}")[0]))
        elif "CENTRAL_WAVELENGTH_UM" in imagery:
            centres.append(float(imagery["CENTRAL_WAVELENGTH_UM"]) * 1000.0)
        else:
            centres.append(None)
    if all(centre is None for centre in centres):
        return None
    untagged = [band for band, centre in zip(source.indexes, centres) if centre is None]
    if untagged:
        raise DataFormatError(f"{path}: bands {untagged} have no wavelength tag while others do")
    return np.asarray(centres, dtype=np.float32)


# --------------------------------------------------------------------------------------------------- PNG

_PNG_MODES = frozenset({"L", "I;16", "RGB"})


def _png_pixels(path: Path) -> np.ndarray:
    """[H, W, C] float32 in [0, 1]."""
    with _reading(path, "PNG image"), Image.open(path) as image:
        if image.mode not in _PNG_MODES:
            raise DataFormatError(f"{path}: PNG mode {image.mode!r}; expected 8/16-bit grey or 8-bit RGB")
        pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[..., np.newaxis]
    return pixels.astype(np.float32) / _unit_interval_divisor(pixels.dtype, str(path))


def _read_png(path: Path, options: _Options) -> Scene:
    optical = _png_pixels(path)
    draft: dict[str, Any] = {"cube": optical, "metadata": {"format": "png"}}
    if options.pair is not None:
        pair_path = _existing_file(options.pair)
        if _format_of(pair_path) != "png":
            raise DataFormatError(f"{pair_path}: pair= must be a PNG image")
        sar = _png_pixels(pair_path)
        if sar.shape[:2] != optical.shape[:2]:
            raise DataFormatError(
                f"{path} is {optical.shape[1]}x{optical.shape[0]} but its pair {pair_path} is "
                f"{sar.shape[1]}x{sar.shape[0]} (width x height); co-registered images must match"
            )
        if sar.shape[2] > 1 and (sar == sar[..., :1]).all():
            sar = sar[..., :1]  # SAR saved as identical grey channels: keep one
        draft["pair"] = sar
        draft["metadata"]["pair_source"] = str(pair_path)
    return _finish(draft, path, options)
