"""`lsmm-head`: an exported backbone + the LSMM abundance head unmixes a real scene; the backbone stays frozen
(or only its last blocks train); named errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hsfm_train.engine.export import export_model
from hsfm_train.errors import ConfigError
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.stages.unmix import UnmixStage
from hsfm_train.unmixing import lsmm_head
from hsfm_train.unmixing.base import UnmixingInput
from tests.conftest import shared_file

MICRO = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8)


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
    torch.manual_seed(0)
    return export_model(SpectralMAE(ModelConfig(**MICRO)).eval(), tmp_path_factory.mktemp("lsmm") / "export")


@pytest.fixture(scope="module")
def samson_crop():
    scene = np.load(shared_file("unmixing/samson/samson.npz"))
    cube = scene["cube"][:24, :24]
    return cube, scene["wavelengths_nm"], scene["endmembers"], scene["abundances"][:24, :24]


def _config(export, *overrides: str):
    return UnmixStage.load_config(["method=lsmm-head", "data.scene=unused.npz", f"lsmm.backbone={export}",
                                   "lsmm.epochs=3", "device=cpu",
                                   *overrides])


def _inputs(samson_crop) -> UnmixingInput:
    cube, wavelengths, _, _ = samson_crop
    return UnmixingInput(cube.reshape(-1, cube.shape[2]).astype(np.float32), cube.shape[:2], 3, wavelengths)


def test_lsmm_head_loads_an_export_and_unmixes(micro_export, samson_crop, tmp_path):
    cube, wavelengths, truth_e, truth_a = samson_crop
    path = tmp_path / "crop.npz"
    np.savez(path, cube=cube, wavelengths_nm=wavelengths, endmembers=truth_e, abundances=truth_a)
    config = _config(micro_export, f"data.scene={path}", "runs=1", f"output_dir={tmp_path / 'out'}")
    summary = UnmixStage(config).execute()
    assert summary["method"] == "lsmm-head" and summary["scored"] and 0 <= summary["sad_mean"] < np.pi / 2
    with np.load(tmp_path / "out" / "runs" / "run_000.npz") as run:
        assert run["abundances"].shape == (24, 24, 3) and run["abundances"].min() >= 0
        np.testing.assert_allclose(run["abundances"].sum(-1), 1.0, atol=1e-5)
        assert run["endmembers"].shape == (3, 156) and run["endmembers"].min() >= 0


def _watch_backbone(monkeypatch) -> dict:
    """Keep the backbone fit_lsmm_head builds, and its weights before training."""
    seen: dict = {}
    build = lsmm_head._backbone

    def keep(settings, seed):
        model, statistics = build(settings, seed)
        seen["model"], seen["before"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model, statistics
    monkeypatch.setattr(lsmm_head, "_backbone", keep)
    return seen


def test_the_backbone_stays_frozen(micro_export, samson_crop, monkeypatch):
    seen = _watch_backbone(monkeypatch)
    lsmm_head.fit_lsmm_head(_inputs(samson_crop), 0, _config(micro_export))
    after = seen["model"].state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)


def test_unfreeze_trains_only_the_last_blocks(micro_export, samson_crop, monkeypatch):
    seen = _watch_backbone(monkeypatch)
    lsmm_head.fit_lsmm_head(_inputs(samson_crop), 0, _config(micro_export, "lsmm.unfreeze_blocks=1",
                                                              "lsmm.backbone_lr=1e-2"))
    after = seen["model"].state_dict()
    changed = {k for k in after if not torch.equal(seen["before"][k], after[k])}
    assert changed and all(k.startswith("blocks.1.") for k in changed)


def test_the_backbone_matters(micro_export, samson_crop):
    trained = lsmm_head.fit_lsmm_head(_inputs(samson_crop), 0, _config(micro_export, "lsmm.with_spectrum=false"))
    control = lsmm_head.fit_lsmm_head(_inputs(samson_crop), 0, _config(
        "random", f"lsmm.random_like={micro_export}", "lsmm.with_spectrum=false", "lsmm.random_model=tiny"))
    assert not np.allclose(trained[1], control[1])
    again = lsmm_head.fit_lsmm_head(_inputs(samson_crop), 0, _config(micro_export, "lsmm.with_spectrum=false"))
    np.testing.assert_array_equal(trained[1], again[1])


def test_a_scene_without_band_centres_is_named(micro_export, samson_crop):
    inputs = _inputs(samson_crop)
    inputs.wavelengths_nm = None
    with pytest.raises(ConfigError, match="data.reader"):
        lsmm_head.fit_lsmm_head(inputs, 0, _config(micro_export))


def test_lsmm_config_errors_are_named(micro_export):
    with pytest.raises(ConfigError, match="lsmm.endmembers must be one of"):
        _config(micro_export, "lsmm.endmembers=library")
    with pytest.raises(ConfigError, match="needs lsmm.labelled"):
        _config(micro_export, "lsmm.endmembers=labelled")
