"""Sensor band-grid presets (hsfm_train.data.sensors) and the readers' sensor_preset / preset_bands options."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from hsfm_train.cli import main
from hsfm_train.data import sensors
from hsfm_train.data.readers import read_scene
from hsfm_train.data.sensors import get_preset, preset_names, preset_wavelengths, select_bands
from hsfm_train.data.shards import load_index
from hsfm_train.data.synthetic import SyntheticSceneConfig, generate_scene, sensor_grid
from hsfm_train.spectra import load_spectral_library
from hsfm_train.errors import ConfigError
from tests.conftest import shared_file

SALINAS_A = "classification/salinasA/salinasA.npz"
INDIAN_PINES = "classification/indian_pines/indian_pines.npz"
SPC_92AV3C = "classification/label_maps/92AV3C.spc"
AVIRIS_SPECTROMETERS = {"A": (1, 32), "B": (33, 96), "C": (97, 160), "D": (161, 224)}

# Where each preset's centres step back in its own band order (1-based band after which they do), by choice: bands
# stay in the order the sensor's files store them (see the sensors module docstring). Every other preset is ascending.
STEPS_BACK_AFTER = {
    "aviris": [32, 96],            # spectrometers A/B and B/C overlap; C/D do not (1869.6 -> 1879.6 nm)
    "aviris_1992": [31, 94, 157],  # the same channels 32, 96, 160 (channels 1, 33, 97, 161 are absent)
    "hyperion": [70],              # VNIR B1-B70, then SWIR from B71 = 851.9 nm
    "enmap": [91],                 # VNIR bands 1-91, then SWIR from 902 nm
    "prisma": [66],                # VNIR 66, then SWIR from 920 nm
    "landsat8_oli": [7],           # B8 (pan) and B9 (cirrus) after SWIR2 B7
    "landsat9_oli": [7],
}


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each approximate preset warns once per process; give a test its own 'process'."""
    monkeypatch.setattr(sensors, "_warned_presets", set())


def _steps_back(centres: np.ndarray) -> list[int]:
    return (np.flatnonzero(np.diff(centres) <= 0) + 1).tolist()


# ------------------------------------------------------------------------------------------------ presets


def test_required_presets_and_band_counts():
    counts = {name: get_preset(name).num_bands for name in preset_names()}
    assert counts == {"aviris": 224, "aviris_1992": 220, "hyperion": 242, "enmap": 224, "prisma": 239, "emit": 285,
                      "desis": 235, "sentinel2_msi": 13, "landsat8_oli": 9, "landsat9_oli": 9, "sentinel1_c": 1,
                      "hydice": 210, "hydice_urban162": 162}


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_consistent(name):
    preset = get_preset(name)
    centres, fwhm = preset.centres, preset.fwhm
    assert centres.shape == fwhm.shape == (preset.num_bands,)
    assert np.isfinite(centres).all() and np.isfinite(fwhm).all() and (fwhm > 0).all() and (centres > 0).all()
    assert preset.band_names is None or len(preset.band_names) == preset.num_bands
    assert len(preset.citation) > 40 and (not preset.approximate or len(preset.note) > 40)
    # strictly increasing within each spectrometer / detector, and exactly the documented steps back between them
    assert _steps_back(centres) == STEPS_BACK_AFTER.get(name, [])
    for start, stop in preset.segments:
        assert (np.diff(centres[start - 1:stop]) > 0).all()
    assert np.unique(centres).size == centres.size  # sorted, the grid is strictly increasing: no repeated centre


def test_approximate_flags():
    assert {name for name in preset_names() if get_preset(name).approximate} == {"aviris", "prisma", "landsat9_oli",
                                                                                      "hydice", "hydice_urban162"}


