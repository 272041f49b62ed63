"""The unmixing evaluation (SAD with Hungarian matching, abundance and reconstruction RMSE, over runs) on
hand-built cases, and the classical baselines (VCA / N-FINDR + FCLS, NMF with sum-to-one) on noiseless mixtures of
real USGS spectra and on Samson; the endmembers that labelled pixels imply (plain and with per-pixel brightness)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from hsfm_train.errors import ConfigError
from hsfm_train.metrics import match_endmembers, spectral_angle_matrix, summarise_runs, unmixing_scores
from hsfm_train.spectra import anchored_als, fcls, labelled_endmembers, library_endmembers, nfindr, nmf_unmix, vca
from tests.conftest import shared_file


def noiseless_scene(count: int = 4, pixels: int = 2000, seed: int = 0):
    """Linear mixtures of real library spectra with Dirichlet abundances, the pure pixels included."""
    spectra, _ = library_endmembers(count, 400.0, 2500.0)
    rng = np.random.default_rng(seed)
    abundances = rng.dirichlet(np.full(count, 0.5), size=pixels)
    abundances[:count] = np.eye(count)
    return abundances @ spectra, spectra, abundances


def test_identical_endmembers_score_zero():
    _, spectra, abundances = noiseless_scene()
    pixels = abundances @ spectra
    scores = unmixing_scores(spectra, abundances, pixels, spectra, abundances)
    assert scores["sad_mean"] == pytest.approx(0.0, abs=1e-6)
    assert scores["abundance_rmse"] == pytest.approx(0.0, abs=1e-12)
    assert scores["reconstruction_rmse"] == pytest.approx(0.0, abs=1e-12)


def test_a_permuted_and_scaled_estimate_is_matched_back_exactly():
    _, spectra, abundances = noiseless_scene()
    permutation = np.array([2, 0, 3, 1])
    estimated = spectra[permutation] * np.array([[0.5], [3.0], [1.0], [7.0]])  # SAD ignores the scale
    scores = unmixing_scores(estimated, abundances[:, permutation], abundances @ spectra, spectra, abundances)
    assert [permutation[i] for i in scores["order"]] == [0, 1, 2, 3]
    assert scores["sad_per_endmember"] == pytest.approx([0.0] * 4, abs=1e-6)
    assert scores["abundance_rmse"] == pytest.approx(0.0, abs=1e-12)


def test_the_scaled_reconstruction_forgives_per_pixel_brightness_only():
    _, spectra, abundances = noiseless_scene(pixels=200)
    brightness = np.random.default_rng(0).uniform(0.3, 2.0, (len(abundances), 1))
    pixels = brightness * (abundances @ spectra)
    scores = unmixing_scores(spectra, abundances, pixels)
    assert scores["reconstruction_rmse"] > 0.05 and scores["reconstruction_rmse_scaled"] == pytest.approx(0, abs=1e-9)
    # a wrong spectral shape is not forgiven: one endmember replaced by another's
    wrong = unmixing_scores(spectra[[0, 0, 2, 3]], abundances, pixels)
    assert wrong["reconstruction_rmse_scaled"] > 0.01


def unit(degrees: list[float]) -> np.ndarray:
    return np.array([[math.cos(a), math.sin(a)] for a in np.radians(degrees)])


def test_angles_by_hand_and_the_matching_is_optimal_not_greedy():
    assert spectral_angle_matrix(unit([0, 45]), unit([0, 45])) == pytest.approx(
        np.radians([[0, 45], [45, 0]]), abs=1e-7)
    assert spectral_angle_matrix(np.zeros((1, 2)), unit([0, 45])) == pytest.approx(np.full((1, 2), math.pi / 2))
    # truth at 0 and 20 deg, estimates at 5 and -30 deg: greedy gives truth 0 its closest estimate (5 deg away)
    # and leaves truth 1 the other (50 deg): 55 in all; the optimum is 30 + 15 = 45
    truth, estimated = unit([0, 20]), unit([5, -30])
    order = match_endmembers(estimated, truth)
    assert order.tolist() == [1, 0]
    assert np.degrees(spectral_angle_matrix(estimated[order], truth).trace()) == pytest.approx(45.0)
    with pytest.raises(ValueError, match="3 estimated endmembers for 2"):
        match_endmembers(np.ones((3, 2)), truth)


def test_runs_are_summarised_as_mean_and_population_std():
    runs = [{"sad_mean": 0.1, "sad_per_endmember": [0.1, 0.1], "abundance_rmse": 0.2},
            {"sad_mean": 0.3, "sad_per_endmember": [0.2, 0.4], "abundance_rmse": 0.4}]
    summary = summarise_runs(runs)
    assert summary["runs"] == 2
    assert summary["sad_mean"] == pytest.approx(0.2) and summary["sad_std"] == pytest.approx(0.1)
    assert summary["abundance_rmse_mean"] == pytest.approx(0.3) and summary["abundance_rmse_std"] == pytest.approx(0.1)
    assert summary["sad_per_endmember"] == pytest.approx([0.15, 0.25])


@pytest.mark.parametrize("extract", [vca, nfindr], ids=["vca", "nfindr"])
def test_extraction_and_fcls_recover_noiseless_library_mixtures(extract):
    pixels, spectra, abundances = noiseless_scene()
    endmembers = extract(pixels, 4, seed=3)
    estimated = fcls(pixels, endmembers)
    assert estimated.min() >= 0.0
    assert np.abs(estimated.sum(axis=1) - 1.0).max() < 1e-5
    scores = unmixing_scores(endmembers, estimated, pixels, spectra, abundances)
    assert scores["sad_mean"] < 0.01
    assert scores["abundance_rmse"] < 0.01


def test_nmf_keeps_the_constraints_and_fits_the_pixels_better_than_its_start():
    pixels, spectra, abundances = noiseless_scene(pixels=500)
    start = nfindr(pixels, 4, seed=0) * np.float32(0.8)  # a perturbed start
    start_fit = unmixing_scores(start, fcls(pixels, start), pixels)["reconstruction_rmse"]
    endmembers, estimated = nmf_unmix(pixels, 4, seed=0, iterations=300, initial_endmembers=start)
    assert endmembers.min() >= 0.0 and estimated.min() >= 0.0
    assert np.abs(estimated.sum(axis=1) - 1.0).max() < 1e-5
    assert unmixing_scores(endmembers, estimated, pixels)["reconstruction_rmse"] < start_fit


def test_vca_fcls_on_samson_is_near_the_published_vca_figure():
    """Published VCA on Samson: mean SAD 0.0925 rad (CNNAEU paper's table); ours over 5 seeds."""
    scene = np.load(shared_file("unmixing/samson/samson.npz"))
    pixels = scene["cube"].reshape(-1, scene["cube"].shape[-1])
    runs = [unmixing_scores(e, None, pixels, scene["endmembers"]) for e in (vca(pixels, 3, seed=s) for s in range(5))]
    summary = summarise_runs(runs)
    assert 0.05 < summary["sad_mean"] < 0.12, summary


def test_labelled_pixels_recover_the_endmembers_of_noiseless_mixtures():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.05, 0.9, (4, 30))
    abundances = rng.dirichlet(np.ones(4), 10)
    recovered = labelled_endmembers(abundances @ truth, abundances)
    np.testing.assert_allclose(recovered, truth, atol=1e-5)


