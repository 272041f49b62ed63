"""The pretraining objective and its terms against hand computations: the spectral-angle reference (values,
reductions, closed-form gradients, degenerate rows, low precision), the grouped spectral-angle reference against
the per-group row construction it replaces, the per-token masked reconstruction losses, the per-group spectral
angle, KARMA's LSMM physics term on an exactly mixed scene, and the weighted sum."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import grouped_angle_case
import yaml

from hsfm_train.errors import ConfigError
from hsfm_train.kernels import grouped_spectral_angle_loss, spectral_angle_loss
from hsfm_train.kernels.sam_loss import grouped_spectral_angle_reference, spectral_angle_reference
from hsfm_train.spectra import library_endmembers
from hsfm_train.models.mae import LSMMConfig, MAEOutput, ModelConfig, SpectralMAE
from hsfm_train.objectives.pretrain import ObjectiveConfig, PretrainObjective
from hsfm_train.objectives.reconstruction import masked_huber, masked_mse, normalised_target
from hsfm_train.objectives.spectral import lsmm_physics, masked_spectral_angle
from tests.conftest import REPO_ROOT

# The reference clamps the cosine to 1 - 1e-7 (finite gradients at identical rows), so parallel rows give
# arccos(fp32(1 - 1e-7)) ~ 4.9e-4 rad instead of exactly 0.
PARALLEL_FLOOR = 1e-3

# 9 real bands in two groups (VNIR: 5, SWIR: 4) and 3 padded bands (NaN wavelength, as collate pads)
REAL_NM = [420.0, 520.0, 620.0, 720.0, 880.0, 1200.0, 1550.0, 2050.0, 2300.0]
BANDS, REAL, SIZE, PATCH = 12, 9, 16, 8


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- spectral angle


def test_reference_angles_match_hand_values():
    prediction = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    target = torch.tensor([[0.0, 5.0, 0.0], [2.0, 4.0, 6.0], [1.0, 1.0, 0.0], [-3.0, -4.0, 0.0]])
    angles = spectral_angle_reference(prediction, target, reduction="none")
    assert angles.dtype == torch.float32 and angles.shape == (4,)
    assert angles[0].item() == pytest.approx(math.pi / 2, abs=1e-6)  # orthogonal
    assert 0 <= angles[1].item() < PARALLEL_FLOOR  # parallel, scaled by 2
    assert angles[2].item() == pytest.approx(math.pi / 4, abs=1e-6)
    assert angles[3].item() == pytest.approx(math.pi, abs=PARALLEL_FLOOR)  # anti-parallel
    total = angles.sum().item()
    assert spectral_angle_reference(prediction, target, reduction="sum").item() == pytest.approx(total, rel=1e-6)
    assert spectral_angle_reference(prediction, target).item() == pytest.approx(total / 4, rel=1e-6)
    # a row's angle does not depend on positive scaling of either side
    scaled = spectral_angle_reference(prediction * torch.tensor([[3.0], [0.1], [7.0], [2.0]]), target * 5,
                                      reduction="none")
    torch.testing.assert_close(scaled, angles, rtol=1e-5, atol=1e-6)


def test_reference_weights_select_and_scale_rows():
    prediction = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    # angles: pi/2, pi/4, undefined (zero row), ~0
    weight = torch.tensor([2.0, 1.0, 5.0, 0.0])
    none = spectral_angle_reference(prediction, target, weight, reduction="none")
    torch.testing.assert_close(none, torch.tensor([math.pi, math.pi / 4, 0.0, 0.0]))
    assert spectral_angle_reference(prediction, target, weight, "sum").item() == pytest.approx(1.25 * math.pi)
    # mean: divided by the weights of the rows with a defined angle (2 + 1 + 0), not by 8
    assert spectral_angle_reference(prediction, target, weight).item() == pytest.approx(1.25 * math.pi / 3)
    select = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert spectral_angle_reference(prediction, target, select).item() == pytest.approx(math.pi / 2)
    # nothing defined or selected -> 0, not NaN
    assert spectral_angle_reference(prediction, target, torch.zeros(4)).item() == 0.0
    assert spectral_angle_reference(torch.zeros(2, 3), torch.ones(2, 3)).item() == 0.0


def test_reference_rejects_bad_shapes_and_reductions():
    with pytest.raises(ValueError, match="expected two"):
        spectral_angle_reference(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="expected two"):
        spectral_angle_reference(torch.ones(2, 3, 1), torch.ones(2, 3, 1))
    with pytest.raises(ValueError, match="reduction"):
        spectral_angle_reference(torch.ones(2, 3), torch.ones(2, 3), reduction="max")


def test_reference_gradients_match_the_closed_form():
    """torch.autograd.gradcheck cannot be used: the reference computes in fp32 whatever the input dtype, so
    float64 finite differences see fp32 rounding. The autograd gradient is compared with the closed form
        d angle / d x = -(1 / sqrt(1 - c^2)) (y / (|x||y|) - c x / |x|^2)."""
    generator = _generator(0)
    x = torch.randn(6, 20, generator=generator, dtype=torch.float64)
    y = torch.randn(6, 20, generator=generator, dtype=torch.float64)
    x_norm, y_norm = x.norm(dim=1, keepdim=True), y.norm(dim=1, keepdim=True)
    cosine = (x * y).sum(dim=1, keepdim=True) / (x_norm * y_norm)
    assert cosine.abs().max() < 0.9  # generic rows, away from the clamp
    x_leaf = x.clone().requires_grad_(True)
    spectral_angle_reference(x_leaf, y, reduction="sum").backward()
    closed = -(1 / torch.sqrt(1 - cosine**2)) * (y / (x_norm * y_norm) - cosine * x / x_norm**2)
    assert x_leaf.grad.dtype == torch.float64
    torch.testing.assert_close(x_leaf.grad, closed, rtol=1e-4, atol=1e-6)
    # symmetric in its arguments, and the mean divides by the row count
    y_leaf = y.clone().requires_grad_(True)
    spectral_angle_reference(x, y_leaf).backward()
    closed_y = -(1 / torch.sqrt(1 - cosine**2)) * (x / (x_norm * y_norm) - cosine * y / y_norm**2)
    torch.testing.assert_close(y_leaf.grad, closed_y / 6, rtol=1e-4, atol=1e-6)


def test_identical_and_zero_rows_give_finite_gradients():
    target = torch.tensor([[0.2, 0.5, 0.9, 0.1], [0.3, 0.3, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0], [0.4, 0.1, 0.2, 0.8]])
    prediction = torch.tensor([[0.2, 0.5, 0.9, 0.1], [0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4],
                               [0.1, 0.9, 0.3, 0.2]], requires_grad=True)
    angles = spectral_angle_reference(prediction, target, reduction="none")
    assert angles[0].item() < PARALLEL_FLOOR and angles[1].item() == 0.0 and angles[2].item() == 0.0
    loss = spectral_angle_reference(prediction, target)
    # only row 3 is defined and not identical: the mean is over rows 0 and 3
    assert loss.item() == pytest.approx((angles[0] + angles[3]).item() / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(prediction.grad).all()
    assert (prediction.grad[:3] == 0).all()  # identical row (clamped), zero-norm prediction, zero-norm target
    assert prediction.grad[3].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_an_fp32_result(dtype):
    generator = _generator(1)
    prediction = torch.rand(64, 156, generator=generator) + 0.05
    target = torch.rand(64, 156, generator=generator) + 0.05
    expected = spectral_angle_reference(prediction, target)
    low = spectral_angle_reference(prediction.to(dtype), target.to(dtype))
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(expected.item(), rel=1e-3)
    leaf = prediction.to(dtype).requires_grad_(True)
    spectral_angle_reference(leaf, target.to(dtype)).backward()
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad.float()).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dispatcher_equals_the_reference_on_cpu(reduction):
    generator = _generator(2)
    prediction, target = torch.randn(10, 7, generator=generator), torch.randn(10, 7, generator=generator)
    prediction[3] = 0
    weight = (torch.rand(10, generator=generator) > 0.3).float()
    torch.testing.assert_close(spectral_angle_loss(prediction, target, weight, reduction),
                               spectral_angle_reference(prediction, target, weight, reduction), rtol=0, atol=0)


# ----------------------------------------------------------------------------- grouped spectral angle

CLOSE = {"rtol": 1e-5, "atol": 1e-6}  # the same sums in another order: float rounding only


def per_group_rows(prediction, target, membership, weight, reduction="mean"):
    """The construction the grouped reference replaces: per group, copies of the images with the other bands
    zeroed, as rows [N*H*W, B], concatenated over groups and scored by the row reference."""
    bands, groups = prediction.shape[1], membership.shape[2]
    predicted, true, weights = [], [], []
    for group in range(groups):
        member = membership[..., group].to(prediction.dtype)[:, :, None, None]
        predicted.append((prediction * member).permute(0, 2, 3, 1).reshape(-1, bands))
        true.append((target * member).permute(0, 2, 3, 1).reshape(-1, bands))
        weights.append(weight[:, group].flatten())
    result = spectral_angle_reference(torch.cat(predicted), torch.cat(true), torch.cat(weights), reduction)
    if reduction == "none":  # rows are group-major: back to [N, G, H, W]
        n, _, h, w = prediction.shape
        result = result.view(groups, n, h, w).transpose(0, 1)
    return result


def _values_and_grads(function, prediction, target, grad_output=None, **kwargs):
    """(value, d/d prediction, d/d target) of function(prediction, target, **kwargs)."""
    p, t = prediction.clone().requires_grad_(True), target.clone().requires_grad_(True)
    value = function(p, t, **kwargs)
    seed = torch.ones_like(value) if grad_output is None else grad_output
    grad_p, grad_t = torch.autograd.grad(value, (p, t), seed)
    return value.detach(), grad_p, grad_t


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grouped_reference_equals_the_per_group_rows(groups, reduction):
    prediction, target, membership, weight = grouped_angle_case(groups, groups)
    grad_output = None
    if reduction == "none":
        grad_output = torch.rand(weight.shape, generator=_generator(30)) + 0.5
    grouped = _values_and_grads(grouped_spectral_angle_reference, prediction, target, grad_output,
                                membership=membership, weight=weight, reduction=reduction)
    rows = _values_and_grads(per_group_rows, prediction, target, grad_output, membership=membership,
                             weight=weight, reduction=reduction)
    for mine, theirs in zip(grouped, rows):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, **CLOSE)
    if reduction == "none":
        angles = grouped[0]
        assert angles[0, 1, 1, 1] == 0 and angles[1, 0, 2, 3] == 0  # zero-norm pixels: no angle
        assert 0 <= angles[0, groups - 1, 3, 0] < 2 * PARALLEL_FLOOR  # identical (weights < 2)
        assert (angles[weight == 0] == 0).all() and (angles > 0.05).float().mean() > 0.5
    # padded bands get no gradient; zero-norm and identical pixels neither (undefined; clamped)
    for grad in grouped[1:]:
        assert (grad[:, 12:] == 0).all() and grad.abs().sum() > 0
    assert (grouped[1][0, membership[0, :, 1], 1, 1] == 0).all()
    assert (grouped[1][0, membership[0, :, groups - 1], 3, 0] == 0).all()


def test_grouped_reference_scores_each_group_over_its_own_bands():
    """Swapping the group assignment of two bands changes the result; all bands in one group is the row angle
    over all real bands; an unweighted call counts every defined (sample, group, pixel) once."""
    prediction, target, membership, weight = grouped_angle_case(0, 2)
    value = grouped_spectral_angle_reference(prediction, target, membership, weight)
    swapped = membership.clone()
    swapped[0, [0, 1]] = membership[0, [1, 0]]
    assert abs(grouped_spectral_angle_reference(prediction, target, swapped, weight).item() - value.item()) > 1e-4
    one_group = membership.any(dim=2, keepdim=True)
    rows_p = prediction[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    rows_t = target[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(grouped_spectral_angle_reference(prediction, target, one_group, reduction="none"),
                               spectral_angle_reference(rows_p, rows_t, reduction="none").view(2, 1, 4, 5), **CLOSE)
    torch.testing.assert_close(grouped_spectral_angle_reference(prediction, target, membership),
                               per_group_rows(prediction, target, membership, torch.ones_like(weight)), **CLOSE)


def test_grouped_reference_applies_the_affine_map_first():
    """scale / offset [N, B]: the angle of prediction * scale + offset against target * scale + offset, with
    the gradient through the map."""
    prediction, target, membership, weight = grouped_angle_case(4, 3)
    generator = _generator(31)
    scale, offset = 0.05 + torch.rand(2, 14, generator=generator), torch.rand(2, 14, generator=generator)
    grouped = _values_and_grads(grouped_spectral_angle_reference, prediction, target, membership=membership,
                                weight=weight, scale=scale, offset=offset)

    def mapped_rows(p, t, **kwargs):
        return per_group_rows(p * scale[:, :, None, None] + offset[:, :, None, None],
                              t * scale[:, :, None, None] + offset[:, :, None, None], **kwargs)

    rows = _values_and_grads(mapped_rows, prediction, target, membership=membership, weight=weight)
    for mine, theirs in zip(grouped, rows):
        torch.testing.assert_close(mine, theirs, **CLOSE)
    unmapped = grouped_spectral_angle_reference(prediction, target, membership, weight)
    assert abs(unmapped.item() - grouped[0].item()) > 1e-3
    # scale alone, offset alone
    torch.testing.assert_close(
        grouped_spectral_angle_reference(prediction, target, membership, weight, scale=scale),
        per_group_rows(prediction * scale[:, :, None, None], target * scale[:, :, None, None], membership, weight),
        **CLOSE)
    torch.testing.assert_close(
        grouped_spectral_angle_reference(prediction, target, membership, weight, offset=offset),
        per_group_rows(prediction + offset[:, :, None, None], target + offset[:, :, None, None], membership,
                       weight), **CLOSE)


def test_grouped_reference_degenerate_inputs_give_zero_not_nan():
    prediction, target, membership, weight = grouped_angle_case(5, 2)
    assert grouped_spectral_angle_reference(prediction, target, membership, torch.zeros_like(weight)).item() == 0
    leaf = torch.zeros_like(prediction, requires_grad=True)
    loss = grouped_spectral_angle_reference(leaf, target, membership, weight)
    loss.backward()
    assert loss.item() == 0 and (leaf.grad == 0).all()
    nobody = torch.zeros_like(membership)
    assert grouped_spectral_angle_reference(prediction, target, nobody, weight).item() == 0
    with pytest.raises(ValueError, match="membership"):
        grouped_spectral_angle_reference(prediction, target, membership.float(), weight)
    in_two_groups = membership.clone()
    in_two_groups[1, 0] = True
    with pytest.raises(ValueError, match="at most one group"):
        grouped_spectral_angle_reference(prediction, target, in_two_groups, weight)
    with pytest.raises(ValueError, match="weight"):
        grouped_spectral_angle_reference(prediction, target, membership, weight[:, :1])
    with pytest.raises(ValueError, match="scale"):
        grouped_spectral_angle_reference(prediction, target, membership, weight, scale=torch.ones(2, 13))
    with pytest.raises(ValueError, match="expected two"):
        grouped_spectral_angle_reference(prediction[0], target[0], membership, weight)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grouped_dispatcher_equals_the_grouped_reference_on_cpu(reduction):
    prediction, target, membership, weight = grouped_angle_case(6, 3)
    scale = torch.rand(2, 14, generator=_generator(32)) + 0.5
    torch.testing.assert_close(
        grouped_spectral_angle_loss(prediction, target, membership, weight, reduction, scale=scale),
        grouped_spectral_angle_reference(prediction, target, membership, weight, reduction, scale=scale),
        rtol=0, atol=0)


# ------------------------------------------------------------------------------------- model outputs


@pytest.fixture
def model() -> SpectralMAE:
    """A fresh tiny model with a 3-endmember LSMM head (cheap to build; tests may change its endmembers)."""
    torch.manual_seed(0)
    return SpectralMAE(ModelConfig(lsmm=LSMMConfig(num_endmembers=3)))


def _batch() -> dict:
    generator = _generator(10)
    hsi = torch.zeros(2, BANDS, SIZE, SIZE)
    hsi[:, :REAL] = torch.randn(2, REAL, SIZE, SIZE, generator=generator)
    wavelengths = torch.full((2, BANDS), float("nan"))
    wavelengths[:, :REAL] = torch.tensor(REAL_NM)
    band_mask = torch.zeros(2, BANDS, dtype=torch.bool)
    band_mask[:, :REAL] = True
    band_mean, band_std = torch.zeros(2, BANDS), torch.ones(2, BANDS)
    band_mean[:, :REAL] = 0.2 + 0.3 * torch.rand(2, REAL, generator=generator)
    band_std[:, :REAL] = 0.05 + 0.1 * torch.rand(2, REAL, generator=generator)
    return {"hsi": hsi, "wavelengths": wavelengths, "band_mask": band_mask, "band_mean": band_mean,
            "band_std": band_std}


def _forward(model: SpectralMAE, batch: dict, seed: int = 3) -> MAEOutput:
    return model(batch["hsi"], batch["wavelengths"], batch["band_mask"], generator=_generator(seed))


def _tokens(out: MAEOutput, band_mask: torch.Tensor):
    """(sample, slot, patch, masked, bands, rows, cols) for every token, by explicit loops."""
    rows, cols = out.grid
    p = out.patch_size
    for n in range(out.token_mask.shape[0]):
        for slot, group in enumerate(out.present.tolist()):
            bands = [b for b in range(band_mask.shape[1]) if band_mask[n, b] and out.membership[n, b, group]]
            for patch in range(rows * cols):
                r, c = divmod(patch, cols)
                yield (n, slot, patch, bool(out.token_mask[n, slot, patch]), bands,
                       slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))


def test_masked_mse_is_the_mean_over_masked_tokens_of_each_tokens_mse(model):
    batch = _batch()
    out = _forward(model, batch)
    assert out.present.tolist() == [0, 1] and out.token_mask.shape == (2, 2, 4)
    generator = _generator(11)
    prediction = torch.randn(2, BANDS, SIZE, SIZE, generator=generator)
    prediction[:, REAL:] = 1e3  # padded bands: never scored
    out.prediction = prediction
    target = batch["hsi"]
    token_errors = []
    for n, _, _, masked, bands, rows, cols in _tokens(out, batch["band_mask"]):
        if masked:
            token_errors.append(((prediction[n, bands, rows, cols] - target[n, bands, rows, cols]) ** 2).mean())
    expected = torch.stack(token_errors).mean()
    assert len(token_errors) == 12  # 75 % of 2 samples x 2 groups x 4 patches
    assert masked_mse(out, target, batch["band_mask"]).item() == pytest.approx(expected.item(), rel=1e-5)


def test_visible_tokens_do_not_contribute(model):
    batch = _batch()
    out = _forward(model, batch)
    out.prediction = batch["hsi"] + 0.1
    before = masked_mse(out, batch["hsi"], batch["band_mask"])
    assert before.item() == pytest.approx(0.01, rel=1e-4)
    changed = out.prediction.clone()
    masked_change = out.prediction.clone()
    for n, _, _, masked, bands, rows, cols in _tokens(out, batch["band_mask"]):
        if masked:
            masked_change[n, bands, rows, cols] += 5.0
        else:
            changed[n, bands, rows, cols] += 5.0
    out.prediction = changed
    assert masked_mse(out, batch["hsi"], batch["band_mask"]).item() == pytest.approx(before.item(), rel=1e-5)
    assert masked_huber(out, batch["hsi"], batch["band_mask"]).item() == pytest.approx(0.005, rel=1e-4)
    out.prediction = masked_change
    assert masked_mse(out, batch["hsi"], batch["band_mask"]).item() == pytest.approx(5.1**2, rel=1e-4)


def test_norm_pix_target_is_standardised_per_token(model):
    batch = _batch()
    batch["hsi"][:, :REAL] = 3.0 + 2.0 * batch["hsi"][:, :REAL]
    out = _forward(model, batch)
    target = normalised_target(batch["hsi"], out, batch["band_mask"])
    for n, _, _, _, bands, rows, cols in _tokens(out, batch["band_mask"]):
        elements = target[n, bands, rows, cols]
        assert elements.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert elements.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    # a prediction equal to the standardised target scores 0 (unpadded batch; padded: the next test)
    real = {key: value[:, :REAL] for key, value in batch.items()}
    out = _forward(model, real)
    target = normalised_target(real["hsi"], out, real["band_mask"])
    out.prediction = target.clone()
    assert masked_mse(out, real["hsi"], real["band_mask"], norm_pix=True).item() == pytest.approx(0.0, abs=1e-10)
    assert masked_mse(out, real["hsi"], real["band_mask"]).item() > 1.0  # norm_pix changes the target


def test_norm_pix_loss_is_finite_and_unchanged_by_padded_bands(model):
    batch = _batch()
    out = _forward(model, batch)
    padded = masked_mse(out, batch["hsi"], batch["band_mask"], norm_pix=True)
    assert torch.isfinite(padded)
    real = {key: value[:, :REAL] for key, value in batch.items()}
    out_real = _forward(model, real)
    out_real.prediction = out.prediction[:, :REAL]
    assert padded.item() == pytest.approx(
        masked_mse(out_real, real["hsi"], real["band_mask"], norm_pix=True).item(), rel=1e-5)


def test_huber_is_half_mse_for_small_errors_and_linear_for_large(model):
    batch = _batch()
    out = _forward(model, batch)
    generator = _generator(12)
    small = 0.9 * (2 * torch.rand(2, BANDS, SIZE, SIZE, generator=generator) - 1)  # |error| < delta = 1
    out.prediction = batch["hsi"] + small
    mse = masked_mse(out, batch["hsi"], batch["band_mask"])
    assert masked_huber(out, batch["hsi"], batch["band_mask"], delta=1.0).item() == pytest.approx(
        mse.item() / 2, rel=1e-5)
    sign = torch.where(torch.rand(2, BANDS, SIZE, SIZE, generator=generator) > 0.5, 1.0, -1.0)
    values = []
    for error in (3.0, 5.0, 9.0):
        out.prediction = batch["hsi"] + error * sign
        values.append(masked_huber(out, batch["hsi"], batch["band_mask"], delta=1.5).item())
    # delta * (|e| - delta / 2) beyond delta: linear with slope delta
    assert values[0] == pytest.approx(1.5 * (3.0 - 0.75), rel=1e-5)
    assert values[1] - values[0] == pytest.approx(1.5 * 2.0, rel=1e-5)
    assert values[2] - values[1] == pytest.approx(1.5 * 4.0, rel=1e-5)


def test_masked_mse_ignores_tokens_of_groups_a_sample_lacks(model):
    """batching: pad mixes band sets. Sample 0 has VNIR bands only; the batch's SWIR tokens of sample 0 have no
    elements and must not count as masked tokens with zero error."""
    batch = _batch()
    batch["band_mask"][0, 5:] = False  # sample 0: the 5 VNIR bands only
    batch["wavelengths"][0, 5:] = float("nan")
    batch["hsi"][0, 5:] = 0.0
    out = _forward(model, batch)
    assert out.present.tolist() == [0, 1]
    out.prediction = batch["hsi"] + 0.5
    errors = [(0.5 ** 2) for *_, masked, bands, _, _ in _tokens(out, batch["band_mask"]) if masked and bands]
    assert masked_mse(out, batch["hsi"], batch["band_mask"]).item() == pytest.approx(float(np.mean(errors)),
                                                                                     rel=1e-5)


# ------------------------------------------------------------------------------------ spectral angle term


def _reflectance(batch: dict) -> torch.Tensor:
    generator = _generator(13)
    return 0.05 + torch.rand(2, BANDS, SIZE, SIZE, generator=generator)


def test_masked_spectral_angle_is_scale_invariant(model):
    batch = _batch()
    out = _forward(model, batch)
    target = _reflectance(batch)
    scale = 0.2 + 3 * torch.rand(2, 1, SIZE, SIZE, generator=_generator(14))
    prediction = target * scale
    prediction[:, REAL:] = torch.randn(2, BANDS - REAL, SIZE, SIZE)  # padded bands: no influence
    assert 0 <= masked_spectral_angle(out, prediction, target, batch["band_mask"]).item() < PARALLEL_FLOOR


def test_masked_spectral_angle_is_a_known_rotation_per_group(model):
    """Each group's spectrum of every pixel is rotated by a known angle (VNIR 0.2 rad, SWIR 0.5 rad) within the
    group's bands; the loss is the mean over masked tokens' pixel-rows of both groups."""
    batch = _batch()
    out = _forward(model, batch)
    target = _reflectance(batch)
    prediction = torch.zeros_like(target)
    noise = torch.randn(2, BANDS, SIZE, SIZE, generator=_generator(15))
    angles = {0: 0.2, 1: 0.5}
    for group, bands in ((0, slice(0, 5)), (1, slice(5, REAL))):
        t = target[:, bands]
        t_unit = t / t.norm(dim=1, keepdim=True)
        u = noise[:, bands] - (noise[:, bands] * t_unit).sum(dim=1, keepdim=True) * t_unit
        u = u / u.norm(dim=1, keepdim=True)
        theta = angles[group]
        prediction[:, bands] = t.norm(dim=1, keepdim=True) * (math.cos(theta) * t_unit + math.sin(theta) * u)
        assert out.membership[:, bands, group].all()
    masked_per_group = out.token_mask.sum(dim=(0, 2)).float()  # every token has p*p pixel rows
    expected = (0.2 * masked_per_group[0] + 0.5 * masked_per_group[1]) / masked_per_group.sum()
    loss = masked_spectral_angle(out, prediction, target, batch["band_mask"])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
    # the same rotation over all 9 bands at once is a different number: the groups are scored separately
    assert abs(spectral_angle_reference(prediction[:, :REAL].permute(0, 2, 3, 1).reshape(-1, REAL),
                                        target[:, :REAL].permute(0, 2, 3, 1).reshape(-1, REAL)).item()
               - loss.item()) > 1e-3


def per_group_copies_spectral_angle(out: MAEOutput, prediction, target, band_mask):
    """The per-group construction masked_spectral_angle replaced (reflectance in): per group, copies of the images
    with the other bands zeroed, as rows, concatenated, with the masked tokens' pixels as row weights."""
    rows, cols = out.grid
    p = out.patch_size
    predicted, true, weights = [], [], []
    for slot in range(out.present.numel()):
        member = (out.membership[..., int(out.present[slot])] & band_mask).to(prediction.dtype)[:, :, None, None]
        predicted.append((prediction * member).permute(0, 2, 3, 1).reshape(-1, prediction.shape[1]))
        true.append((target * member).permute(0, 2, 3, 1).reshape(-1, target.shape[1]))
        pixels = out.token_mask[:, slot].view(-1, rows, cols).repeat_interleave(p, 1).repeat_interleave(p, 2)
        weights.append(pixels.flatten().float())
    return spectral_angle_reference(torch.cat(predicted), torch.cat(true), torch.cat(weights))