def test_named_multispectral_bands():
    centres, fwhm, names = select_bands("sentinel2_msi", ["B4", "B8A", "b08"])
    assert names == ("B4", "B8A", "B8")
    np.testing.assert_allclose(centres, [664.6, 864.7, 832.8])
    assert get_preset("sentinel2_msi").band_names == ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9",
                                                       "B10", "B11", "B12")
    for landsat in ("landsat8_oli", "landsat9_oli"):
        preset = get_preset(landsat)
        assert preset.band_names == tuple(f"B{i}" for i in range(1, 10))
        nir = select_bands(landsat, ["B5"], warn=False)[0][0]
        assert nir == pytest.approx(865, abs=1)
        assert select_bands(landsat, [8], warn=False)[0][0] == pytest.approx(589.5, abs=1)  # panchromatic
        assert select_bands(landsat, [9], warn=False)[0][0] == pytest.approx(1373.5, abs=1)  # cirrus
    sar = get_preset("sentinel1_c").centres[0]
    assert sar > 1e7 and sar == pytest.approx(299_792_458 / 5.405e9 * 1e9)  # c / 5.405 GHz, ~5.5466e7 nm


def test_aviris_preset_is_the_packaged_library_grid():
    library = load_spectral_library()
    np.testing.assert_array_equal(get_preset("aviris").centres, library.wavelengths_nm.astype(np.float64))
    np.testing.assert_array_equal(get_preset("aviris").centres.astype(np.float32), sensor_grid("aviris224"))


def test_aviris_1992_preset_is_92av3c_and_matches_indian_pines():
    rows = np.loadtxt(shared_file(SPC_92AV3C), skiprows=2)
    preset = get_preset("aviris_1992")
    np.testing.assert_allclose(preset.centres, rows[:, 0], atol=1e-9)
    np.testing.assert_allclose(preset.fwhm, rows[:, 1], atol=1e-9)
    with np.load(shared_file(INDIAN_PINES)) as pines:
        centres, fwhm, _ = select_bands(preset, pines["corrected_bands_1based"].tolist())
        np.testing.assert_allclose(centres, pines["wavelengths_nm"], atol=1e-3)
        np.testing.assert_allclose(fwhm, pines["fwhm_nm"], atol=1e-3)


def test_aviris_preset_against_indian_pines_1992_calibration():
    """The 224-channel grid is another calibration season than Indian Pines' (1992): what the difference is.

    Mapped by AVIRIS channel (92AV3C's channel column), the two differ by a near-constant offset per spectrometer,
    -9.5..-7.2 (A), -14.0..-13.0 (B), -10.7..-9.2 (C) and +6.9..+9.2 nm (D): a realignment of each spectrometer by
    about one channel, not noise. So the assertion is: at most 1.5 channel widths (15 nm) apart, and within each
    spectrometer the offset varies by less than 3 nm. This is why "aviris" is flagged approximate and
    "aviris_1992" exists.
    """
    with np.load(shared_file(INDIAN_PINES)) as pines:
        pines_centres = pines["wavelengths_nm"].astype(np.float64)
        listed = pines["corrected_bands_1based"].astype(np.int64)
    channels = np.array([int(name[2:]) for name in get_preset("aviris_1992").band_names])[listed - 1]
    offsets = get_preset("aviris").centres[channels - 1] - pines_centres
    assert np.abs(offsets).max() <= 15.0
    for low, high in AVIRIS_SPECTROMETERS.values():
        part = offsets[(channels >= low) & (channels <= high)]
        assert part.size > 30 and np.ptp(part) < 3.0


# ------------------------------------------------------------------------------------------------ API errors


def test_unknown_preset_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown sensor preset 'enmapp' \(did you mean 'enmap'\?\).*aviris"):
        get_preset("enmapp")
    with pytest.raises(ConfigError, match="did you mean 'sentinel2_msi'"):
        read_scene(shared_file(SALINAS_A), sensor_preset="sentinel2")


def test_subset_outside_the_preset_is_one_error_naming_it():
    with pytest.raises(ConfigError, match=r"bands 1\.\.224; 0, 225 are not among them"):
        select_bands("aviris", [1, 0, 2, 225])
    with pytest.raises(ConfigError, match="'B13'"):
        select_bands("sentinel2_msi", ["B4", "B13"])
    with pytest.raises(ConfigError, match="more than once"):
        select_bands("aviris", [3, 3])
    with pytest.raises(ConfigError, match="empty"):
        select_bands("aviris", [])


