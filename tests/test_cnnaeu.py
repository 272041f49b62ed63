"""CNNAEU and its contrastive variant: the network's constraints (abundances on the simplex, a non-negative
decoder), the losses against hand-computed references (NT-Xent, the blind kernel-weighted loss and its labels in
the batch's order), the augmentations, seeding, and short trainings on a Samson crop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hsfm_train.errors import ConfigError
from hsfm_train.models.unmixing_ae import CNNAEU, ProjectionHead
from hsfm_train.objectives.contrastive import kernel_contrastive, kernel_weights, nt_xent, sad_loss
from hsfm_train.stages.unmix import UnmixConfig, UnmixStage
from hsfm_train.unmixing import METHODS, UnmixingInput
from hsfm_train.unmixing.cnnaeu import (AUGMENTATIONS, CNNAEUConfig, ContrastiveConfig, PatchSampler, augment,
                                        cnnaeu_step, contrastive_terms, crop_resize, flip, gaussian_blur,
                                        image_tensor)
from tests.conftest import shared_file

TINY_NET = dict(filters=8, decoder_kernel=3)


@pytest.fixture(scope="module")
def samson():
    """A 24 x 24 crop of Samson (all three materials) as a method's input, and its ground truth."""
    scene = np.load(shared_file("unmixing/samson/samson.npz"))
    cube = scene["cube"][:24, :24].astype(np.float32)
    inputs = UnmixingInput(cube.reshape(-1, cube.shape[-1]), cube.shape[:2], 3, scene["wavelengths_nm"])
    return inputs, scene["endmembers"], scene["abundances"][:24, :24]


def tiny_config(**contrastive) -> UnmixConfig:
    return UnmixConfig(device="cpu", cnnaeu=CNNAEUConfig(epochs=2, patches=6, patch_size=12, batch_size=3,
                                                         **TINY_NET),
                       contrastive=ContrastiveConfig(epochs=2, patches=6, patch_size=12, batch_size=3,
                                                     **contrastive))


# --- the network ---

def test_abundances_lie_on_the_simplex_and_the_shapes_follow_bands_and_count():
    torch.manual_seed(0)
    model = CNNAEU(bands=20, endmembers=4, **TINY_NET)
    abundances, reconstruction = model(torch.rand(2, 20, 10, 10))
    assert abundances.shape == (2, 4, 10, 10) and reconstruction.shape == (2, 20, 10, 10)
    assert abundances.min() >= 0 and torch.allclose(abundances.sum(1), torch.ones(2, 10, 10), atol=1e-6)
    assert model.endmembers().shape == (4, 20)


def test_the_decoder_stays_non_negative_through_training_steps():
    torch.manual_seed(0)
    model = CNNAEU(bands=12, endmembers=3, **TINY_NET)
    assert model.decoder.weight.min() < 0  # N(0, 0.3) initialisation: the constraint is what removes these
    optimiser = torch.optim.RMSprop(model.parameters(), lr=0.003)
    for _ in range(3):
        cnnaeu_step(model, torch.rand(4, 12, 8, 8), optimiser)
        assert model.decoder.weight.min() >= 0
    assert model.endmembers().min() >= 0


def test_endmembers_are_the_decoder_kernel_averaged_spatially():
    model = CNNAEU(bands=5, endmembers=2, decoder_kernel=3, filters=4)
    with torch.no_grad():
        model.decoder.weight.copy_(torch.arange(5 * 2 * 9, dtype=torch.float32).reshape(5, 2, 3, 3))
    expected = torch.arange(5 * 2 * 9, dtype=torch.float32).reshape(5, 2, 9).mean(-1).t()
    assert torch.equal(model.endmembers(), expected)
    # a pure map of endmember 0 reconstructs, away from the borders, the kernel's sum: 9 x its mean
    pure = torch.zeros(1, 2, 7, 7)
    pure[:, 0] = 1.0
    assert torch.allclose(model.decoder(pure)[0, :, 3, 3], 9 * expected[0])


def test_the_projection_head_embeds_the_patch_averaged_abundances():
    head = ProjectionHead(3, [128, 64])
    maps = torch.rand(5, 3, 6, 6)
    assert head(maps).shape == (5, 64)
    assert torch.allclose(head(maps), head(maps.mean((2, 3), keepdim=True).expand(-1, -1, 2, 2)))


