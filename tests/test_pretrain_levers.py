"""The pretraining levers of the transfer recipe: the physics warm-up, the feature-decorrelation term, the
decoder read-out of the probe and the denser tiling of real scenes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hsfm_train.data.demo import DemoDataConfig, build_demo_shards
from hsfm_train.data.shards import load_index
from hsfm_train.engine.export import export_model
from hsfm_train.errors import ConfigError
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.objectives.pretrain import ObjectiveConfig, PretrainObjective
from hsfm_train.objectives.representation import feature_decorrelation
from hsfm_train.stages.probe import ProbeConfig, pixel_features, run_probe
from tests.conftest import shared_file

MICRO = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8)


def test_physics_weight_ramps_linearly_over_its_warmup_and_other_terms_do_not():
    config = ObjectiveConfig(mse=1.0, physics=2.0, physics_warmup_steps=100)
    assert config.weight("physics", 0) == pytest.approx(0.02)
    assert config.weight("physics", 49) == pytest.approx(1.0)
    assert config.weight("physics", 99) == pytest.approx(2.0) and config.weight("physics", 5000) == 2.0
    assert config.weight("physics") == 2.0  # no step: the full weight
    assert config.weight("mse", 0) == 1.0
    with pytest.raises(ConfigError, match="physics_warmup_steps"):
        ObjectiveConfig(physics_warmup_steps=-1)


def test_objective_applies_the_warmed_up_physics_weight():
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig(**MICRO, lsmm={"num_endmembers": 3}))
    hsi = torch.randn(2, 20, 16, 16)
    wavelengths = torch.linspace(400.0, 2400.0, 20).expand(2, -1)
    batch = {"hsi": hsi, "band_mask": torch.ones(2, 20, dtype=torch.bool), "wavelengths": wavelengths,
             "band_mean": torch.full((2, 20), 0.3), "band_std": torch.full((2, 20), 0.1)}
    out = model(hsi, wavelengths, generator=torch.Generator().manual_seed(0))
    objective = PretrainObjective(ObjectiveConfig(mse=1.0, physics=1.0, physics_warmup_steps=10))
    early, parts = objective(model, out, batch, step=0)
    late, _ = objective(model, out, batch, step=20)
    torch.testing.assert_close(early, parts["mse"] + 0.1 * parts["physics"])
    torch.testing.assert_close(late, parts["mse"] + parts["physics"])


def test_decorrelation_is_small_for_white_features_large_for_collapsed_ones_and_its_gradient_decorrelates():
    torch.manual_seed(0)
    white = torch.randn(8, 128, 16)
    collapsed = torch.randn(8, 128, 1).expand(-1, -1, 16) + 0.01 * torch.randn(8, 128, 16)
    assert feature_decorrelation(white) < 0.05
    assert feature_decorrelation(collapsed) > 10 * feature_decorrelation(white)
    weak = white * torch.tensor([1.0] * 8 + [0.1] * 8)  # half the channels nearly constant: the variance hinge
    assert feature_decorrelation(weak) > 0.4
    x = collapsed.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=0.05)
    before = feature_decorrelation(x).item()
    for _ in range(20):
        optimiser.zero_grad()
        feature_decorrelation(x).backward()
        optimiser.step()
    assert feature_decorrelation(x).item() < 0.5 * before


def test_decorrelation_term_is_part_of_the_objective():
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig(**MICRO))
    hsi = torch.randn(2, 20, 16, 16)
    wavelengths = torch.linspace(400.0, 2400.0, 20).expand(2, -1)
    batch = {"hsi": hsi, "band_mask": torch.ones(2, 20, dtype=torch.bool)}
    out = model(hsi, wavelengths, generator=torch.Generator().manual_seed(0))
    loss, parts = PretrainObjective(ObjectiveConfig(mse=1.0, decorrelation=0.5))(model, out, batch)
    torch.testing.assert_close(parts["decorrelation"], feature_decorrelation(out.latent[:, 1:]).detach())
    torch.testing.assert_close(loss, parts["mse"] + 0.5 * parts["decorrelation"])
    loss.backward()
    assert model.blocks[0].mlp[0].weight.grad.abs().sum() > 0  # the encoder gets the term's gradient


def test_decoder_readout_gives_decoder_width_features_and_its_random_control_has_a_decoder(tmp_path):
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig(**{**MICRO, "decoder_embed_dim": 24})).eval()
    cube = np.random.default_rng(0).normal(size=(20, 24, 20)).astype(np.float32)
    wavelengths = np.linspace(400.0, 2500.0, 20).astype(np.float32)
    decoder = pixel_features(model, cube, wavelengths, readout="decoder")
    encoder = pixel_features(model, cube, wavelengths)
    assert decoder.shape == (20 * 24, 2 * 24) and encoder.shape == (20 * 24, 2 * 32)
    export = export_model(model, tmp_path / "export")
    config = ProbeConfig(backbone=str(export), seeds=2, shots=[5], probes=["linear"], readout="decoder",
                         output_dir=str(tmp_path / "probe"))
    config.data.scene = str(shared_file("classification/indian_pines/indian_pines.npz"))
    summary = run_probe(config)
    assert summary["feature_dims"]["backbone"] == summary["feature_dims"]["random"] == 2 * 24
    encoder_only = export_model(SpectralMAE(ModelConfig(**MICRO), with_decoder=False), tmp_path / "encoder-only",
                                encoder_only=True)
    config.backbone = str(encoder_only)
    with pytest.raises(ConfigError, match="encoder-only"):
        run_probe(config)
    config.readout = "pixels"
    with pytest.raises(ConfigError, match="readout"):
        run_probe(config)


def test_real_stride_tiles_real_scenes_more_densely_and_leaves_synthetic_ones(tmp_path):
    base = dict(synthetic_scenes=1, holdout_synthetic=1)
    sparse = load_index(build_demo_shards(tmp_path / "sparse", DemoDataConfig(**base))[0])
    dense = load_index(build_demo_shards(tmp_path / "dense", DemoDataConfig(**base, real_stride=8))[0])
    tiles = lambda index, prefix: sum(s["tiles"] for s in index["scenes"] if s["name"].startswith(prefix))
    assert tiles(dense, "samson") > 3 * tiles(sparse, "samson")
    assert tiles(dense, "synthetic") == tiles(sparse, "synthetic")
    assert json.loads(json.dumps(dense["band_sets"]))  # one band set per sensor still
    with pytest.raises(ConfigError, match="real_stride"):
        DemoDataConfig(real_stride=5)


def test_resampling_a_real_scene_interpolates_linearly_and_makes_nothing_up_in_its_gaps():
    from hsfm_train.data.demo import resample_scene
    from hsfm_train.data.scene import Scene

    wavelengths = np.r_[np.arange(400.0, 1300.0, 10.0), np.arange(1500.0, 2500.0, 10.0)].astype(np.float32)
    cube = np.broadcast_to(0.1 + wavelengths / 5000.0, (4, 5, wavelengths.size)).astype(np.float32)  # linear
    scene = Scene(name="ramp", cube=cube.copy(), wavelengths_nm=wavelengths, sensor="lab", source="test")
    resampled = resample_scene(scene, "enmap")
    target = resampled.wavelengths_nm
    assert resampled.sensor == "lab-as-enmap" and resampled.cube.shape[:2] == (4, 5)
    assert not ((target > 1290.0) & (target < 1500.0)).any()  # the 1300-1490 nm gap stays empty
    assert target.min() >= 400.0 and target.max() <= 2490.0
    np.testing.assert_allclose(resampled.cube[0, 0], 0.1 + target / 5000.0, rtol=1e-5)
    with pytest.raises(ConfigError, match="cannot resample"):
        resample_scene(scene, "sentinel1_c")
