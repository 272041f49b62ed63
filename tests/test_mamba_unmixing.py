"""mamba-semi: the Mamba-1 block (causal), the 2-D four-direction scan, the dual-branch network's outputs
(abundances on the simplex, E >= 0), the constrained least-squares start of E, the loss (the supervised term sees
the labelled pixels only), seeding, a short training on a Samson crop, and the blind (K = 0) start."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hsfm_train.errors import ConfigError
from hsfm_train.models.mamba import DualBranchUnmixer, MambaBlock, SpatialMamba2D
from hsfm_train.spectra import vca
from hsfm_train.stages.unmix import UnmixConfig
from hsfm_train.unmixing import METHODS, LabelledPixels, UnmixingInput
from hsfm_train.unmixing.mamba_semi import MambaSemiConfig, MambaUnmixing, brightness_factors, fit, unmixing_loss
from tests.conftest import shared_file

TINY = {"features": 8, "d_state": 4, "pooled_size": 4}


def config(**mamba) -> UnmixConfig:
    return UnmixConfig(method="mamba-semi", device="cpu", mamba=MambaSemiConfig(**{**TINY, **mamba}))


@pytest.fixture(scope="module")
def samson():
    with np.load(shared_file("unmixing/samson/samson.npz")) as scene:
        return {key: scene[key] for key in ("cube", "endmembers", "abundances")}


def crop_input(samson, size: int = 16, labelled: int = 10, seed: int = 0) -> UnmixingInput:
    cube = samson["cube"][:size, :size]
    truth = samson["abundances"][:size, :size].reshape(size * size, -1)
    given = None
    if labelled:  # the purest pixel of each material, so that the labels determine E, then random ones
        purest = np.unique(truth.argmax(0))
        rest = np.random.default_rng(seed).choice(np.setdiff1d(np.arange(size * size), purest),
                                                  labelled - len(purest), replace=False)
        indices = np.sort(np.concatenate([purest, rest]))
        given = LabelledPixels(indices, truth[indices])
    return UnmixingInput(cube.reshape(size * size, -1).astype(np.float32), (size, size), 3, None, given)


def test_the_mamba_block_is_causal_along_the_sequence():
    torch.manual_seed(0)
    block = MambaBlock(8, d_state=4)
    sequence = torch.randn(2, 20, 8)
    changed = sequence.clone()
    changed[:, 12] += torch.randn(2, 8)
    with torch.no_grad():
        before, after = block(sequence), block(changed)
    assert torch.equal(before[:, :12], after[:, :12])
    assert (before[:, 12:] - after[:, 12:]).abs().amax(dim=(0, 2)).min() > 0  # and every later output moves


def test_the_2d_scan_reaches_tokens_on_every_side():
    torch.manual_seed(0)
    size = 5
    branch = SpatialMamba2D(8, d_state=4)
    tokens = torch.randn(1, size * size, 8, requires_grad=True)
    centre = 2 * size + 2
    branch(tokens, size)[0, centre].sum().backward()
    reach = tokens.grad[0].abs().sum(-1).view(size, size)
    for row, column in ((0, 2), (4, 2), (2, 0), (2, 4), (0, 0), (4, 4), (0, 4), (4, 0)):
        assert reach[row, column] > 0, (row, column)  # above, below, left, right and the corners
    # one forward row-major scan alone would not see the token after the centre
    lone = MambaBlock(8, d_state=4)
    tokens.grad = None
    lone(tokens)[0, centre].sum().backward()
    assert tokens.grad[0, centre + 1].abs().sum() == 0


def test_the_four_scan_orders_are_row_and_column_major_both_ways():
    orders = SpatialMamba2D.orders(3, torch.device("cpu"))
    assert orders.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1, 0],
                               [0, 3, 6, 1, 4, 7, 2, 5, 8], [8, 5, 2, 7, 4, 1, 6, 3, 0]]


def test_abundances_are_on_the_simplex_and_the_endmembers_stay_non_negative(samson):
    inputs = crop_input(samson)
    # a large endmember step makes the clamp matter
    endmembers, abundances = fit(inputs, 0, config(epochs=4, endmember_lr=0.5))
    assert endmembers.shape == (3, 156) and endmembers.dtype == np.float32 and endmembers.min() >= 0
    assert (endmembers == 0).any()
    assert abundances.shape == (256, 3) and abundances.dtype == np.float32 and abundances.min() >= 0
    np.testing.assert_allclose(abundances.sum(1), 1.0, atol=1e-5)


def test_the_network_maps_any_image_size_to_per_pixel_abundances():
    torch.manual_seed(0)
    model = DualBranchUnmixer(12, 4, features=8, pooled_size=4, d_state=4)
    for height, width in ((9, 13), (3, 2)):
        abundances = model(torch.rand(1, 12, height, width))
        assert abundances.shape == (height * width, 4)
        assert model.reconstruct(abundances).shape == (height * width, 12)


def test_the_same_seed_gives_the_same_result(samson):
    inputs = crop_input(samson, size=16)
    first = fit(inputs, 3, config(epochs=3))
    again = fit(inputs, 3, config(epochs=3))
    other = fit(inputs, 4, config(epochs=3))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])


def test_the_supervised_term_sees_only_the_labelled_pixels():
    torch.manual_seed(0)
    abundances = torch.softmax(torch.randn(50, 3), 1).requires_grad_(True)
    target = torch.rand(50, 8)
    reconstruction = torch.rand(50, 8)
    indices = torch.tensor([3, 17, 40])
    labelled = (indices, torch.softmax(torch.randn(3, 3), 1))
    terms = unmixing_loss(abundances, reconstruction, target, labelled, MambaSemiConfig())
    terms["supervised"].backward()
    touched = abundances.grad.abs().sum(1).nonzero().flatten()
    assert touched.tolist() == indices.tolist()
    expected = (abundances[indices] - labelled[1]).abs().sum(1).mean()
    assert torch.allclose(terms["supervised"], expected)
    blind = unmixing_loss(abundances, reconstruction, target, None, MambaSemiConfig())
    assert "supervised" not in blind
    assert torch.allclose(terms["total"] - blind["total"], terms["supervised"])


def test_a_short_training_on_a_samson_crop_lowers_the_loss(samson):
    run = MambaUnmixing(crop_input(samson, size=20), 0, MambaSemiConfig(**TINY), torch.device("cpu"))
    losses = [run.step()["total"] for _ in range(25)]
    assert losses[-1] < 0.7 * losses[0]
    assert {"reconstruction", "supervised", "sparsity", "total"} <= set(run.step())


def test_the_blind_baseline_starts_from_vca_without_labelled_pixels(samson):
    inputs = crop_input(samson, labelled=0)
    assert inputs.labelled is None
    endmembers, abundances = fit(inputs, 1, config(labelled=0, epochs=2, endmember_lr=0.0))
    np.testing.assert_allclose(endmembers, vca(inputs.pixels, 3, seed=1), rtol=1e-6)
    assert np.isfinite(abundances).all()


def test_mamba_semi_is_registered_with_its_labelled_pixel_count():
    method = METHODS["mamba-semi"]
    assert method.labelled_pixels(config(labelled=7)) == 7 and method.labelled_pixels(config(labelled=0)) == 0
    with pytest.raises(ConfigError, match="mamba.labelled must be >= 0"):
        UnmixConfig(method="mamba-semi", mamba=MambaSemiConfig(labelled=-1))


def test_each_pixel_gets_its_least_squares_brightness():
    mixtures = torch.rand(6, 10) + 0.1
    factors = torch.tensor([0.2, 0.5, 1.0, 1.7, 3.0, 0.0])
    np.testing.assert_allclose(brightness_factors(mixtures, factors[:, None] * mixtures), factors, rtol=1e-5, atol=1e-6)
    assert brightness_factors(mixtures, -mixtures).eq(0).all()  # never negative


def test_the_als_start_is_the_labelled_als_baselines_result(samson):
    from hsfm_train.spectra import anchored_als

    inputs = crop_input(samson)
    endmembers, _ = fit(inputs, 0, config(epochs=1, endmember_lr=0.0, start="als"))
    expected, _ = anchored_als(inputs.pixels, 3, inputs.labelled.indices, inputs.labelled.abundances)
    np.testing.assert_allclose(endmembers, expected, rtol=1e-5, atol=1e-6)
    plain, _ = fit(inputs, 0, config(epochs=1, endmember_lr=0.0))
    assert np.abs(plain - expected).max() > 1e-3
    with pytest.raises(ConfigError, match="mamba.start must be labelled or als"):
        config(start="vca")
