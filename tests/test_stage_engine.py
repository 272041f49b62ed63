"""The stage engine: the registry behind `hsfm <stage>`, the model registry, one loader for exports, runs and
checkpoints, and the normaliser that travels with a backbone."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from hsfm_train.cli import main
from hsfm_train.engine.export import export_model, load_pretrained
from hsfm_train.errors import ConfigError
from hsfm_train.models.normalizer import Normalizer
from hsfm_train.models.registry import architecture_of, build_model, encoder_keys
from hsfm_train.stages.base import TrainingStage, get_stage, stages
from tests.runs import overrides, run

MICRO = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8)


def test_stages_are_registered_and_listed_by_the_cli(capsys):
    known = stages()
    assert "pretrain" in known and issubclass(known["pretrain"], TrainingStage)
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for name, stage in known.items():
        assert name in help_text and stage.help.split()[0] in help_text
    with pytest.raises(ConfigError, match="unknown stage 'pretrian'; stages: "):
        get_stage("pretrian")


REQUIRED = {"probe": ["data.scene=scene.npz"], "unmix": ["data.scene=scene.npz"]}  # keys without a default


def test_every_stage_prints_its_config(capsys):
    for name in stages():
        assert main([name, *REQUIRED.get(name, []), "--print-config"]) == 0
        assert "output_dir" in capsys.readouterr().out


def test_model_registry_builds_by_name_and_names_the_model():
    torch.manual_seed(0)
    model = build_model(MICRO)
    assert architecture_of(model) == "spectral-mae"
    state = torch.random.get_rng_state()
    keys = encoder_keys(model)  # builds a throwaway encoder without drawing from the global RNG
    assert torch.equal(state, torch.random.get_rng_state())
    assert keys < set(model.state_dict()) and not any(k.startswith("decoder") for k in keys)
    with pytest.raises(ConfigError, match="unknown architecture 'vit-x'"):
        build_model(MICRO, arch="vit-x")


def test_load_pretrained_takes_an_export_a_run_or_a_checkpoint(demo_dir, tmp_path):
    output = tmp_path / "run"
    result = run(["pretrain", *overrides(demo_dir, output, "trainer.max_steps=2")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    hsi, wavelengths = torch.randn(1, 156, 16, 16), torch.linspace(400.0, 900.0, 156)
    outputs = []
    for source in (output / "export", output, output / "checkpoints" / "step_00000002"):
        model = load_pretrained(source)
        assert not model.training and model.normalizer.band_sets
        with torch.no_grad():
            outputs.append(model.encode(hsi, wavelengths))
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_normalizer_uses_training_statistics_for_a_known_band_set_and_warns_for_a_new_one():
    wavelengths = np.linspace(400.0, 900.0, 5)
    normalizer = Normalizer({"sensor-b5": {"bands": 5, "wavelengths_nm": wavelengths.tolist(),
                                           "mean": [1.0] * 5, "std": [2.0] * 5}})
    cube = np.full((4, 4, 5), 5.0, np.float32)  # [H, W, B]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(normalizer(cube, wavelengths + 0.3), 2.0)  # within 0.5 nm: the same band set
        batch = torch.full((2, 5, 4, 4), 5.0)  # [N, B, H, W]
        assert torch.allclose(normalizer(batch, wavelengths), torch.full_like(batch, 2.0))
    other = np.linspace(1000.0, 2000.0, 5)
    data = np.random.default_rng(0).normal(3.0, 4.0, (8, 8, 5)).astype(np.float32)
    with pytest.warns(UserWarning, match="not trained on this band set"):
        normalised = normalizer(data, other)
    np.testing.assert_allclose(normalised.reshape(-1, 5).mean(axis=0), 0.0, atol=1e-5)
    with pytest.raises(ConfigError, match="pass data"):
        normalizer.statistics_for(other)
    _, _, source = normalizer.statistics_for(wavelengths)
    assert source == "training statistics of band set sensor-b5"
    assert normalizer.match(wavelengths + 0.6) is None  # 0.6 nm off at 400-900 nm: another band set


def test_a_sar_band_centre_stored_as_float32_still_matches_its_band_set():
    """Exports keep centres as float32: C-band SAR at 5.5465763e7 nm comes back 4 nm off, which is the same band."""
    vh = 5.5465763e7
    stored = float(np.float32(vh))
    assert abs(stored - vh) > 0.5
    normalizer = Normalizer({"s1-vh": {"bands": 1, "wavelengths_nm": [stored], "mean": [0.47], "std": [0.2]}})
    assert normalizer.match([vh]) == "s1-vh"
    assert normalizer.match([vh * 1.001]) is None


def test_an_export_names_its_architecture(tmp_path):
    model = build_model(MICRO)
    export_model(model, tmp_path / "export")
    loaded = load_pretrained(tmp_path / "export")
    assert loaded.export_config["arch"] == "spectral-mae" and architecture_of(loaded) == "spectral-mae"
