"""Named sensor band grids: band centre wavelengths (nm), FWHM (nm) and band names of real sensors.

The backbone is conditioned on each band's centre wavelength, so every scene needs correct centres; many benchmark
files ship without them. A preset names a sensor's band grid so a reader can attach it (``read_scene(path,
sensor_preset="aviris", bands="corrected")``) instead of every user typing 224 numbers.

Conventions:

* Bands are in the sensor's own band order, the order its files store them, numbered 1..N. Where spectrometers
  overlap, that order is not monotonic in wavelength (AVIRIS, Hyperion, EnMAP, PRISMA), and Landsat's band numbers
  put the panchromatic B8 and cirrus B9 after SWIR2 B7. Nothing here sorts: sorting the centres without reordering
  the cube would mislabel bands, and the model's tokenizer orders bands by wavelength itself.
  ``SensorPreset.segments`` lists the 1-based runs (spectrometers / detectors) within which centres strictly increase.
* ``approximate`` is True when the centres can be off from the data's true centres by more than about 1 nm: a grid
  built from a documented range, band count and sampling (PRISMA), the values of a sister instrument (Landsat 9), or a
  sensor whose calibration changes between seasons (AVIRIS). Using such a preset warns once per preset per process,
  saying why. FWHM provenance is given per preset in ``note``; the FWHM is metadata, the centres drive the model.
* Wavelengths beyond 100 µm are microwave to the tokenizer: Sentinel-1's C band is stored as its radar wavelength,
  c / 5.405 GHz = 5.5466e7 nm.

The long grids live in ``hsfm_train/assets/sensor_grids.npz`` (built by ``tools/make_sensor_grids.py`` from the shared
data and published tables); short ones are literal tuples below. docs/sensors.md has the table of presets.
"""
from __future__ import annotations

import difflib
import functools
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from hsfm_train.errors import ConfigError

GRIDS_ASSET = "sensor_grids.npz"
SPEED_OF_LIGHT_M_PER_S = 299_792_458.0


