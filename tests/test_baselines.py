"""Trivial reconstruction baselines: the fills on hand-made images with known answers, their scores inside
evaluate_reconstruction (same masks, same pixels as the model; beaten by a perfect model, beating a bad one) and
the eval-recon table that sets them beside the model."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hsfm_train.baselines import nearest_visible_fill, visible_mean_fill
from hsfm_train.engine.export import export_model
from hsfm_train.metrics import ReconstructionMeter
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.stages.eval_recon import (EvalConfig, eval_loader, evaluate_reconstruction, format_comparison,
                                          losses_to_baselines, masked_forward, reflectance)

MICRO = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8)
ONE_BATCH = EvalConfig(max_batches=1)


def _image(n: int = 1, b: int = 3, h: int = 4, w: int = 4) -> torch.Tensor:
    """Every pixel of every image a distinct spectrum."""
    return torch.arange(n * b * h * w, dtype=torch.float32).view(n, b, h, w) + 1.0


def _micro(seed: int = 0) -> SpectralMAE:
    torch.manual_seed(seed)
    return SpectralMAE(ModelConfig(**MICRO))


class _Predicting(torch.nn.Module):
    """A real micro MAE (masks, token bookkeeping) whose prediction is replaced by ``predict(hsi)``."""

    def __init__(self, predict):
        super().__init__()
        self.model, self.predict = _micro(), predict

    def forward(self, hsi, wavelengths, band_mask=None, **kwargs):
        out = self.model(hsi, wavelengths, band_mask, **kwargs)
        return out.replace(prediction=self.predict(hsi))


@pytest.fixture(scope="module")
def demo_eval(demo_dir):
    return demo_dir / "eval"


# ------------------------------------------------------------------------------------------------------ fills


def test_nearest_visible_fill_copies_the_nearest_neighbour_and_keeps_visible_pixels():
    image = _image()
    masked = torch.zeros(1, 4, 4, dtype=torch.bool)
    masked[0, 0, 0] = masked[0, 1, 0] = True  # (0, 0)'s only visible neighbour at distance 1 is (0, 1)
    filled = nearest_visible_fill(image, masked)
    assert torch.equal(filled[0, :, 0, 0], image[0, :, 0, 1])
    # (1, 0) has two visible neighbours at distance 1: either is right
    assert any(torch.equal(filled[0, :, 1, 0], image[0, :, r, c]) for r, c in ((1, 1), (2, 0)))
    assert torch.equal(filled[:, :, ~masked[0]], image[:, :, ~masked[0]])
    assert torch.equal(nearest_visible_fill(image, masked), filled)  # ties broken the same way every time


def test_nearest_visible_fill_picks_a_pixel_at_the_least_distance():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 5, 9, 7, generator=generator)
    masked = torch.rand(3, 9, 7, generator=generator) < 0.7
    filled = nearest_visible_fill(image, masked)
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(7), indexing="ij")
    for n, r, c in masked.nonzero().tolist():
        visible = ~masked[n]
        distance = ((rows - r) ** 2 + (cols - c) ** 2).float()
        least = distance[visible].min()
        candidates = visible & (distance == least)
        assert any(torch.equal(filled[n, :, rr, cc], image[n, :, rr, cc]) for rr, cc in candidates.nonzero().tolist())


def test_visible_mean_fill_equals_the_hand_computed_mean():
    image = _image(b=2)
    masked = torch.ones(1, 4, 4, dtype=torch.bool)
    masked[0, 0, 0] = masked[0, 3, 3] = False  # visible: the first and last pixel
    filled = visible_mean_fill(image, masked)
    expected = (image[0, :, 0, 0] + image[0, :, 3, 3]) / 2  # band 0: (1 + 16) / 2, band 1: (17 + 32) / 2
    assert expected.tolist() == [8.5, 24.5]
    assert torch.equal(filled[0, :, masked[0]], expected[:, None].expand(-1, 14))
    assert torch.equal(filled[0, :, ~masked[0]], image[0, :, ~masked[0]])


def test_a_fully_masked_image_gets_the_batch_mean_of_visible_pixels_and_nothing_crashes():
    image = _image(n=2, b=2)
    masked = torch.zeros(2, 4, 4, dtype=torch.bool)
    masked[0] = True  # image 0: nothing visible
    masked[1, :2] = True  # image 1: its bottom half visible
    expected = image[1, :, 2:].mean((1, 2))  # the batch's visible pixels are all in image 1
    for fill in (nearest_visible_fill, visible_mean_fill):
        filled = fill(image, masked)
        assert torch.allclose(filled[0], expected[:, None, None].expand(-1, 4, 4))
        assert torch.equal(filled[1, :, 2:], image[1, :, 2:])
        # a batch with no visible pixel at all: zeros, documented, not an error
        assert torch.equal(fill(image, torch.ones(2, 4, 4, dtype=torch.bool)), torch.zeros_like(image))


def test_nodata_pixels_are_never_copied_and_padded_bands_come_back_zero():
    image = _image(b=3)
    masked = torch.zeros(1, 4, 4, dtype=torch.bool)
    masked[0, :, 0] = True  # the first column hidden: each pixel's unique nearest is its right-hand neighbour
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 0, 1] = False  # ... except (0, 0)'s, which is nodata: the next nearest is (1, 1)
    band_mask = torch.tensor([[True, True, False]])
    filled = nearest_visible_fill(image, masked, band_mask=band_mask, valid=valid)
    assert torch.equal(filled[0, :2, 0, 0], image[0, :2, 1, 1])
    assert torch.equal(filled[0, :2, 2, 0], image[0, :2, 2, 1])
    assert not filled[0, 2].any()
    mean = visible_mean_fill(image, masked, band_mask=band_mask, valid=valid)
    source = ~masked[0] & valid[0]
    assert torch.allclose(mean[0, :2, 0, 0], image[0, :2][:, source].mean(1))
    assert not mean[0, 2].any()


def test_a_wrong_shape_is_one_error_naming_the_argument():
    with pytest.raises(ValueError, match=r"masked must be \(1, 4, 4\)"):
        nearest_visible_fill(_image(), torch.zeros(1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"band_mask must be \(1, 3\)"):
        visible_mean_fill(_image(), torch.zeros(1, 4, 4, dtype=torch.bool), band_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"image must be \[N, B, H, W\]"):
        visible_mean_fill(_image()[0], torch.zeros(1, 4, 4, dtype=torch.bool))


# ------------------------------------------------------------------------------------- inside the evaluation


def test_baselines_are_scored_on_the_pixels_the_model_was_scored_on(demo_eval):
    model = _micro()
    results = evaluate_reconstruction(model, eval_loader(str(demo_eval), 8), ONE_BATCH)
    batch = next(iter(eval_loader(str(demo_eval), 8)))
    pixel_mask = masked_forward(model, batch, ONE_BATCH.mask_ratio, ONE_BATCH.seed).band_mask().any(dim=1)
    target = reflectance(batch["hsi"], batch) * batch["band_mask"][:, :, None, None]
    for name, fill in (("nearest_visible", nearest_visible_fill), ("visible_mean", visible_mean_fill)):
        expected = ReconstructionMeter().update(fill(target, pixel_mask, band_mask=batch["band_mask"],
                                                     valid=batch["valid"]), target, pixel_mask).compute()
        scores = results["baselines"][name]
        for metric, value in expected.items():
            assert scores[metric] == pytest.approx(value, rel=1e-12)
            assert scores[f"{batch['band_set'][0]}/{metric}"] == pytest.approx(value, rel=1e-12)
    # the model's own keys are as before, and baselines=False leaves only them
    plain = evaluate_reconstruction(model, eval_loader(str(demo_eval), 8), ONE_BATCH, baselines=False)
    assert "baselines" not in plain
    assert plain == {k: v for k, v in results.items() if k != "baselines"}
    assert {"psnr", "ssim", "sam_deg", "images"} <= set(plain)


def test_baselines_beat_a_bad_model_and_lose_to_a_perfect_one(demo_eval):
    perfect = evaluate_reconstruction(_Predicting(lambda hsi: hsi), eval_loader(str(demo_eval), 8), ONE_BATCH)
    bad = evaluate_reconstruction(_Predicting(lambda hsi: -3 * hsi - 10), eval_loader(str(demo_eval), 8), ONE_BATCH)
    assert perfect["psnr"] == pytest.approx(120.0) and perfect["sam_deg"] == pytest.approx(0.0, abs=1e-4)
    assert perfect["baselines"] == bad["baselines"]  # they see the same masks, whatever the model predicts
    for name, scores in perfect["baselines"].items():
        assert bad["psnr"] < scores["psnr"] < perfect["psnr"], name
        assert bad["ssim"] < scores["ssim"] < perfect["ssim"], name
        assert bad["sam_deg"] > scores["sam_deg"] > perfect["sam_deg"], name
    assert losses_to_baselines(perfect) == {}
    assert losses_to_baselines(bad) == {name: ["psnr", "ssim", "sam_deg"] for name in bad["baselines"]}


def test_format_comparison_says_plainly_when_the_model_loses():
    results = {"psnr": 14.23, "ssim": 0.40, "sam_deg": 7.74, "images": 23,
               "baselines": {"nearest_visible": {"psnr": 15.37, "ssim": 0.38, "sam_deg": 5.14},
                             "visible_mean": {"psnr": 12.0, "ssim": 0.30, "sam_deg": math.nan}}}
    lines = format_comparison(results)
    assert [line.split()[0] for line in lines[1:4]] == ["model", "nearest", "visible"]
    assert lines[4:] == ["note: the model loses to the nearest-visible-pixel baseline on PSNR and SAM"]


# ------------------------------------------------------------------------------------------------------ CLI


def test_eval_recon_prints_the_model_beside_both_baselines(tmp_path, demo_eval, capsys):
    from hsfm_train.cli import main

    path = export_model(_micro(), tmp_path / "export")
    common = ["eval-recon", str(path), "--shards", str(demo_eval), "--max-batches", "1", "--batch-size", "8"]
    assert main(common) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["PSNR", "dB", "SSIM", "SAM", "deg"]
    rows = {" ".join(line.split()[:-3]): [float(x) for x in line.split()[-3:]] for line in lines[2:5]}
    assert list(rows) == ["model", "nearest visible pixel", "visible mean"]
    # an untrained micro model loses to copying the nearest visible pixel, and the output says so
    assert rows["model"][0] < rows["nearest visible pixel"][0]
    assert any(line.startswith("note: the model loses to the nearest-visible-pixel baseline on PSNR")
               for line in lines)

    assert main(common + ["--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results["baselines"]) == {"nearest_visible", "visible_mean"}
    assert results["baselines"]["nearest_visible"]["psnr"] == pytest.approx(rows["nearest visible pixel"][0],
                                                                             abs=0.005)

    assert main(common + ["--no-baselines"]) == 0
    out = capsys.readouterr().out
    assert "nearest visible pixel" not in out and "note:" not in out and "model" in out
    assert main(common + ["--no-baselines", "--json"]) == 0
    assert "baselines" not in json.loads(capsys.readouterr().out)