# --- losses ---

def test_sad_loss_is_the_mean_pixel_angle_and_ignores_scale():
    target = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 0.5]]).t().reshape(1, 3, 1, 2)  # [N, B, H, W], 2 pixels
    reconstruction = torch.tensor([[2.0, 2.0, 0.1], [0.0, 3.0, 1.0]]).t().reshape(1, 3, 1, 2)
    pixels_t, pixels_r = target[0].flatten(1).t(), reconstruction[0].flatten(1).t()
    angles = [math.acos(float(a @ b) / float(a.norm() * b.norm())) for a, b in zip(pixels_r, pixels_t)]
    assert float(sad_loss(reconstruction, target)) == pytest.approx(np.mean(angles), abs=1e-5)
    assert float(sad_loss(5 * target, target)) == pytest.approx(0.0, abs=1e-3)
    same = target.clone().requires_grad_()
    sad_loss(same, target).backward()
    assert torch.isfinite(same.grad).all()


def reference_nt_xent(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    total = 0.0
    for a in range(2 * n):
        positive = (a + n) % (2 * n)
        denominator = sum(math.exp(z[a] @ z[b] / tau) for b in range(2 * n) if b != a)
        total += -math.log(math.exp(z[a] @ z[positive] / tau) / denominator)
    return total / (2 * n)


def reference_kernel_loss(z1: np.ndarray, z2: np.ndarray, labels: np.ndarray, tau: float, sigma: float) -> float:
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    y = np.concatenate([labels, labels])
    total = 0.0
    for a in range(len(z)):
        others = [b for b in range(len(z)) if b != a]
        weights = {b: math.prod(math.exp(-(y[a, e] - y[b, e]) ** 2 / (2 * sigma ** 2)) for e in range(y.shape[1]))
                   for b in others}
        denominator = sum(math.exp(z[a] @ z[b] / tau) for b in others)
        total += -sum(weights[b] / sum(weights.values()) * math.log(math.exp(z[a] @ z[b] / tau) / denominator)
                      for b in others)
    return total / len(z)


def test_nt_xent_matches_a_hand_computed_reference():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    for tau in (0.1, 0.5):
        value = nt_xent(torch.tensor(z1), torch.tensor(z2), tau)
        assert float(value) == pytest.approx(reference_nt_xent(z1, z2, tau), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_high_for_shuffled_ones():
    z = torch.eye(6, 8) + 0.01 * torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    matched = nt_xent(z, z + 0.01, 0.1)
    shuffled = nt_xent(z, z[torch.tensor([1, 2, 3, 4, 5, 0])], 0.1)
    assert float(matched) < 0.01 and float(shuffled) > 5.0


def test_the_kernel_loss_matches_a_hand_computed_reference_and_becomes_nt_xent_as_the_bandwidth_vanishes():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    labels = rng.dirichlet(np.ones(3), size=4)
    for sigma in (0.3, 1.0):
        value = kernel_contrastive(torch.tensor(z1), torch.tensor(z2), torch.tensor(labels), 0.2, sigma)
        assert float(value) == pytest.approx(reference_kernel_loss(z1, z2, labels, 0.2, sigma), rel=1e-5)
    sharp = kernel_contrastive(torch.tensor(z1), torch.tensor(z2), torch.tensor(labels), 0.2, 1e-4)
    assert float(sharp) == pytest.approx(float(nt_xent(torch.tensor(z1), torch.tensor(z2), 0.2)), rel=1e-6)


def test_kernel_weights_follow_the_batch_order():
    labels = torch.tensor(np.random.default_rng(2).dirichlet(np.ones(3), size=5))
    permutation = torch.tensor([3, 0, 4, 1, 2])
    weights = kernel_weights(labels, 0.5)
    assert torch.allclose(kernel_weights(labels[permutation], 0.5), weights[permutation][:, permutation])
    assert torch.equal(weights.diagonal(), torch.ones(5)) and weights.max() <= 1


def test_the_blind_kernel_labels_are_the_models_own_estimates_of_the_same_samples_in_batch_order():
    torch.manual_seed(0)
    model, head = CNNAEU(10, 3, **TINY_NET).eval(), ProjectionHead(3)
    config = ContrastiveConfig(loss="kernel", kernel_bandwidth=0.1)
    generator = torch.Generator().manual_seed(1)
    spectra = 3 * torch.randn(4, 10, 1, 1, generator=generator)  # four distinct samples, two noisy views each
    view1, view2 = (spectra + 0.1 * torch.randn(4, 10, 8, 8, generator=generator) for _ in range(2))
    with torch.no_grad():
        loss, _, labels = contrastive_terms(model, head, view1, view2, config)
    own = 0.5 * (model.abundances(view1).mean((2, 3)) + model.abundances(view2).mean((2, 3)))
    assert torch.allclose(labels, own) and labels.std(0).min() > 0.05
    permutation = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        permuted_loss, _, permuted_labels = contrastive_terms(model, head, view1[permutation], view2[permutation],
                                                              config)
        # weights taken in another order than the embeddings' (the reference code's shuffled batches) differ
        z1, z2 = head(model.abundances(view1)), head(model.abundances(view2))
        mismatched = kernel_contrastive(z1, z2, labels[permutation], config.temperature, config.kernel_bandwidth)
    assert torch.allclose(permuted_labels, labels[permutation], atol=1e-6)
    assert float(permuted_loss) == pytest.approx(float(loss), rel=1e-5)
    assert abs(float(mismatched) - float(loss)) > 0.05


def test_the_contrastive_methods_are_blind():
    for name in ("cnnaeu", "cnnaeu-contrastive"):
        assert METHODS[name].labelled_pixels(UnmixConfig(method=name)) == 0


# --- augmentations ---

def test_every_augmentation_and_combination_keeps_the_shape_and_is_reproducible():
    images = torch.rand(3, 6, 12, 12)
    config = ContrastiveConfig()
    for names in [[name] for name in AUGMENTATIONS] + [["crop", "blur"], ["crop", "jitter", "blur"],
                                                       ["jitter", "flip", "blur"]]:
        first = augment(images, names, config, torch.Generator().manual_seed(5))
        again = augment(images, names, config, torch.Generator().manual_seed(5))
        assert first.shape == images.shape and torch.equal(first, again)
    generator = torch.Generator().manual_seed(0)
    view1, view2 = (augment(images, ["crop", "blur"], config, generator) for _ in range(2))
    assert not torch.allclose(view1, view2)  # two independent views


def test_flip_is_an_involution_and_flips_the_chosen_axes_only():
    images = torch.rand(4, 3, 5, 6)
    horizontal, vertical = torch.tensor([True, False, True, False]), torch.tensor([True, True, False, False])
    flipped = flip(images, horizontal, vertical)
    assert torch.equal(flip(flipped, horizontal, vertical), images)
    assert torch.equal(flipped[0], images[0].flip(-1).flip(-2)) and torch.equal(flipped[1], images[1].flip(-2))
    assert torch.equal(flipped[2], images[2].flip(-1)) and torch.equal(flipped[3], images[3])


def test_blur_and_crop_mix_pixels_convexly():
    images = torch.rand(2, 4, 10, 10)
    constant = torch.full((2, 4, 10, 10), 0.7)
    assert torch.allclose(gaussian_blur(constant, torch.tensor([0.5, 2.0]), 6), constant)
    blurred = gaussian_blur(images, torch.tensor([0.5, 1.0]), 3)
    assert blurred.min() >= images.min() - 1e-6 and blurred.max() <= images.max() + 1e-6
    assert blurred.var() < images.var()  # smoother
    full = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]])
    assert torch.allclose(crop_resize(images, full), images)
    cropped = crop_resize(images, torch.tensor([[2, 3, 5, 5], [0, 0, 7, 7]]))
    assert cropped.shape == images.shape and cropped.min() >= images.min() - 1e-6
    assert cropped.max() <= images.max() + 1e-6