@pytest.mark.parametrize("case", ["padded", "mixed-band-sets", "band-mask-only"])
def test_masked_spectral_angle_equals_the_per_group_copies(model, case):
    """The term, from normalised images with band_mean / band_std, equals the old construction on reflectance
    copies: value and gradient with respect to the prediction. "band-mask-only": the membership also claims the
    padded bands, so only band_mask keeps them out."""
    batch = _batch()
    if case == "mixed-band-sets":
        batch["band_mask"][0, 5:] = False
        batch["wavelengths"][0, 5:] = float("nan")
        batch["hsi"][0, 5:] = 0.0
    out = _forward(model, batch)
    assert out.present.numel() == 2
    if case == "band-mask-only":
        out.membership = out.membership.clone()
        out.membership[:, REAL:, int(out.present[1])] = True
    mean, std = batch["band_mean"][:, :, None, None], batch["band_std"][:, :, None, None]
    prediction = out.prediction.detach().clone()
    prediction[:, REAL:] = 50.0  # padded bands: never scored

    def old(p):
        return per_group_copies_spectral_angle(out, p * std + mean, batch["hsi"] * std + mean, batch["band_mask"])

    def new(p):
        return masked_spectral_angle(out, p, batch["hsi"], batch["band_mask"], batch["band_mean"],
                                     batch["band_std"])

    values, grads = [], []
    for function in (new, old):
        leaf = prediction.clone().requires_grad_(True)
        value = function(leaf)
        value.backward()
        values.append(value.detach())
        grads.append(leaf.grad)
    torch.testing.assert_close(values[0], values[1], **CLOSE)
    torch.testing.assert_close(grads[0], grads[1], **CLOSE)
    assert values[0] > 0.05 and grads[0].abs().sum() > 0 and (grads[0][:, REAL:] == 0).all()
    # reflectance in, no map: the same number
    reflectance = masked_spectral_angle(out, prediction * std + mean, batch["hsi"] * std + mean, batch["band_mask"])
    torch.testing.assert_close(reflectance, values[1], **CLOSE)