def test_preset_wavelengths_checks_the_band_count(fresh_warnings):
    assert preset_wavelengths("enmap", band_count=224).shape == (224,)
    np.testing.assert_allclose(preset_wavelengths("sentinel2_msi", ["B2", "B3", "B4"], band_count=3),
                               [492.4, 559.8, 664.6])
    with pytest.raises(ConfigError, match=r"scene\.tif: sensor preset 'sentinel2_msi' has 13 bands but the cube has "
                                          r"224"):
        preset_wavelengths("sentinel2_msi", band_count=224, where="scene.tif")


def test_approximate_preset_warns_once_saying_why(fresh_warnings):
    with pytest.warns(UserWarning, match="'prisma' is approximate: No per-band table"):
        preset_wavelengths("prisma")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preset_wavelengths("prisma")  # once per preset per process
        select_bands("emit")  # exact presets never warn
    with pytest.warns(UserWarning, match="'aviris' is approximate: AVIRIS is recalibrated"):
        select_bands("aviris", [1, 2, 3])


def test_synthetic_grid_names_include_the_presets():
    assert sensor_grid("enmap").shape == (224,)
    scene = generate_scene(SyntheticSceneConfig(target_wavelengths_nm="sentinel2_msi", height=8, width=8), 0)
    assert scene.num_bands == 13 and scene.sensor == "synthetic_sentinel2_msi"
    np.testing.assert_allclose(scene.wavelengths_nm, get_preset("sentinel2_msi").centres, rtol=1e-6)
    with pytest.raises(ConfigError, match="sensor presets"):
        sensor_grid("no_such_grid")


# ------------------------------------------------------------------------------------------------ readers


@pytest.mark.filterwarnings("ignore:sensor preset 'aviris' is approximate")
def test_salinas_a_with_the_aviris_preset_and_corrected_bands():
    path = shared_file(SALINAS_A)
    scene = read_scene(path, sensor_preset="aviris", bands="corrected")
    plain = read_scene(path, bands="corrected")
    assert scene.shape == plain.shape == (83, 86, 204) and np.array_equal(scene.cube, plain.cube)
    assert scene.sensor == "aviris" and scene.metadata["sensor_preset"] == "aviris"
    keep = plain.metadata["corrected_bands_1based"]
    np.testing.assert_array_equal(scene.wavelengths_nm, get_preset("aviris").centres[keep - 1].astype(np.float32))
    assert scene.wavelengths_nm.shape == scene.metadata["fwhm_nm"].shape == (204,)
    assert 383 < scene.wavelengths_nm.min() and scene.wavelengths_nm.max() < 2509
    # channel order kept: the two spectrometer overlaps survive the correction (channels 32|33 and 96|97)
    assert _steps_back(scene.wavelengths_nm) == [32, 96]
    assert np.unique(scene.wavelengths_nm).size == 204
    # all 224 when bands are not dropped
    assert read_scene(path, sensor_preset="aviris").wavelengths_nm.shape == (224,)


def test_indian_pines_with_the_1992_preset_and_its_corrected_list():
    path = shared_file(INDIAN_PINES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact preset, and the file's own centres agree: no warning
        scene = read_scene(path, sensor_preset="aviris_1992", preset_bands="corrected", bands="corrected")
    assert scene.shape == (145, 145, 200) and scene.sensor == "aviris_1992"
    np.testing.assert_allclose(scene.wavelengths_nm, scene.metadata["file_wavelengths_nm"], atol=1e-3)
    assert scene.metadata["band_names"][0] == "ch2" and scene.metadata["band_names"].shape == (200,)
    with pytest.raises(ConfigError, match="220 bands, but the cube has 200 bands.*preset_bands='corrected'"):
        read_scene(path, sensor_preset="aviris_1992")


def test_a_wrong_preset_is_one_error_naming_file_preset_and_counts():
    path = shared_file(SALINAS_A)
    with pytest.raises(ConfigError) as error:
        read_scene(path, sensor_preset="sentinel2_msi")
    message = str(error.value)
    assert str(path) in message and "'sentinel2_msi'" in message and "13 bands" in message and "224 bands" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="selects 204 of the 224 bands.*still holds all 224 bands"):
        read_scene(path, sensor_preset="aviris", preset_bands="corrected")