def test_patches_are_the_whole_image_when_it_is_smaller_than_a_patch():
    image = torch.rand(1, 5, 9, 11)
    sampler = PatchSampler(image, 4, 40, torch.Generator().manual_seed(0))
    batches = list(sampler.epoch(3))
    assert [len(b) for b in batches] == [3, 1] and all(torch.equal(b[0], image[0]) for b in batches)
    small = PatchSampler(image, 7, 4, torch.Generator().manual_seed(0))
    assert sum(len(b) for b in small.epoch(2)) == 7 and next(small.epoch(2)).shape == (2, 5, 4, 4)


# --- configuration ---

def test_bad_settings_are_named():
    assert CNNAEUConfig().problems() == [] and ContrastiveConfig().problems() == []
    assert any("cnnaeu.epochs" in p for p in CNNAEUConfig(epochs=0).problems())
    assert any("cnnaeu.dropout" in p for p in CNNAEUConfig(dropout=1.0).problems())
    problems = ContrastiveConfig(augmentations=["rotate"], loss="triplet", batch_size=1, sad_weight=2,
                                 crop_scale=[0.5, 1.5]).problems()
    for name in ("augmentations", "loss", "batch_size", "sad_weight", "crop_scale"):
        assert any(f"contrastive.{name}" in p for p in problems), name
    with pytest.raises(ConfigError, match="contrastive.augmentations"):
        UnmixStage.load_config(["data.scene=x.npz", "contrastive.augmentations=[crop,spin]"])