# ----------------------------------------------------------------------------------------------- physics


def _mixed_scene(model: SpectralMAE, extra_band_nm: float = 300.0):
    """A batch whose reflectance is exactly A x abundances at every pixel (plus one band outside the endmember
    grid holding garbage), with the true abundances per patch and per pixel."""
    head = model.lsmm
    spectra, library_nm = library_endmembers(3, 350.0, 2550.0)
    head.set_endmembers(torch.from_numpy(spectra), torch.from_numpy(library_nm))
    batch = _batch()
    batch["wavelengths"][:, REAL] = extra_band_nm
    batch["band_mask"][:, REAL] = True
    with torch.no_grad():
        endmembers, covered = head.endmembers_at(batch["wavelengths"])  # [N, B, M]
    assert covered[:, :REAL].all() and not covered[:, REAL:].any()
    abundances = torch.distributions.Dirichlet(torch.ones(3)).sample((2, SIZE, SIZE))  # [N, H, W, M]
    reflectance = torch.einsum("nbm,nhwm->nbhw", endmembers, abundances)
    mean, std = batch["band_mean"][:, :, None, None], batch["band_std"][:, :, None, None]
    hsi = (reflectance - mean) / std
    hsi[:, REAL] = 7.0  # the uncovered band: garbage the physics term must not see
    hsi[:, REAL + 1:] = 0.0
    batch["hsi"] = hsi
    p, rows = PATCH, SIZE // PATCH
    # [N, H, W, M] -> [N, P, p*p, M], patches row-major and pixels row-major inside each patch
    per_pixel = abundances.view(2, rows, p, rows, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(2, rows * rows, p * p, 3)
    return batch, per_pixel


def test_lsmm_physics_is_zero_for_an_exactly_mixed_scene(model):
    torch.manual_seed(20)
    batch, per_pixel = _mixed_scene(model)
    out = _forward(model, batch)
    args = (model.lsmm, batch["hsi"], batch["wavelengths"], batch["band_mean"], batch["band_std"],
            batch["band_mask"])
    out.abundances = per_pixel.mean(dim=2)
    assert lsmm_physics(out, *args).item() == pytest.approx(0.0, abs=1e-8)
    # wrong abundances cost something, the more the wronger
    uniform = torch.full_like(out.abundances, 1 / 3)
    out.abundances = 0.5 * per_pixel.mean(dim=2) + 0.5 * uniform
    half = lsmm_physics(out, *args).item()
    out.abundances = uniform
    full = lsmm_physics(out, *args).item()
    assert 1e-4 < half < full
    # the out-of-grid band really is excluded: counting it (e.g. by moving it onto the grid) changes the loss
    out.abundances = per_pixel.mean(dim=2)
    moved = batch["wavelengths"].clone()
    moved[:, REAL] = 500.0
    assert lsmm_physics(out, model.lsmm, batch["hsi"], moved, *args[3:]).item() > 1.0
    # as does a real band that band_mask removes
    mask = batch["band_mask"].clone()
    mask[:, 0] = False
    batch["hsi"][:, 0] += 3.0
    assert lsmm_physics(out, model.lsmm, batch["hsi"], batch["wavelengths"], batch["band_mean"],
                        batch["band_std"], mask).item() == pytest.approx(0.0, abs=1e-8)


def test_lsmm_physics_per_pixel_resolution():
    torch.manual_seed(0)
    pixel_model = SpectralMAE(ModelConfig(lsmm=LSMMConfig(num_endmembers=3, resolution="pixel")))
    torch.manual_seed(21)
    batch, per_pixel = _mixed_scene(pixel_model)
    out = _forward(pixel_model, batch)
    assert out.abundances.shape == per_pixel.shape
    out.abundances = per_pixel
    args = (pixel_model.lsmm, batch["hsi"], batch["wavelengths"], batch["band_mean"], batch["band_std"],
            batch["band_mask"])
    assert lsmm_physics(out, *args).item() == pytest.approx(0.0, abs=1e-8)
    out.abundances = per_pixel.mean(dim=2, keepdim=True).expand_as(per_pixel)  # right per patch, wrong per pixel
    assert lsmm_physics(out, *args).item() > 1e-3


def patch_major_physics(out: MAEOutput, head, hsi, wavelengths, band_mean, band_std, band_mask):
    """The construction lsmm_physics replaced: the input copied patch-major [N, B, P, p*p] first."""
    endmembers, covered = head.endmembers_at(wavelengths)
    rows, cols = out.grid
    p = out.patch_size
    n, bands = hsi.shape[:2]
    pixels = hsi.view(n, bands, rows, p, cols, p).permute(0, 1, 2, 4, 3, 5).reshape(n, bands, rows * cols, p * p)
    if head.resolution == "patch":
        mixed = torch.einsum("nbm,npm->nbp", endmembers, out.abundances).unsqueeze(-1)
        target = pixels.mean(dim=-1, keepdim=True)
    else:
        mixed = torch.einsum("nbm,npxm->nbpx", endmembers, out.abundances)
        target = pixels
    mixed = (mixed - band_mean[:, :, None, None]) / band_std[:, :, None, None]
    weight = (covered & band_mask).float()[:, :, None, None]
    return (((mixed - target) ** 2) * weight).sum() / (weight.sum() * target.shape[2] * target.shape[3])


@pytest.mark.parametrize("resolution", ["patch", "pixel"])
def test_lsmm_physics_equals_the_patch_major_construction(resolution):
    torch.manual_seed(0)
    lsmm_model = SpectralMAE(ModelConfig(lsmm=LSMMConfig(num_endmembers=3, resolution=resolution)))
    batch = _batch()
    out = _forward(lsmm_model, batch)
    args = (lsmm_model.lsmm, batch["hsi"], batch["wavelengths"], batch["band_mean"], batch["band_std"],
            batch["band_mask"])
    # per-pixel abundances that differ inside each patch, so a layout mix-up shows
    shape = out.abundances.shape
    out.abundances = torch.rand(shape, generator=_generator(33)).softmax(dim=-1).requires_grad_(True)
    values, grads = [], []
    for function in (lsmm_physics, patch_major_physics):
        value = function(out, *args)
        (grad,) = torch.autograd.grad(value, out.abundances)
        values.append(value.detach())
        grads.append(grad)
    torch.testing.assert_close(values[0], values[1], **CLOSE)
    torch.testing.assert_close(grads[0], grads[1], **CLOSE)
    assert values[0] > 0.1


def test_lsmm_physics_needs_abundances(model):
    batch = _batch()
    out = _forward(model, batch)
    out.abundances = None
    with pytest.raises(ValueError, match="LSMM head"):
        lsmm_physics(out, model.lsmm, batch["hsi"], batch["wavelengths"], batch["band_mean"], batch["band_std"],
                     batch["band_mask"])


# ------------------------------------------------------------------------------------ the whole objective


def _preset(name: str) -> ObjectiveConfig:
    """The shipped Hydra presets (configs/objective/*.yaml); karma.yaml is a _global_ package."""
    values = yaml.safe_load((REPO_ROOT / "configs" / "objective" / f"{name}.yaml").read_text())
    return ObjectiveConfig(**values.get("objective", values))


def test_mae_objective_is_masked_mse_only(model):
    objective = PretrainObjective(_preset("mae"))
    assert objective.config == ObjectiveConfig()  # the preset is the default
    objective.check_model(model)
    batch = _batch()
    out = _forward(model, batch)
    loss, parts = objective(model, out, batch)
    assert set(parts) == {"mse"}
    assert loss.item() == pytest.approx(masked_mse(out, batch["hsi"], batch["band_mask"]).item(), rel=1e-6)
    assert not parts["mse"].requires_grad and loss.requires_grad


def test_karma_objective_is_the_weighted_sum_of_its_parts(model):
    batch = _batch()
    out = _forward(model, batch)
    objective = PretrainObjective(_preset("karma"))
    objective.check_model(model)
    loss, parts = objective(model, out, batch)
    assert set(parts) == {"huber", "sam", "physics"}
    assert all(torch.isfinite(v) and v > 0 for v in parts.values())
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)
    # each part is the term computed directly (sam and physics in reflectance units)
    mean, std = batch["band_mean"][:, :, None, None], batch["band_std"][:, :, None, None]
    assert parts["huber"].item() == pytest.approx(masked_huber(out, batch["hsi"], batch["band_mask"]).item())
    assert parts["sam"].item() == pytest.approx(masked_spectral_angle(
        out, out.prediction * std + mean, batch["hsi"] * std + mean, batch["band_mask"]).item(), rel=1e-6)
    assert parts["sam"].item() == pytest.approx(per_group_copies_spectral_angle(
        out, out.prediction * std + mean, batch["hsi"] * std + mean, batch["band_mask"]).item(), rel=1e-6)
    weighted, weighted_parts = PretrainObjective(ObjectiveConfig(name="w", mse=0.5, huber=2.0, sam=3.0,
                                                                 physics=0.25))(model, out, batch)
    assert set(weighted_parts) == {"mse", "huber", "sam", "physics"}
    expected = (0.5 * weighted_parts["mse"] + 2.0 * weighted_parts["huber"] + 3.0 * weighted_parts["sam"]
                + 0.25 * weighted_parts["physics"])
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)