def test_too_few_or_degenerate_labelled_pixels_are_refused():
    rng = np.random.default_rng(0)
    abundances = rng.dirichlet(np.ones(3), 2)
    with pytest.raises(ConfigError, match="2 labelled pixels cannot determine 3 endmembers"):
        labelled_endmembers(rng.random((2, 5)), abundances)
    pure = np.tile([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], (3, 1))  # nothing of the third material
    with pytest.raises(ConfigError, match="span only 2 of 3"):
        labelled_endmembers(rng.random((6, 5)), pure)


def test_labelled_pixels_that_barely_contain_a_material_are_named_as_ill_conditioned():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.05, 0.9, (3, 20))
    trace = np.tile([[0.7, 0.3, 0.0], [0.2, 0.8, 0.0], [0.5, 0.5, 0.0]], (2, 1))
    trace[:, 2] = [1e-5, 0, 2e-5, 0, 0, 1e-5]  # material 2 at 2e-5 at most
    trace /= trace.sum(axis=1, keepdims=True)
    with pytest.warns(UserWarning, match=r"ill-conditioned .* material 2 makes up at most 2e-05"):
        labelled_endmembers(trace @ truth, trace)
    well = rng.dirichlet(np.ones(3), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-spread draw says nothing
        labelled_endmembers(well @ truth, well)


def test_the_scaled_labelled_fit_recovers_endmember_shapes_under_varying_brightness():
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.05, 0.9, (3, 20))
    abundances = rng.dirichlet(np.ones(3), 12)
    brightness = rng.uniform(0.3, 1.5, 12)
    pixels = brightness[:, None] * (abundances @ truth)
    scaled = labelled_endmembers(pixels, abundances, scaled=True)
    plain = labelled_endmembers(pixels, abundances)

    def worst_angle(estimate):
        cosine = np.sum(estimate * truth, 1) / np.linalg.norm(estimate, axis=1) / np.linalg.norm(truth, axis=1)
        return np.arccos(np.clip(cosine, -1, 1)).max()
    assert worst_angle(scaled) < 1e-3 and worst_angle(plain) > 0.01  # float32 rounding: ~1e-4 rad
    # on mixtures of constant brightness the scaled fit is the plain one
    np.testing.assert_allclose(labelled_endmembers(abundances @ truth, abundances, scaled=True), truth,
                               atol=1e-5)


def test_anchored_als_refines_the_labelled_start_under_noise_and_brightness():
    """Mixtures of library spectra, each pixel with its own brightness, plus noise: ten labelled pixels give a rough
    start; the anchored alternating least squares on all pixels lands much closer to the truth, keeps the
    abundances on the simplex, and agrees with the labelled pixels' abundances."""
    clean, spectra, abundances = noiseless_scene(count=3, pixels=1500, seed=2)
    rng = np.random.default_rng(0)
    brightness = rng.uniform(0.5, 1.5, (len(clean), 1))
    pixels = brightness * clean
    pixels = (pixels + rng.normal(0, 0.02 * pixels.mean(), pixels.shape)).astype(np.float32)
    chosen = np.sort(rng.choice(len(pixels), 10, replace=False))
    start = labelled_endmembers(pixels[chosen], abundances[chosen], scaled=True)
    endmembers, estimated = anchored_als(pixels, 3, chosen, abundances[chosen], iterations=60)
    assert estimated.min() >= 0 and np.abs(estimated.sum(1) - 1).max() < 1e-5
    start_sad = unmixing_scores(start, fcls(pixels, start), pixels, spectra, abundances)["sad_mean"]
    scores = unmixing_scores(endmembers, estimated, pixels, spectra, abundances)
    assert scores["sad_mean"] < 0.5 * start_sad and scores["sad_mean"] < 0.02, (start_sad, scores)
    assert scores["abundance_rmse"] < 0.05
    with pytest.raises(ConfigError, match="not R = 4"):
        anchored_als(pixels, 4, chosen, abundances[chosen])