@pytest.mark.parametrize("subset, offending", [([0, 1, 2], "0"), (list(range(1, 224)) + [225], "225")])
def test_reader_subset_outside_the_preset(subset, offending):
    path = shared_file(SALINAS_A)
    with pytest.raises(ConfigError, match=rf"salinasA\.npz: preset_bands: .*bands 1\.\.224; {offending} is not"):
        read_scene(path, sensor_preset="aviris", preset_bands=subset)


def test_preset_and_explicit_wavelengths_conflict(tmp_path):
    path = shared_file(SALINAS_A)
    with pytest.raises(ConfigError, match="either wavelengths_nm= or sensor_preset="):
        read_scene(path, sensor_preset="aviris", wavelengths_nm=np.linspace(400, 2500, 224))
    with pytest.raises(ConfigError, match="preset_bands= needs sensor_preset="):
        read_scene(path, preset_bands=[1, 2])
    with pytest.raises(ConfigError, match="'corrected'"):
        read_scene(path, sensor_preset="aviris", preset_bands="all")


def test_named_subset_and_disagreeing_file_centres(tmp_path):
    path = tmp_path / "s2_stack.npz"
    rng = np.random.default_rng(0)
    np.savez(path, cube=rng.random((6, 5, 4), dtype=np.float32), wavelengths_nm=np.array([490.0, 560.0, 665.0, 705.0]))
    with pytest.warns(UserWarning, match=r"differ from sensor preset 'sentinel2_msi' by up to 1[23]\d\.\d nm"):
        scene = read_scene(path, sensor_preset="sentinel2_msi", preset_bands=["B02", "B03", "B04", "B08"])
    np.testing.assert_allclose(scene.wavelengths_nm, [492.4, 559.8, 664.6, 832.8], rtol=1e-6)
    assert scene.metadata["band_names"].tolist() == ["B2", "B3", "B4", "B8"]
    assert scene.metadata["preset_bands_1based"].tolist() == [2, 3, 4, 8]
    np.testing.assert_array_equal(scene.metadata["file_wavelengths_nm"], [490.0, 560.0, 665.0, 705.0])
    assert scene.sensor == "sentinel2_msi"
    with pytest.warns(UserWarning, match="differ from sensor preset"):
        own_name = read_scene(path, sensor="my_s2", sensor_preset="sentinel2_msi", preset_bands=[2, 3, 4, 8])
    assert own_name.sensor == "my_s2"


@pytest.mark.filterwarnings("ignore:sensor preset 'aviris' is approximate")
def test_preset_options_from_a_shard_manifest(tmp_path):
    stack = tmp_path / "s2_stack.npz"
    np.savez(stack, cube=np.random.default_rng(1).random((32, 32, 4), dtype=np.float32))
    manifest = tmp_path / "scenes.yaml"
    manifest.write_text(
        f"- path: {shared_file(SALINAS_A)}\n"
        "  bands: corrected\n"
        "  sensor_preset: aviris\n"
        "- path: s2_stack.npz\n"
        "  sensor_preset: sentinel2_msi\n"
        "  preset_bands: [B2, B3, B4, B8]\n"
    )
    out = tmp_path / "shards"
    assert main(["shards", "build", "--manifest", str(manifest), "--out", str(out), "--tile-size", "32",
                 "--quiet"]) == 0
    band_sets = {info["sensor"]: info for info in load_index(out)["band_sets"].values()}
    assert set(band_sets) == {"aviris", "sentinel2_msi"}
    assert band_sets["aviris"]["bands"] == 204 and len(band_sets["aviris"]["wavelengths_nm"]) == 204
    keep = np.load(shared_file(SALINAS_A))["corrected_bands_1based"]
    np.testing.assert_allclose(band_sets["aviris"]["wavelengths_nm"], get_preset("aviris").centres[keep - 1],
                               atol=1e-3)
    np.testing.assert_allclose(band_sets["sentinel2_msi"]["wavelengths_nm"], [492.4, 559.8, 664.6, 832.8], atol=1e-3)