def test_objective_configuration_errors():
    torch.manual_seed(0)
    plain = SpectralMAE(ModelConfig())
    with pytest.raises(ConfigError, match="no LSMM head"):
        PretrainObjective(ObjectiveConfig(name="karma", huber=1.0, sam=1.0, physics=1.0)).check_model(plain)
    PretrainObjective(ObjectiveConfig(huber=1.0, sam=1.0)).check_model(plain)  # no physics: fine
    with pytest.raises(ConfigError, match="norm_pix"):
        PretrainObjective(ObjectiveConfig(sam=1.0, norm_pix=True)).check_model(plain)
    with pytest.raises(ConfigError, match="at least one > 0"):
        ObjectiveConfig(name="nothing", mse=0.0)
    with pytest.raises(ConfigError, match=">= 0"):
        ObjectiveConfig(mse=1.0, sam=-0.5)


def test_karma_backward_reaches_every_used_parameter_with_finite_gradients(model):
    batch = _batch()
    model.train()
    model.zero_grad(set_to_none=True)
    out = _forward(model, batch)
    loss, _ = PretrainObjective(ObjectiveConfig(name="karma", mse=0.0, huber=1.0, sam=1.0, physics=1.0))(
        model, out, batch)
    loss.backward()
    without = set()
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad
        if parameter.grad is None:
            without.add(name)
            continue
        assert torch.isfinite(parameter.grad).all(), name
    # only the microwave (SAR) group's modules are unused: this batch has no band beyond 100 um
    assert without == {"patch_embed.projections.2.weight", "patch_embed.projections.2.bias",
                       "decoder_head.heads.2.weight", "decoder_head.heads.2.bias"}
    endmember_grad = model.lsmm.endmembers.grad
    assert endmember_grad.abs().sum() > 0
    # grid columns no band interpolates from get no gradient
    assert (endmember_grad[:, model.lsmm.grid_nm > 2400] == 0).all()
    model.zero_grad(set_to_none=True)
