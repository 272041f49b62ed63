"""Frozen-backbone probes: per-pixel features, K-shot supports, classification scores, the probes themselves, and
`run_probe` end to end on real Indian Pines and Salinas-A with a micro export (random weights: the test checks the
machinery and the controls, not that pretraining helps)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from hsfm_train.data.readers import read_scene
from hsfm_train.engine.export import export_model, load_pretrained
from hsfm_train.errors import ConfigError
from hsfm_train.metrics import classification_scores
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.stages.probe import (ProbeConfig, fit_probe, format_probe_table, load_probe_config, pixel_features,
                                     read_split, run_probe, sample_support, scene_statistics, split_support)
from tests.conftest import shared_file

MICRO = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8)
INDIAN_PINES = "classification/indian_pines/indian_pines.npz"
SALINAS_A = "classification/salinasA/salinasA.npz"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _micro(seed: int = 0) -> SpectralMAE:
    torch.manual_seed(seed)
    return SpectralMAE(ModelConfig(**MICRO)).eval()


def _cube(height: int, width: int, bands: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random cube with AVIRIS-like band centres (VNIR and SWIR: two spectral groups)."""
    rng = np.random.default_rng(seed)
    cube = rng.normal(size=(height, width, bands)).astype(np.float32)
    return cube, np.linspace(400.0, 2500.0, bands).astype(np.float32)


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
    """A micro export whose normalisation knows Indian Pines' band set (not Salinas-A's)."""
    scene = read_scene(shared_file(INDIAN_PINES))
    mean, std = scene_statistics(scene.cube)
    statistics = {"indian_pines": {"bands": int(scene.cube.shape[2]), "wavelengths_nm": scene.wavelengths_nm.tolist(),
                                   "mean": mean.tolist(), "std": std.tolist()}}
    return export_model(_micro(), tmp_path_factory.mktemp("probe") / "export", normalization=statistics)


# ------------------------------------------------------------------------------------------------- features


@pytest.mark.parametrize("height,width", [(145, 145), (83, 86)])
def test_pixel_features_cover_every_pixel_of_a_cube_not_a_multiple_of_the_patch(height, width):
    cube, wavelengths = _cube(height, width)
    features = pixel_features(_micro(), cube, wavelengths)
    assert features.shape == (height * width, 2 * MICRO["embed_dim"])  # VNIR and SWIR groups, D each
    assert features.dtype == np.float32 and np.isfinite(features).all()
    with_spectrum = pixel_features(_micro(), cube, wavelengths, with_spectrum=True)
    np.testing.assert_array_equal(with_spectrum[:, -cube.shape[2]:], cube.reshape(-1, cube.shape[2]))
    np.testing.assert_allclose(with_spectrum[:, :features.shape[1]], features, atol=1e-5)


def test_pixel_features_are_bilinear_between_patch_centres():
    cube, wavelengths = _cube(48, 48)
    features = pixel_features(_micro(), cube, wavelengths).reshape(48, 48, -1)
    # patch size 8: token centres sit at pixel 3.5, 11.5, ...; pixels 4..11 lie between two centres, where a
    # bilinear upsampling is linear along each axis (zero second differences), and it is not constant
    row, col = features[20, 4:12], features[4:12, 20]
    scale = np.abs(features).mean()
    for segment in (row, col):
        assert np.abs(np.diff(segment, n=2, axis=0)).max() < 1e-4 * scale
        assert np.abs(np.diff(segment, axis=0)).max() > 1e-3 * scale


def test_pixel_features_follow_the_content_of_their_patch():
    cube, wavelengths = _cube(64, 64)
    model = _micro()
    before = pixel_features(model, cube, wavelengths).reshape(8, 8, 8, 8, -1)  # [rows, p, cols, p, F]
    changed = cube.copy()
    changed[40:48, 16:24] += 3.0  # patch (5, 2)
    after = pixel_features(model, changed, wavelengths).reshape(8, 8, 8, 8, -1)
    change = np.abs(after - before).mean(axis=(1, 3, 4))  # per patch
    assert np.unravel_index(change.argmax(), change.shape) == (5, 2)
    assert change[5, 2] > 2 * np.median(change)  # attention is global, so only "most", not "only"


def test_pixel_features_of_tiles_match_the_tile_encoded_alone():
    cube, wavelengths = _cube(64, 64)
    model = _micro()
    tiled = pixel_features(model, cube, wavelengths, tile_size=32, tile_overlap=0).reshape(64, 64, -1)
    alone = pixel_features(model, cube[:32, :32], wavelengths).reshape(32, 32, -1)
    # away from the tile border (where bilinear upsampling blends in the next tile's tokens)
    np.testing.assert_allclose(tiled[:28, :28], alone[:28, :28], rtol=1e-4, atol=1e-5)
    assert np.isfinite(tiled).all()


# -------------------------------------------------------------------------------------------------- support