# --- training ---

@pytest.mark.parametrize("method,loss", [("cnnaeu", "ntxent"), ("cnnaeu-contrastive", "ntxent"),
                                         ("cnnaeu-contrastive", "kernel")])
def test_a_seed_fixes_the_run_and_another_seed_changes_it(samson, method, loss):
    inputs, _, _ = samson
    config = tiny_config(loss=loss)
    endmembers, abundances = METHODS[method].fit(inputs, 3, config)
    again = METHODS[method].fit(inputs, 3, config)
    other = METHODS[method].fit(inputs, 4, config)
    assert endmembers.shape == (3, inputs.pixels.shape[1]) and abundances.shape == (len(inputs.pixels), 3)
    assert endmembers.dtype == np.float32 and abundances.dtype == np.float32
    assert endmembers.min() >= 0 and abundances.min() >= 0 and np.abs(abundances.sum(1) - 1).max() < 1e-5
    assert np.array_equal(endmembers, again[0]) and np.array_equal(abundances, again[1])
    assert not np.allclose(endmembers, other[0])


def test_the_input_scale_changes_the_endmembers_scale_only(samson):
    inputs, _, _ = samson
    scaled = UnmixingInput(inputs.pixels * 8, inputs.shape, inputs.count, inputs.wavelengths_nm)  # exact in fp32
    endmembers, abundances = METHODS["cnnaeu"].fit(inputs, 0, tiny_config())
    endmembers8, abundances8 = METHODS["cnnaeu"].fit(scaled, 0, tiny_config())
    assert np.array_equal(abundances8, abundances) and np.allclose(endmembers8, 8 * endmembers, rtol=1e-6)
    # the least-squares scale: the reconstruction is as bright as the pixels
    reconstruction = abundances.astype(np.float64) @ endmembers
    assert np.sum(reconstruction * inputs.pixels) == pytest.approx(np.sum(reconstruction ** 2), rel=1e-4)


def test_a_short_cnnaeu_training_on_samson_lowers_the_sad_loss(samson):
    inputs, _, _ = samson
    image = image_tensor(inputs, torch.device("cpu"))
    torch.manual_seed(0)
    model = CNNAEU(image.shape[1], 3, filters=16)

    def whole_image_sad() -> float:
        model.eval()
        with torch.no_grad():
            value = float(sad_loss(model(image)[1], image))
        model.train()
        return value

    before = whole_image_sad()
    sampler = PatchSampler(image, 16, 16, torch.Generator().manual_seed(0))
    optimiser = torch.optim.RMSprop(model.parameters(), lr=0.003, alpha=0.9, eps=1e-7)
    losses = [cnnaeu_step(model, patches, optimiser) for _ in range(8) for patches in sampler.epoch(8)]
    after = whole_image_sad()
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:2])
    assert after < 0.5 * before, (before, after)
