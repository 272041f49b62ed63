"""Reconstruction metrics against hand-computed values and an independent SSIM implementation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from hsfm_train.metrics import (ReconstructionMeter, masked_psnr, masked_spectral_angle_deg,
                                reconstruction_metrics, spectral_angle, ssim)


def _unit_range_target(n=2, b=3, h=8, w=8, seed=0) -> torch.Tensor:
    """Uniform [0, 1) images whose every band has min 0 and max 1 exactly (range R = 1)."""
    target = torch.rand(n, b, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    target[..., 0, 0], target[..., 0, 1] = 0.0, 1.0
    return target


def _random_mask(n=2, h=8, w=8, seed=1) -> torch.Tensor:
    mask = torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[:, 1, 1] = True
    return mask


def test_psnr_of_constant_error_is_exact():
    target, mask = _unit_range_target(), _random_mask()
    assert masked_psnr(target + 0.1, target, mask) == pytest.approx(20.0, abs=1e-9)
    assert masked_psnr(target - 0.1, target, mask, data_range=2.0) == pytest.approx(20 * math.log10(20), abs=1e-9)


def test_psnr_uses_each_bands_own_range_and_only_masked_pixels():
    target, mask = _unit_range_target(n=1, b=2), _random_mask(n=1)
    target[:, 1] *= 2  # band 1 has range 2
    pred = torch.where(mask.unsqueeze(1), target + 0.1, target + 5.0)  # visible pixels are way off
    expected = (20.0 + 20 * math.log10(20)) / 2
    assert masked_psnr(pred, target, mask) == pytest.approx(expected, abs=1e-9)


def test_psnr_skips_images_without_masked_pixels():
    target, mask = _unit_range_target(), _random_mask()
    mask[1] = False
    pred = target + 0.1
    pred[1] += 3.0
    assert masked_psnr(pred, target, mask) == pytest.approx(20.0, abs=1e-9)
    assert math.isnan(masked_psnr(pred, target, torch.zeros_like(mask)))


def test_spectral_angle_hand_values():
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    b = torch.tensor([[0.0, 5.0, 0.0], [1.0, 2.0, 3.0], [2.5, 5.0, 7.5]])
    angles = spectral_angle(a, b, dim=1)
    assert angles.dtype == torch.float64
    assert angles.tolist() == pytest.approx([math.pi / 2, 0.0, 0.0], abs=1e-7)


def test_masked_spectral_angle_in_degrees_over_masked_pixels():
    target = torch.zeros(1, 2, 2, 2)
    target[:, 0] = 1.0  # every spectrum is (1, 0)
    pred = target.clone()
    pred[0, :, 0, 0] = torch.tensor([0.0, 3.0])  # orthogonal: 90 degrees
    pred[0, :, 0, 1] = torch.tensor([4.0, 0.0])  # scaled copy: 0 degrees
    pred[0, :, 1, 1] = torch.tensor([0.0, 1.0])  # orthogonal but visible: ignored
    mask = torch.tensor([[[True, True], [False, False]]])
    assert masked_spectral_angle_deg(pred, target, mask) == pytest.approx(45.0, abs=1e-9)
    assert masked_spectral_angle_deg(target, target, mask) == pytest.approx(0.0, abs=1e-9)


def test_ssim_identical_is_one_and_negative_is_below_zero():
    target = _unit_range_target(h=24, w=20)
    assert ssim(target, target) == pytest.approx(1.0, abs=1e-12)
    flat = target.flatten(2)
    negative = (flat.amax(-1) + flat.amin(-1))[..., None, None] - target  # photographic negative, same range
    assert ssim(negative, target) < 0


def _reference_ssim(pred: np.ndarray, target: np.ndarray, window: int, data_range=None) -> float:
    """Straightforward per-band SSIM: scipy Gaussian filter, then keep only windows inside the image."""
    pad = window // 2
    values = []
    for x_img, y_img in zip(pred, target):
        for x, y in zip(x_img, y_img):
            r = data_range if data_range is not None else max(y.max() - y.min(), 1e-6)
            c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2

            def blur(a):
                return gaussian_filter(a, sigma=1.5, truncate=pad / 1.5)[pad:a.shape[0] - pad, pad:a.shape[1] - pad]

            mx, my = blur(x), blur(y)
            vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
            s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
            values.append(s.mean())
    return float(np.mean(values))


@pytest.mark.parametrize("shape,window,data_range", [((2, 3, 20, 24), 11, None), ((1, 2, 7, 9), 7, None),
                                                     ((1, 2, 16, 16), 11, 3.0)])
def test_ssim_matches_reference_implementation(shape, window, data_range):
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(shape, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.2, 3.0][:shape[1]]).view(
        1, -1, 1, 1)
    pred = target + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    expected = _reference_ssim(pred.numpy(), target.numpy(), window, data_range)
    assert ssim(pred, target, data_range=data_range) == pytest.approx(expected, abs=1e-10)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    gen = torch.Generator().manual_seed(4)
    target = torch.rand(1, 2, 32, 30, generator=gen, dtype=torch.float64)
    pred = target + 0.1 * torch.randn(target.shape, generator=gen, dtype=torch.float64)
    expected = np.mean([
        metrics.structural_similarity(pred[0, b].numpy(), target[0, b].numpy(), gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False,
                                      data_range=float(target[0, b].max() - target[0, b].min()))
        for b in range(2)])
    assert ssim(pred, target) == pytest.approx(expected, abs=1e-10)


def test_reconstruction_metrics_ignore_visible_pixels():
    target, mask = _unit_range_target(h=16, w=16), _random_mask(h=16, w=16)
    pred = torch.where(mask.unsqueeze(1), target, -target)  # perfect where masked, garbage where visible
    result = reconstruction_metrics(pred.float(), target.float(), mask)
    assert set(result) == {"psnr", "ssim", "sam_deg"}
    assert result["psnr"] == pytest.approx(120.0)  # the documented cap for a perfect band
    assert result["sam_deg"] == pytest.approx(0.0, abs=1e-3)
    assert result["ssim"] == pytest.approx(1.0, abs=1e-9)


def test_reconstruction_ssim_is_on_the_pasted_image():
    target, mask = _unit_range_target(h=16, w=16), _random_mask(h=16, w=16)
    pred = target + 0.2 * torch.randn(target.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pasted = torch.where(mask.unsqueeze(1), pred, target)
    assert reconstruction_metrics(pred, target, mask)["ssim"] == pytest.approx(ssim(pasted, target), abs=1e-12)


def test_meter_over_batches_equals_one_pass():
    gen = torch.Generator().manual_seed(6)
    target = torch.rand(5, 4, 16, 16, generator=gen, dtype=torch.float64)
    pred = target + 0.05 * torch.randn(target.shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 16, 16, generator=gen) < torch.tensor([0.2, 0.5, 0.8, 0.0, 0.6]).view(-1, 1, 1)
    meter = ReconstructionMeter()
    meter.update(pred[:2], target[:2], mask[:2])
    meter.update(pred[2:], target[2:], mask[2:])
    assert meter.count == 4  # the image without masked pixels is skipped
    whole = reconstruction_metrics(pred, target, mask)
    assert meter.compute() == pytest.approx(whole, abs=1e-10)
    assert whole["psnr"] == pytest.approx(masked_psnr(pred, target, mask), abs=1e-10)
    assert whole["sam_deg"] == pytest.approx(masked_spectral_angle_deg(pred, target, mask), abs=1e-10)


def test_empty_meter_is_nan():
    assert all(math.isnan(v) for v in ReconstructionMeter().compute().values())


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="mask"):
        masked_psnr(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.bool))


def test_effective_rank_counts_the_spread_directions():
    from hsfm_train.metrics import effective_rank

    rng = np.random.default_rng(0)
    assert abs(effective_rank(rng.normal(size=(2000, 1)) * np.ones((1, 8))) - 1.0) < 1e-6  # all on one line
    spread = effective_rank(rng.normal(size=(4000, 8)))
    assert 7.5 < spread <= 8.0  # isotropic: close to the dimension
    assert effective_rank(np.zeros((10, 4))) == 0.0