def _labels() -> np.ndarray:
    labels = np.zeros((20, 20), dtype=np.int16)
    flat = labels.reshape(-1)
    flat[:50], flat[50:130], flat[130:230], flat[300:320] = 1, 2, 3, 7  # 50, 80, 100, 20 px; the rest unlabelled
    return labels


def test_sample_support_draws_exactly_k_per_class_disjoint_from_test_and_by_seed():
    labels = _labels()
    labels[labels == 7] = 0
    flat = labels.reshape(-1)
    train, test = sample_support(labels, 5, seed=0)
    assert [int((flat[train] == c).sum()) for c in (1, 2, 3)] == [5, 5, 5]
    assert not set(train) & set(test)
    assert sorted(set(train) | set(test)) == list(np.flatnonzero(flat > 0))
    again, _ = sample_support(labels, 5, seed=0)
    other, _ = sample_support(labels, 5, seed=1)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


def test_sample_support_takes_half_of_a_small_class_and_says_so():
    labels = _labels()
    flat = labels.reshape(-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, test = sample_support(labels, 30, seed=0)
    assert sorted(str(w.message).split(":")[0] for w in caught) == ["class 1 has 50 labelled pixels",
                                                                   "class 7 has 20 labelled pixels"]
    assert any("10 of them (not K = 30)" in str(w.message) for w in caught)
    assert int((flat[train] == 7).sum()) == 10 and int((flat[test] == 7).sum()) == 10
    assert [int((flat[train] == c).sum()) for c in (1, 2, 3)] == [25, 30, 30]  # 50 px < 2K: half of them too


# --------------------------------------------------------------------------------------------------- scores


def test_classification_scores_by_hand():
    y_true = np.array([1, 1, 1, 2, 2, 3])
    y_pred = np.array([1, 1, 2, 2, 3, 3])
    scores = classification_scores(y_true, y_pred, classes=[1, 2, 3, 4])  # class 4 has no test pixel
    assert scores["oa"] == pytest.approx(4 / 6)
    assert scores["aa"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # p_o = 4/6; p_e = (3*2 + 2*2 + 1*2) / 36 = 1/3; kappa = (2/3 - 1/3) / (1 - 1/3) = 1/2
    assert scores["kappa"] == pytest.approx(0.5)
    np.testing.assert_array_equal(scores["confusion"], [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert classification_scores(y_true, y_true, [1, 2, 3])["kappa"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------- probes


@pytest.mark.parametrize("probe", ["linear", "knn"])
def test_probes_separate_separable_classes_and_fall_to_chance_on_shuffled_labels(probe):
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(5, 16))
    y = np.repeat(np.arange(1, 6), 200)
    x = centres[y - 1] + rng.normal(size=(y.size, 16))
    train = np.concatenate([np.flatnonzero(y == c)[:10] for c in range(1, 6)])
    test = np.setdiff1d(np.arange(y.size), train)
    fitted = fit_probe(probe, x[train], y[train], knn_k=5)
    assert classification_scores(y[test], fitted.predict(x[test]), list(range(1, 6)))["oa"] > 0.95
    shuffled = rng.permutation(y)
    fitted = fit_probe(probe, x[train], shuffled[train], knn_k=5)
    assert classification_scores(shuffled[test], fitted.predict(x[test]), list(range(1, 6)))["oa"] < 0.35


def test_knn_probe_uses_fewer_neighbours_than_a_class_has_shots():
    x = np.array([[0.0], [0.1], [5.0], [5.1], [5.2], [5.3], [5.4]])
    y = np.array([1, 1, 2, 2, 2, 2, 2])
    fitted = fit_probe("knn", x, y, knn_k=5)  # 5 neighbours would let class 2 outvote class 1 everywhere
    assert fitted[-1].n_neighbors == 2
    assert list(fitted.predict([[0.05], [5.2]])) == [1, 2]


# ------------------------------------------------------------------------------------------------------ run


def _assert_png(path) -> None:
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC


def test_run_probe_on_indian_pines_writes_the_summary_figures_and_table(micro_export, tmp_path):
    config = ProbeConfig(backbone=str(micro_export), seeds=2, shots=[5], output_dir=str(tmp_path / "probe"))
    config.data.scene = str(shared_file(INDIAN_PINES))
    summary = run_probe(config)

    on_disk = json.loads((tmp_path / "probe" / "summary.json").read_text())
    assert on_disk["results_by_probe"] == json.loads(json.dumps(summary["results_by_probe"]))
    assert on_disk["primary_probe"] == "linear"
    assert on_disk["results"] == {s: by_probe["linear"] for s, by_probe in on_disk["results_by_probe"].items()}
    assert {"scene", "backbone", "results", "config", "normalisation"} <= set(on_disk)
    assert on_disk["normalisation"].endswith("band set indian_pines")  # the export's statistics, not the scene's
    assert set(on_disk["results"]) == {"backbone", "random", "spectra"}
    assert set(on_disk["results"]["backbone"]["5"]) >= {"oa_mean", "oa_std", "aa_mean", "aa_std", "kappa_mean",
                                                        "kappa_std"}
    for source, by_probe in on_disk["results_by_probe"].items():
        assert set(by_probe) == {"linear", "knn"}
        for probe, by_k in by_probe.items():
            entry = by_k["5"]
            assert {"oa_mean", "oa_std", "aa_mean", "aa_std", "kappa_mean", "kappa_std", "oa_per_seed"} <= set(entry)
            assert len(entry["oa_per_seed"]) == 2 and all(0.0 <= v <= 1.0 for v in entry["oa_per_seed"])
            assert 0.0 <= entry["oa_mean"] <= 1.0 and entry["oa_std"] >= 0.0
    assert on_disk["results"]["spectra"]["5"]["oa_mean"] > 3 / 16  # chance is 1/16
    assert on_disk["support_seed0"]["5"] == [5] * 16
    for figure in ("confusion", "classification_map"):
        _assert_png(on_disk["figures"][figure])

    table = format_probe_table(on_disk)
    for column in ("backbone", "random init", "raw spectra"):
        assert column in table
    assert table.count("K=5: the backbone") == 2  # one verdict line per probe and K


def _salinas_reader_options() -> dict:
    """Salinas-A ships without wavelengths: the reader's AVIRIS preset gives the 204 corrected band centres."""
    return {"sensor_preset": "aviris", "bands": "corrected"}


def test_run_probe_on_salinas_a_normalises_a_new_band_set_with_its_own_statistics(micro_export, tmp_path):
    config = ProbeConfig(backbone=str(micro_export), seeds=2, shots=[5], probes=["knn"], with_spectrum=True,
                         output_dir=str(tmp_path / "probe"))
    config.data.scene = str(shared_file(SALINAS_A))
    config.data.reader = _salinas_reader_options()
    with pytest.warns(UserWarning, match="not trained on this band set"):
        summary = run_probe(config)
    assert "own" in summary["normalisation"]
    assert summary["shape"] == [83, 86, 204] and summary["classes"] == [1, 10, 11, 12, 13, 14]
    assert summary["feature_dims"] == {"backbone": 64 + 204, "random": 64 + 204, "spectra": 204}
    assert all(0.0 <= summary["results_by_probe"][s]["knn"]["5"]["oa_mean"] <= 1.0 for s in ("backbone", "random", "spectra"))
    assert summary["results_by_probe"]["spectra"]["knn"]["5"]["oa_mean"] > 0.5  # 6 classes: chance ~ 1/6


def test_run_probe_with_a_random_backbone_and_the_official_split(micro_export, tmp_path):
    scene = read_scene(shared_file(INDIAN_PINES))
    split_path = shared_file("classification/label_maps/Indian_pines_disjoint_train.mat")
    train, test = split_support(scene.labels, read_split(split_path, scene.labels.shape))
    assert train.size == 5538 and train.size + test.size == int((scene.labels > 0).sum())  # 151 split px unlabelled

    config = ProbeConfig(backbone="random", random_like=str(micro_export), probes=["knn"], split=str(split_path),
                         output_dir=str(tmp_path / "probe"))
    config.data.scene = str(shared_file(INDIAN_PINES))
    summary = run_probe(config)
    assert set(summary["results"]) == {"backbone", "spectra"}  # the backbone is itself the random init
    assert list(summary["results_by_probe"]["backbone"]["knn"]) == ["split"]
    assert summary["normalisation"].endswith("band set indian_pines")  # fed as the export it is like
    assert "official split" in format_probe_table(summary)


def test_probe_config_names_a_mistyped_key():
    with pytest.raises(ConfigError, match=r"probe config: .*'shotz'"):
        load_probe_config(["data.scene=scene.npz", "shotz=5"])
    config = load_probe_config(["data.scene=scene.npz", "shots=[5,10]", "data.reader.bands=corrected",
                                "data.reader.sensor_preset=aviris"])
    assert config.shots == [5, 10] and config.seeds == 10  # the dataclass default: probe.yaml holds deviations only
    assert config.data.reader == {"bands": "corrected", "sensor_preset": "aviris"}
    with pytest.raises(ConfigError, match="data.scene"):
        load_probe_config([])
    with pytest.raises(ConfigError, match="probes must be"):
        load_probe_config(["data.scene=x.npz", "probes=[svm]"])


def test_a_loaded_export_probes_the_same_as_the_model_it_came_from(micro_export):
    cube, wavelengths = _cube(32, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_pretrained(micro_export)
    np.testing.assert_allclose(pixel_features(loaded, cube, wavelengths), pixel_features(_micro(), cube, wavelengths),
                               atol=1e-6)


@pytest.mark.parametrize("name,width,depth", [("tiny", 128, 4), ("small", 384, 12), ("large", 1024, 24)])
def test_random_model_presets_resolve_the_presets_they_build_on(name, width, depth):
    from hsfm_train.stages.probe import preset_model_config

    config = preset_model_config(name)  # small/base/large/huge list `defaults: [tiny, _self_]`
    assert (config.name, config.embed_dim, config.depth) == (name, width, depth)
