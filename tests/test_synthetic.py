"""Linear-mixing synthetic scenes: determinism, the physics of the model (sum-to-one, SNR, spatial coherence),
endmember choice and resampling from the real USGS library, and Urban's real abundance maps."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from hsfm_train.data.synthetic import (
    SENSOR_GRIDS,
    SyntheticSceneConfig,
    generate_scene,
    generate_scenes,
    scene_seed,
    sensor_grid,
)
from hsfm_train.spectra import SpectralLibrary, load_spectral_library
from hsfm_train.errors import ConfigError, DataFormatError
from tests.conftest import shared_file


@pytest.fixture(scope="module")
def library() -> SpectralLibrary:
    return load_spectral_library()


def _pairwise_angles_deg(spectra: np.ndarray) -> np.ndarray:
    unit = spectra / np.linalg.norm(spectra, axis=1, keepdims=True)
    cosines = np.clip(unit @ unit.T, -1.0, 1.0)
    return np.degrees(np.arccos(cosines[np.triu_indices(len(spectra), k=1)]))


def _interp_on_sorted_grid(library: SpectralLibrary, index: int, target: np.ndarray) -> np.ndarray:
    order = np.argsort(library.wavelengths_nm, kind="stable")
    return np.interp(target, library.wavelengths_nm[order], library.spectra[index, order])


def test_packaged_library_is_the_real_usgs_splib(library):
    assert library.spectra.shape == (498, 224) and library.spectra.dtype == np.float32
    assert np.isfinite(library.spectra).all() and library.spectra.min() >= 0
    assert library.wavelengths_nm.min() == pytest.approx(383.15, abs=0.01)
    assert library.wavelengths_nm.max() == pytest.approx(2508.2, abs=0.01)
    assert len(set(library.names)) == 498 and library.names[0] == "Acmite NMNH133746"


def test_library_loads_from_any_npz_with_the_same_keys(tmp_path, library):
    path = tmp_path / "lib.npz"
    names = np.array(library.names[:5])
    np.savez(path, spectra=library.spectra[:5], wavelengths_nm=library.wavelengths_nm, names=names)
    loaded = load_spectral_library(path)
    np.testing.assert_array_equal(loaded.spectra, library.spectra[:5])
    assert loaded.names == library.names[:5]
    np.savez(path, spectra=library.spectra[:5], wavelengths_nm=library.wavelengths_nm)
    with pytest.raises(DataFormatError, match="names"):
        load_spectral_library(path)


def test_same_seed_same_scene_different_seed_different_scene(library):
    config = SyntheticSceneConfig(height=32, width=32)
    first, again, other = (generate_scene(config, seed, library) for seed in (7, 7, 8))
    for key in ("cube", "abundances", "endmembers"):
        np.testing.assert_array_equal(getattr(first, key), getattr(again, key))
    assert first.name == again.name and first.metadata == again.metadata
    assert not np.array_equal(first.cube, other.cube)
    assert not np.array_equal(first.abundances, other.abundances)


def test_any_corpus_scene_can_be_regenerated_alone(library):
    config = SyntheticSceneConfig(height=16, width=16)
    corpus = generate_scenes(config, count=3, seed=11)
    assert isinstance(corpus, Iterator)  # lazy: one scene in memory at a time
    scenes = list(corpus)
    alone = generate_scene(config, scene_seed(11, 2), library)
    np.testing.assert_array_equal(scenes[2].cube, alone.cube)
    assert scenes[2].name == alone.name
    assert len({scene.name for scene in scenes}) == 3


@pytest.mark.parametrize("source", ["gaussian_field", "urban"])
def test_abundances_are_non_negative_and_sum_to_one(source, library):
    scene = generate_scene(SyntheticSceneConfig(abundance_source=source), 3, library)
    assert scene.abundances.shape == (64, 64, 4) and scene.abundances.dtype == np.float32
    assert scene.abundances.min() >= 0
    np.testing.assert_allclose(scene.abundances.sum(axis=2), 1.0, atol=1e-6)
    assert scene.metadata["abundance_source"] == source and scene.metadata["generator"] == "linear_mixing"


@pytest.mark.parametrize("snr_db", [10.0, 30.0, 50.0])
def test_measured_snr_matches_the_request(snr_db, library):
    scene = generate_scene(SyntheticSceneConfig(snr_db=snr_db), 5, library)
    signal = scene.abundances @ scene.endmembers
    noise = scene.cube.astype(np.float64) - signal
    measured = 10 * np.log10(np.mean(signal.astype(np.float64) ** 2) / np.mean(noise**2))
    assert abs(measured - snr_db) < 0.5
    assert abs(noise.mean()) < 3 * scene.metadata["noise_sigma"] / np.sqrt(noise.size)


def test_noise_free_scene_is_exactly_the_mixture(library):
    scene = generate_scene(SyntheticSceneConfig(snr_db=None), 5, library)
    np.testing.assert_allclose(scene.cube, scene.abundances @ scene.endmembers, rtol=1e-5, atol=1e-7)
    assert scene.metadata["noise_sigma"] == 0.0


def test_abundances_are_spatially_coherent(library):
    abundances = generate_scene(SyntheticSceneConfig(snr_db=None), 9, library).abundances
    neighbour_difference = np.abs(np.diff(abundances, axis=1)).mean()
    rng = np.random.default_rng(0)
    pixels = abundances.reshape(-1, abundances.shape[2])
    pairs = rng.integers(len(pixels), size=(2, 4000))
    random_pair_difference = np.abs(pixels[pairs[0]] - pixels[pairs[1]]).mean()
    assert neighbour_difference < 0.2 * random_pair_difference


def test_lower_temperature_gives_purer_pixels(library):
    def mean_purity(temperature: float) -> float:
        config = SyntheticSceneConfig(temperature=temperature, snr_db=None)
        return float(generate_scene(config, 4, library).abundances.max(axis=2).mean())

    assert mean_purity(0.1) > 0.9 > mean_purity(0.5) > mean_purity(5.0)


def test_endmembers_are_library_spectra_far_enough_apart(library):
    config = SyntheticSceneConfig(num_endmembers=8, min_spectral_angle_deg=10.0, height=8, width=8)
    for seed in range(5):
        scene = generate_scene(config, seed, library)
        indices = scene.metadata["library_indices"]
        np.testing.assert_array_equal(scene.endmembers, library.spectra[indices])
        assert scene.endmember_names == [library.names[i] for i in indices]
        assert _pairwise_angles_deg(scene.endmembers).min() >= 10.0


def test_impossible_endmember_request_fails_clearly(library):
    config = SyntheticSceneConfig(num_endmembers=60, min_spectral_angle_deg=30.0, height=4, width=4)
    with pytest.raises(ConfigError, match="min_spectral_angle_deg"):
        generate_scene(config, 0, library)
    with pytest.raises(ConfigError, match="num_endmembers"):
        two_spectra = SpectralLibrary(library.spectra[:2], library.wavelengths_nm, library.names[:2])
        generate_scene(SyntheticSceneConfig(num_endmembers=3), 0, two_spectra)


@pytest.mark.parametrize("grid, bands", [("samson156", 156), ("enmap_like_218", 218)])
def test_resampling_onto_another_sensor_grid(grid, bands, library):
    config = SyntheticSceneConfig(target_wavelengths_nm=grid, height=8, width=8)
    scene = generate_scene(config, 2, library)
    target = sensor_grid(grid)
    assert scene.cube.shape == (8, 8, bands) and scene.endmembers.shape == (4, bands)
    np.testing.assert_array_equal(scene.wavelengths_nm, target)
    assert scene.sensor == f"synthetic_{grid}"
    for row, index in enumerate(scene.metadata["library_indices"]):
        for band in (0, bands // 3, bands - 1):
            expected = _interp_on_sorted_grid(library, index, target)[band]
            assert scene.endmembers[row, band] == pytest.approx(expected, rel=1e-5)
    assert _pairwise_angles_deg(scene.endmembers).min() >= config.min_spectral_angle_deg


def test_library_grid_resampled_onto_itself_is_unchanged(library):
    resampled = library.resampled(sensor_grid("aviris224"))
    np.testing.assert_allclose(resampled.spectra, library.spectra, rtol=1e-6)
    assert set(SENSOR_GRIDS) == {"aviris224", "enmap_like_218", "samson156"}


def test_samson_grid_matches_the_real_samson_band_centres():
    real = np.load(shared_file("unmixing/samson/samson.npz"))["wavelengths_nm"]
    np.testing.assert_allclose(sensor_grid("samson156"), real, atol=1e-3)


def test_target_grid_outside_library_range_is_refused(library):
    config = SyntheticSceneConfig(target_wavelengths_nm=np.linspace(350, 900, 50))
    with pytest.raises(ConfigError, match="target_wavelengths_nm"):
        generate_scene(config, 0, library)


def test_urban_source_crops_the_real_urban_maps(library):
    with np.load(shared_file("unmixing/urban/urban_gt_end4.npz")) as urban:
        real = urban["abundances"]
    config = SyntheticSceneConfig(abundance_source="urban", height=40, width=50)
    for seed in range(4):
        scene = generate_scene(config, seed, library)
        crop = scene.metadata["urban_crop"]
        maps = np.rot90(real, k=crop["rot90"])
        maps = maps[:, ::-1] if crop["flip_lr"] else maps
        expected = maps[crop["row"] : crop["row"] + 40, crop["col"] : crop["col"] + 50]
        np.testing.assert_allclose(scene.abundances, expected, atol=1e-3)  # float16 storage + renormalisation


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"height": 0}, "height"),
        ({"width": 2.5}, "width"),
        ({"num_endmembers": 1}, "num_endmembers"),
        ({"snr_db": float("nan")}, "snr_db"),
        ({"abundance_source": "perlin"}, "abundance_source"),
        ({"abundance_source": "urban", "num_endmembers": 5}, "num_endmembers"),
        ({"abundance_source": "urban", "height": 400}, "height"),
        ({"smoothness": -1}, "smoothness"),
        ({"temperature": 0}, "temperature"),
        ({"min_spectral_angle_deg": 95}, "min_spectral_angle_deg"),
        ({"target_wavelengths_nm": np.array([[500.0]])}, "target_wavelengths_nm"),
        ({"target_wavelengths_nm": "landsat9"}, "landsat9"),
        ({"name_prefix": ""}, "name_prefix"),
    ],
)
def test_bad_config_values_raise_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        SyntheticSceneConfig(**overrides)


def test_illumination_and_endmember_variability_scale_pixels_but_keep_the_abundances(library):
    flat = generate_scene(SyntheticSceneConfig(snr_db=None, height=48, width=48), 21, library)
    shaded = generate_scene(SyntheticSceneConfig(snr_db=None, height=48, width=48, illumination_std=0.3), 21, library)
    varied = generate_scene(SyntheticSceneConfig(snr_db=None, height=48, width=48, endmember_variability=0.2), 21,
                            library)
    np.testing.assert_array_equal(flat.abundances, shaded.abundances)  # ground truth stays the sum-to-one mixture
    np.testing.assert_array_equal(flat.endmembers, shaded.endmembers)
    # illumination multiplies each whole spectrum: the spectral shape (angle) is kept, the brightness is not
    ratio = shaded.cube / np.maximum(flat.cube, 1e-12)
    per_pixel = ratio.reshape(-1, ratio.shape[-1])
    assert np.allclose(per_pixel, per_pixel[:, :1], rtol=1e-4, atol=1e-5)
    brightness = per_pixel[:, 0]
    assert 0.2 < np.std(np.log(brightness)) < 0.4 and abs(np.mean(brightness) - 1) < 0.15
    # smooth, not per-pixel noise: neighbours agree far more than distant pixels
    field = np.log(brightness).reshape(48, 48)
    assert np.corrcoef(field[:, :-1].ravel(), field[:, 1:].ravel())[0, 1] > 0.9
    # endmember variability changes spectral shape where materials mix, but not the abundances
    np.testing.assert_array_equal(flat.abundances, varied.abundances)
    assert not np.allclose(varied.cube, flat.cube)


def test_band_dependent_noise_is_larger_in_bright_bands_at_the_same_total_snr(library):
    config = dict(height=64, width=64, snr_db=20.0)
    clean = generate_scene(SyntheticSceneConfig(**config | {"snr_db": None}), 4, library)
    white = generate_scene(SyntheticSceneConfig(**config), 4, library)
    shot = generate_scene(SyntheticSceneConfig(**config, noise_model="band_dependent"), 4, library)
    signal = np.mean(clean.cube.reshape(-1, clean.cube.shape[-1]), axis=0)
    white_sigma = np.std((white.cube - clean.cube).reshape(-1, signal.size), axis=0)
    shot_sigma = np.std((shot.cube - clean.cube).reshape(-1, signal.size), axis=0)
    assert np.std(white_sigma) / np.mean(white_sigma) < 0.05  # one sigma for every band
    expected = np.sqrt(signal / signal.mean()) * np.sqrt(np.mean(shot_sigma**2))
    np.testing.assert_allclose(shot_sigma, expected, rtol=0.1)
    assert np.mean(shot_sigma**2) == pytest.approx(np.mean(white_sigma**2), rel=0.05)  # same total noise power


def test_realism_options_reject_impossible_values():
    for bad in ({"noise_model": "pink"}, {"illumination_std": -0.1}, {"endmember_variability": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SyntheticSceneConfig(**bad)
