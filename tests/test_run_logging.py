"""False colour, reconstruction figures and RunLogger (W&B offline or disabled; never the network)."""
from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from hsfm_train.engine.logging import RunLogger
from hsfm_train.figures import false_colour, reconstruction_figure


@pytest.fixture(autouse=True)
def _quiet_offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _chosen_bands(n_bands: int, wavelengths) -> list[int]:
    """Band shown in each channel, read back through the public API: pixel j lights up band j only."""
    image = np.eye(n_bands)[:, None, :]  # [B, 1, W=B]
    rgb = false_colour(image, wavelengths)
    return [int(np.argmax(rgb[0, :, c])) for c in range(3)]


def test_false_colour_picks_bands_nearest_640_550_470_nm():
    wavelengths = np.arange(400.0, 901.0, 5.0)
    assert _chosen_bands(len(wavelengths), wavelengths) == [48, 30, 14]
    assert _chosen_bands(len(wavelengths), torch.tensor(wavelengths)) == [48, 30, 14]


@pytest.mark.parametrize("n_bands,wavelengths,expected", [
    (3, None, [0, 1, 2]),
    (3, [490.0, 560.0, 665.0], [2, 1, 0]),  # RGB stored blue first is still shown red-green-blue
    (13, [float("nan")] * 13, [10, 6, 2]),
    (20, np.linspace(1000, 2500, 20), [16, 10, 3]),  # SWIR only: spread over the band index
])
def test_false_colour_fallbacks(n_bands, wavelengths, expected):
    assert _chosen_bands(n_bands, wavelengths) == expected


def test_false_colour_single_band_is_grey_and_reference_stretch_is_shared():
    image = np.random.default_rng(0).random((1, 6, 7))
    rgb = false_colour(image, None)
    assert rgb.shape == (6, 7, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert (false_colour(image, reference=image) == rgb).all()
    assert false_colour(image * 0.5, reference=image).mean() < rgb.mean()


def _check_png(path, tmp_path):
    assert path.exists() and path.stat().st_size > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("n_bands,wavelengths", [
    (156, np.linspace(400, 2500, 156)),
    (1, None),
    (12, np.full(12, np.nan)),
])
def test_reconstruction_figure_is_a_png(tmp_path, n_bands, wavelengths):
    rng = np.random.default_rng(n_bands)
    image = torch.from_numpy(rng.random((n_bands, 24, 32)).astype(np.float32))
    reconstruction = image + 0.05 * torch.randn(image.shape)
    mask = torch.from_numpy(rng.random((24, 32)) < 0.6)
    path = reconstruction_figure(tmp_path / "recon.png", image, mask, reconstruction, wavelengths,
                                 title=f"{n_bands} bands")
    _check_png(path, tmp_path)


def test_reconstruction_figure_without_masked_pixels(tmp_path):
    image = np.random.default_rng(1).random((5, 8, 8))
    path = reconstruction_figure(tmp_path / "r.png", image, np.zeros((8, 8), bool), image, None)
    _check_png(path, tmp_path)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_logger_offline_writes_metrics_and_summary(tmp_path):
    with RunLogger(tmp_path, {"lr": 1e-3}, run_name="test", mode="offline") as logger:
        assert logger.mode == "offline"
        logger.log({"loss": torch.tensor(0.5), "lr": np.float32(0.25)}, step=1)
        logger.log({"loss": 0.25}, step=2)
        logger.summary({"best_loss": 0.25})
        logger.summary({"epochs": 1})
    assert _read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5, "lr": 0.25},
                                                       {"step": 2, "loss": 0.25}]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"best_loss": 0.25, "epochs": 1}
    logger.finish()  # idempotent
    with pytest.raises(RuntimeError):
        logger.log({"loss": 0.0}, step=3)


def test_run_logger_survives_failing_wandb_init(tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="no network"):
        logger = RunLogger(tmp_path, {}, mode="online")
    assert logger.wandb_run is None
    logger.log({"loss": 1.0}, step=0)
    logger.log_image("recon", tmp_path / "missing.png", step=0)
    logger.summary({"final": 1.0})
    logger.finish()
    assert _read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": 1.0}]


def test_run_logger_disabled_and_non_main(tmp_path):
    with RunLogger(tmp_path / "main", {}, enabled=False) as logger:
        assert logger.mode == "disabled" and logger.wandb_run is None
        logger.log({"loss": 1.0}, step=0)
        assert logger.progress(10, desc="train").disable is False
    assert _read_jsonl(tmp_path / "main" / "metrics.jsonl") == [{"step": 0, "loss": 1.0}]

    worker = RunLogger(tmp_path / "worker", {}, is_main_process=False)
    worker.log({"loss": 1.0}, step=0)
    worker.summary({"x": 1})
    bar = worker.progress(10)
    assert bar.disable is True
    bar.close()
    worker.finish()
    assert not (tmp_path / "worker").exists()


def test_mode_defaults_to_offline_without_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    calls = []
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or None)
    RunLogger(tmp_path / "run", {"a": 1}, project="p").finish()
    assert calls[0]["mode"] == "offline" and calls[0]["dir"] == str(tmp_path / "run")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    RunLogger(tmp_path / "run2", {}).finish()
    assert calls[1]["mode"] == "online"