@dataclass(frozen=True)
class SensorPreset:
    """One sensor's band grid. ``segments``: 1-based inclusive band ranges, each strictly increasing in wavelength."""

    name: str
    centres_nm: tuple[float, ...]
    fwhm_nm: tuple[float, ...]
    band_names: tuple[str, ...] | None
    citation: str
    approximate: bool
    note: str = ""
    segments: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        count = len(self.centres_nm)
        object.__setattr__(self, "centres_nm", tuple(float(v) for v in self.centres_nm))
        object.__setattr__(self, "fwhm_nm", tuple(float(v) for v in self.fwhm_nm))
        if self.band_names is not None:
            object.__setattr__(self, "band_names", tuple(str(n) for n in self.band_names))
        if not self.segments:
            object.__setattr__(self, "segments", ((1, count),))
        where = f"sensor preset {self.name!r}"
        if count == 0 or len(self.fwhm_nm) != count or (self.band_names is not None and len(self.band_names) != count):
            raise ValueError(f"{where}: {count} centres, {len(self.fwhm_nm)} FWHM, "
                             f"{None if self.band_names is None else len(self.band_names)} band names")
        centres, fwhm = np.asarray(self.centres_nm), np.asarray(self.fwhm_nm)
        if not (np.isfinite(centres).all() and np.isfinite(fwhm).all() and (centres > 0).all() and (fwhm > 0).all()):
            raise ValueError(f"{where}: centres and FWHM must be positive finite nanometres")
        covered = [band for start, stop in self.segments for band in range(start, stop + 1)]
        if covered != list(range(1, count + 1)):
            raise ValueError(f"{where}: segments {self.segments} must cover bands 1..{count} in order")
        for start, stop in self.segments:
            if (np.diff(centres[start - 1:stop]) <= 0).any():
                raise ValueError(f"{where}: centres of bands {start}..{stop} are not strictly increasing")
        if self.approximate and not self.note:
            raise ValueError(f"{where}: an approximate preset needs a note saying why")

    @property
    def num_bands(self) -> int:
        return len(self.centres_nm)

    @property
    def centres(self) -> np.ndarray:
        return np.asarray(self.centres_nm, dtype=np.float64)

    @property
    def fwhm(self) -> np.ndarray:
        return np.asarray(self.fwhm_nm, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ registry


@functools.lru_cache(maxsize=1)
def _grids() -> dict[str, np.ndarray]:
    resource = resources.files("hsfm_train") / "assets" / GRIDS_ASSET
    with resource.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _from_asset(name: str, **fields: Any) -> SensorPreset:
    grids = _grids()
    return SensorPreset(name=name, centres_nm=tuple(grids[f"{name}__centres_nm"]),
                        fwhm_nm=tuple(grids[f"{name}__fwhm_nm"]), **fields)


def _aviris() -> SensorPreset:
    return _from_asset(
        "aviris", band_names=None, approximate=True,
        segments=((1, 32), (33, 96), (97, 160), (161, 224)),
        citation=(
            "Exact for one AVIRIS calibration: the 224 channel centres and FWHM of the USGS spectral library resampled "
            "to AVIRIS (R. N. Clark et al., USGS splib; the USGS_1995_Library.mat of the SUnSAL/CLSUnSAL demos, "
            "J. Bioucas-Dias & M.-D. Iordache), packaged as hsfm_train/assets/usgs_splib_aviris224.npz."
        ),
        note=(
            "AVIRIS is recalibrated every flight season: against the 1992 calibration of Indian Pines (92AV3C.spc) "
            "these centres differ by a near-constant offset per spectrometer, -9.5..-7.2 nm (A, channels 1-32), "
            "-14.0..-13.0 (B, 33-96), -10.7..-9.2 (C, 97-160) and +6.9..+9.2 nm (D, 161-224). Use aviris_1992 for "
            "1992 data and the file's own wavelengths where it has them. Channel order is kept: the spectrometers "
            "overlap, so centres step back after channels 32 and 96."
        ),
    )


def _aviris_1992() -> SensorPreset:
    channels = _grids()["aviris_1992__channels"]
    return _from_asset(
        "aviris_1992", band_names=tuple(f"ch{int(c)}" for c in channels), approximate=False,
        segments=((1, 31), (32, 94), (95, 157), (158, 220)),
        citation=(
            "Exact: AVIRIS 1992 calibration of the 220-band Indian Pines image, 92AV3C.spc (D. Landgrebe, Purdue / "
            "MultiSpec; Spectral Python sample data), 400.02-2498.96 nm with FWHM; equals the wavelengths_nm and "
            "fwhm_nm of shared/data/classification/indian_pines/indian_pines.npz for its 200 corrected bands."
        ),
        note=(
            "220 bands = AVIRIS channels 2-224 without 33, 97 and 161 (the first channel of each spectrometer); band "
            "names give the channel. Indian Pines' corrected_bands_1based count in these 220 bands, so read it with "
            "sensor_preset='aviris_1992', preset_bands='corrected'."
        ),
    )


def _hyperion() -> SensorPreset:
    return _from_asset(
        "hyperion", band_names=tuple(f"B{i}" for i in range(1, 243)), approximate=False,
        segments=((1, 70), (71, 242)),
        citation=(
            "Exact: USGS EO-1 'Hyperion spectral coverage' table (average wavelength and FWHM of bands B1-B242, "
            "eo1.usgs.gov/sensors/hyperioncoverage), as mirrored in chryss/pygaarst "
            "pygaarst/data/Hyperion_Spectral_Coverage.tab."
        ),
        note=(
            "Band-number order: VNIR B1-B70 (355.6-1057.7 nm) then SWIR B71-B242 (851.9-2577.1 nm); the two "
            "spectrometers overlap. The same table marks B1-B7, B58-B76 and B225-B242 as not calibrated."
        ),
    )


def _enmap() -> SensorPreset:
    return _from_asset(
        "enmap", band_names=tuple(f"B{i}" for i in range(1, 225)), approximate=False,
        segments=((1, 91), (92, 224)),
        citation=(
            "Centres exact (nominal): DLR EnMAP_Spectral_Bands_update.xlsx (www.enmap.org/data/doc/), VNIR and SWIR "
            "sheets, as transcribed in torchgeo's EnMAP dataset; 224 bands of the L1C/L2A products."
        ),
        note=(
            "Each product's METADATA.XML holds its own centres (they differ by a few tenths of a nm). FWHM is "
            "approximate: the local sampling interval, after EnMAP's mean sampling and resolution of 6.5 nm (VNIR) "
            "and 10 nm (SWIR) (L. Guanter et al., 'The EnMAP spaceborne imaging spectroscopy mission', Remote Sens. "
            "7:8830, 2015). VNIR bands 1-91 (418-993 nm) then SWIR 92-224 (902-2445 nm; no bands in 1390-1461 and "
            "1760-1939 nm)."
        ),
    )


def _prisma() -> SensorPreset:
    vnir = np.linspace(400.0, 1010.0, 66)
    swir = np.linspace(920.0, 2505.0, 173)
    fwhm = np.concatenate([np.full(66, vnir[1] - vnir[0]), np.full(173, swir[1] - swir[0])])
    return SensorPreset(
        name="prisma", centres_nm=tuple(np.concatenate([vnir, swir])), fwhm_nm=tuple(fwhm), band_names=None,
        approximate=True, segments=((1, 66), (67, 239)),
        citation=(
            "Approximate, built from the documented design: ASI PRISMA hyperspectral camera, 66 VNIR bands over "
            "400-1010 nm and 173 SWIR bands over 920-2505 nm, FWHM <= 12 nm (eoPortal 'PRISMA (Hyperspectral)'; "
            "ASI PRISMA product specification)."
        ),
        note=(
            "No per-band table was available: evenly spaced centres over each spectrometer's documented range "
            "(9.4 nm VNIR, 9.2 nm SWIR) with FWHM = that spacing. Real PRISMA centres vary per product and across "
            "the swath (KDP_AUX/Cw_Vnir_Matrix, Cw_Swir_Matrix in the HE5 file: use those via wavelengths_nm=). "
            "Order: VNIR ascending then SWIR ascending; the HE5 cubes store VNIR in descending order."
        ),
    )


def _emit() -> SensorPreset:
    return _from_asset(
        "emit", band_names=None, approximate=False,
        citation=(
            "Exact: EMIT L2A RFL V001 sensor_band_parameters/wavelengths, 285 bands, 381.0-2492.9 nm (R. O. Green et "
            "al., doi:10.5067/EMIT/EMITL2ARFL.001); FWHM from EnMAP-Box's spectral-resampling table emit.csv "
            "(EnMAP-Box/enmap-box enmapboxprocessing/algorithm/spectralresampling), 0.1 nm, whose centres equal "
            "the product's rounded to 0.1 nm."
        ),
        note="FWHM given to 0.1 nm (8.4-8.8 nm).",
    )


def _desis() -> SensorPreset:
    return _from_asset(
        "desis", band_names=None, approximate=False,
        citation=(
            "Per-band centres and FWHM of EnMAP-Box's spectral-resampling table desis.csv (EnMAP-Box/enmap-box "
            "enmapboxprocessing/algorithm/spectralresampling), 402.0-999.5 nm; consistent with DLR's DESIS "
            "specification (235 bands, 402-1000 nm, ~2.55 nm sampling, dlr.de DESIS instrument page)."
        ),
        note=(
            "Centres to 0.1 nm and FWHM to 0.2 nm for the unbinned 235-band product; binned products (118/79/60 "
            "bands) need their own centres, and each product's metadata carries its precise values."
        ),
    )


# ESA, "Sentinel-2 Spectral Response Functions (S2-SRF)", COPE-GSEG-EOPG-TN-15-0007: Sentinel-2A central wavelength and
# bandwidth (nm) per band.
_S2_NAMES = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
_S2A_CENTRES = (442.7, 492.4, 559.8, 664.6, 704.1, 740.5, 782.8, 832.8, 864.7, 945.1, 1373.5, 1613.7, 2202.4)
_S2A_BANDWIDTHS = (21.0, 66.0, 36.0, 31.0, 15.0, 15.0, 20.0, 106.0, 21.0, 20.0, 31.0, 91.0, 175.0)

# Landsat 8 OLI band-average centre wavelength and FWHM (nm), bands B1-B9 (J. A. Barsi et al., "The spectral response
# of the Landsat-8 Operational Land Imager", Remote Sens. 6:10232, 2014).
_OLI_NAMES = tuple(f"B{i}" for i in range(1, 10))
_OLI_CENTRES = (442.98, 482.04, 561.41, 654.59, 864.67, 1608.86, 2200.73, 589.50, 1373.43)
_OLI_FWHM = (15.98, 60.04, 57.33, 37.47, 28.25, 84.72, 186.66, 172.40, 20.39)
_OLI_NOTE_ORDER = ("Band-number order: B1-B7 ascending, then B8 (panchromatic, 589.5 nm) and B9 (cirrus, 1373.4 nm); "
                   "select bands by name, e.g. preset_bands=['B2', 'B3', 'B4', 'B5'].")


def _sentinel2_msi() -> SensorPreset:
    return SensorPreset(
        name="sentinel2_msi", centres_nm=_S2A_CENTRES, fwhm_nm=_S2A_BANDWIDTHS, band_names=_S2_NAMES,
        approximate=False,
        citation=("Exact: Sentinel-2A central wavelengths and bandwidths of ESA's 'Sentinel-2 Spectral Response "
                  "Functions (S2-SRF)', COPE-GSEG-EOPG-TN-15-0007."),
        note=("Sentinel-2A values; Sentinel-2B differs by up to 16.7 nm (B12 2185.7 nm) and up to 3 nm elsewhere. "
              "Band order B1..B8, B8A, B9..B12 (the L1C/L2A band order), which is ascending in wavelength."),
    )


def _landsat8_oli() -> SensorPreset:
    return SensorPreset(
        name="landsat8_oli", centres_nm=_OLI_CENTRES, fwhm_nm=_OLI_FWHM, band_names=_OLI_NAMES, approximate=False,
        segments=((1, 7), (8, 9)),
        citation=("Band-average centres and FWHM of Barsi et al., 'The Spectral Response of the Landsat-8 Operational "
                  "Land Imager', Remote Sens. 6:10232 (2014), transcribed to 0.01 nm; they agree with the USGS band "
                  "edges and with the centres in the names of NASA's OLI RSR files."),
        note=_OLI_NOTE_ORDER,
    )


def _landsat9_oli() -> SensorPreset:
    return SensorPreset(
        name="landsat9_oli", centres_nm=_OLI_CENTRES, fwhm_nm=_OLI_FWHM, band_names=_OLI_NAMES, approximate=True,
        segments=((1, 7), (8, 9)),
        citation=("Approximate: Landsat 8 OLI values (Barsi et al., Remote Sens. 6:10232, 2014) used for Landsat 9 "
                  "OLI-2, which was built to the same band specification; NASA's OLI-2 RSR files "
                  "(L9_OLI2_Ball_RSR.v1.0) are named by centres 443, 482, 561, 654, 865, 1608, 2200, 589, 1374 nm."),
        note=("OLI-2's own band-average centres and FWHM were not available here; OLI's agree with the OLI-2 RSR "
              "centres to within 1 nm. " + _OLI_NOTE_ORDER),
    )


def _sentinel1_c() -> SensorPreset:
    frequency_hz, bandwidth_hz = 5.405e9, 100e6
    wavelength_nm = SPEED_OF_LIGHT_M_PER_S / frequency_hz * 1e9
    return SensorPreset(
        name="sentinel1_c", centres_nm=(wavelength_nm,), fwhm_nm=(wavelength_nm * bandwidth_hz / frequency_hz,),
        band_names=("C",), approximate=False,
        citation=("Exact centre: Sentinel-1 C-SAR centre frequency 5.405 GHz (ESA Sentinel-1 SAR user guide), stored "
                  "as the radar wavelength c / f = 5.5466e7 nm (5.55 cm)."),
        note=("One band: a single-polarisation image (VV or VH); for a dual-polarisation stack pass "
              "wavelengths_nm= with this centre once per channel. The 'FWHM' is the "
              "maximum programmable range bandwidth, 100 MHz, as a wavelength width (1.03e6 nm); the mode in use "
              "(e.g. IW) has less."),
    )


# HYDICE Urban as the unmixing benchmark distributes it: 1-based channels of the 210 kept after removing
# 1-4, 76, 87, 101-111, 136-153 and 198-210 (water vapour and atmospheric absorption)
_URBAN_REMOVED = {*range(1, 5), 76, 87, *range(101, 112), *range(136, 154), *range(198, 211)}
URBAN_162_CHANNELS = tuple(c for c in range(1, 211) if c not in _URBAN_REMOVED)
_HYDICE_NOTE = ("HYDICE's per-channel calibration is not distributed with the Urban benchmark, which describes its "
                "210 channels as 400-2500 nm at about 10 nm: the centres here are that nominal grid, evenly spaced "
                "(10.05 nm apart), with a 10 nm FWHM; real centres may be a few nm off.")
_HYDICE_CITATION = ("Nominal HYDICE grid (Basedow, Carmer & Anderson, 'HYDICE system: implementation and performance', "
                    "Proc. SPIE 2480, 1995); Urban's retained channels as in F. Zhu, 'Hyperspectral unmixing: ground "
                    "truth labeling, datasets, benchmark performances and survey', arXiv:1708.05125, 2017.")


def _hydice() -> SensorPreset:
    centres = np.linspace(400.0, 2500.0, 210)
    return SensorPreset(name="hydice", centres_nm=tuple(centres), fwhm_nm=(10.0,) * 210,
                        band_names=tuple(f"ch{c}" for c in range(1, 211)), approximate=True,
                        citation=_HYDICE_CITATION, note=_HYDICE_NOTE)


def _hydice_urban162() -> SensorPreset:
    full = _hydice()
    return SensorPreset(name="hydice_urban162", centres_nm=tuple(full.centres[np.asarray(URBAN_162_CHANNELS) - 1]),
                        fwhm_nm=(10.0,) * len(URBAN_162_CHANNELS),
                        band_names=tuple(f"ch{c}" for c in URBAN_162_CHANNELS), approximate=True,
                        citation=_HYDICE_CITATION,
                        note=_HYDICE_NOTE + " The 162 channels Urban keeps (the hydice preset without channels "
                                            "1-4, 76, 87, 101-111, 136-153, 198-210).")


_FACTORIES: dict[str, Callable[[], SensorPreset]] = {
    "aviris": _aviris,
    "aviris_1992": _aviris_1992,
    "hyperion": _hyperion,
    "enmap": _enmap,
    "prisma": _prisma,
    "emit": _emit,
    "desis": _desis,
    "sentinel2_msi": _sentinel2_msi,
    "landsat8_oli": _landsat8_oli,
    "landsat9_oli": _landsat9_oli,
    "sentinel1_c": _sentinel1_c,
    "hydice": _hydice,
    "hydice_urban162": _hydice_urban162,
}

_warned_presets: set[str] = set()


def preset_names() -> tuple[str, ...]:
    """Every preset name, in the order of docs/sensors.md."""
    return tuple(_FACTORIES)


@functools.lru_cache(maxsize=None)
def _build(name: str) -> SensorPreset:
    return _FACTORIES[name]()


def get_preset(name: str) -> SensorPreset:
    """The preset called ``name`` (case-insensitive); an unknown name is a ConfigError with a suggestion."""
    if isinstance(name, SensorPreset):
        return name
    if not isinstance(name, str):
        raise ConfigError(f"sensor preset must be a name (one of {', '.join(preset_names())}), got {name!r}")
    key = name.strip().lower()
    if key not in _FACTORIES:
        close = difflib.get_close_matches(key, preset_names(), n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"unknown sensor preset {name!r}{hint}; known presets: {', '.join(preset_names())}")
    return _build(key)


def warn_if_approximate(preset: SensorPreset | str) -> None:
    """Warn (once per preset per process) that an approximate preset's centres may be off, and why."""
    preset = get_preset(preset)
    if preset.approximate and preset.name not in _warned_presets:
        _warned_presets.add(preset.name)
        warnings.warn(f"sensor preset {preset.name!r} is approximate: {preset.note}", UserWarning, stacklevel=3)


def _normalised_band_name(name: str) -> str:
    """'b08' -> 'B8', 'B8a' -> 'B8A': Sentinel-2 and Landsat names are written with and without zero padding."""
    text = name.strip().upper()
    return re.sub(r"^([A-Z]+)0+(?=\d)", r"\1", text)


def band_numbers(preset: SensorPreset | str, bands: Sequence[int | str]) -> tuple[int, ...]:
    """1-based band numbers of a subset given as band numbers (1..N) and/or band names of the preset."""
    preset = get_preset(preset)
    count = preset.num_bands
    if isinstance(bands, (str, bytes)) or not isinstance(bands, (Sequence, np.ndarray)):
        raise ConfigError(
            f"bands of sensor preset {preset.name!r} must be a list of 1-based band numbers (1..{count})"
            f"{' or band names' if preset.band_names else ''}, got {bands!r}"
        )
    by_name = ({_normalised_band_name(n): i + 1 for i, n in enumerate(preset.band_names)}
               if preset.band_names else {})
    numbers: list[int] = []
    outside: list[Any] = []
    for item in (bands.tolist() if isinstance(bands, np.ndarray) else list(bands)):
        if isinstance(item, str):
            number = by_name.get(_normalised_band_name(item))
            if number is None:
                outside.append(item)
            else:
                numbers.append(number)
        elif isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
            if 1 <= int(item) <= count:
                numbers.append(int(item))
            else:
                outside.append(int(item))
        else:
            raise ConfigError(f"bands of sensor preset {preset.name!r} must be integers (1-based) or band names, "
                              f"got {item!r}")
    if outside:
        names = f" or one of its band names ({', '.join(preset.band_names[:3])}, ...)" if preset.band_names else ""
        verb = "is" if len(outside) == 1 else "are"
        raise ConfigError(f"sensor preset {preset.name!r} has bands 1..{count}{names}; "
                          f"{', '.join(repr(v) for v in outside)} {verb} not among them")
    if not numbers:
        raise ConfigError(f"bands of sensor preset {preset.name!r}: the subset is empty")
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        raise ConfigError(f"bands of sensor preset {preset.name!r}: band(s) {repeated} listed more than once")
    return tuple(numbers)


def select_bands(preset: SensorPreset | str, bands_1based: Sequence[int | str] | None = None, *,
                 warn: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """(centres nm, FWHM nm, band names or None) of the whole preset or of a 1-based subset (numbers or names)."""
    preset = get_preset(preset)
    if bands_1based is None:
        indices = np.arange(preset.num_bands)
    else:
        indices = np.asarray(band_numbers(preset, bands_1based), dtype=np.int64) - 1
    if warn:
        warn_if_approximate(preset)
    names = None if preset.band_names is None else tuple(preset.band_names[i] for i in indices)
    return preset.centres[indices], preset.fwhm[indices], names


def preset_wavelengths(name: SensorPreset | str, bands_1based: Sequence[int | str] | None = None,
                       band_count: int | None = None, where: str = "") -> np.ndarray:
    """Band centres (nm) for a scene; ConfigError when the (subset's) band count is not the cube's ``band_count``."""
    preset = get_preset(name)
    centres, _, _ = select_bands(preset, bands_1based, warn=False)
    if band_count is not None and centres.size != int(band_count):
        subset = "" if bands_1based is None else f" (subset of {centres.size} of its {preset.num_bands} bands)"
        raise ConfigError(f"{where + ': ' if where else ''}sensor preset {preset.name!r}{subset} has {centres.size} "
                          f"bands but the cube has {int(band_count)}")
    warn_if_approximate(preset)
    return centres
