"""Exports: the sha256 and size of model.safetensors in config.json and their check on load, format 1 exports
still loading (with a warning), atomic replacement of an existing export, and eval-recon refusing an
encoder-only export with one line."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from hsfm_train.data.demo import build_demo_shards
from hsfm_train.engine import export
from hsfm_train.engine.export import export_model, load_pretrained
from hsfm_train.errors import ConfigError, DataFormatError
from hsfm_train.models.mae import ModelConfig, SpectralMAE

MICRO = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8)


def _model(seed: int = 0) -> SpectralMAE:
    torch.manual_seed(seed)
    return SpectralMAE(ModelConfig(**MICRO))


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _leftovers(path: Path) -> list[str]:
    """Staging / retired directories export_model left next to ``path``."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected, actual = reference.state_dict(), model.state_dict()
    assert set(actual) == set(expected)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


@pytest.fixture(scope="module")
def demo_eval(tmp_path_factory) -> Path:
    _, eval_dir = build_demo_shards(tmp_path_factory.mktemp("demo"))  # a few seconds: once per module
    return eval_dir


def test_export_records_size_and_sha256_of_the_weights(tmp_path):
    path = export_model(_model(), tmp_path / "export")
    config, data = _config(path), (path / "model.safetensors").read_bytes()
    assert config["format_version"] == 2
    assert config["weights"] == {"file": "model.safetensors", "bytes": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest()}


def test_round_trip_verifies_without_warning_and_replaces_an_existing_export(tmp_path):
    export_model(_model(0), tmp_path / "export")
    newer = _model(1)
    path = export_model(newer, tmp_path / "export")  # over the first one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_pretrained(path)
    _assert_same_weights(loaded, newer)
    assert loaded.export_config["weights"]["sha256"] == _config(path)["weights"]["sha256"]
    assert _leftovers(path) == []


def test_a_flipped_byte_is_refused(tmp_path):
    path = export_model(_model(), tmp_path / "export")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, lands in the tensor data: safetensors itself would load it
    weights.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match=r"model\.safetensors.*checksum") as caught:
        load_pretrained(path)
    message = str(caught.value)
    assert "\n" not in message and "sha256" in message and "hsfm export RUN --out DIR" in message


def test_a_truncated_file_is_refused(tmp_path):
    path = export_model(_model(), tmp_path / "export")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match=r"model\.safetensors.*checksum.*bytes.*truncated"):
        load_pretrained(path)


def test_format_2_without_weights_entry_is_refused(tmp_path):
    path = export_model(_model(), tmp_path / "export")
    config = _config(path)
    config.pop("weights", None)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataFormatError, match=r"config\.json.*weights"):
        load_pretrained(path)


def test_format_1_export_loads_with_a_warning(tmp_path):
    model = _model()
    path = export_model(model, tmp_path / "export")
    config = _config(path)
    config.pop("weights", None)
    config["format_version"] = 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"no checksum.*cannot be verified.*re-export"):
        loaded = load_pretrained(path)
    _assert_same_weights(loaded, model)


def _fail_in_save_file(monkeypatch):
    real = export.save_file

    def save_file(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:50])  # half-written, then the failure
        raise OSError("disk full")
    monkeypatch.setattr(export, "save_file", save_file)


def _fail_in_config(monkeypatch):
    def write_json_atomic(path, payload):
        raise KeyboardInterrupt
    monkeypatch.setattr(export, "write_json_atomic", write_json_atomic)


def _fail_in_swap(monkeypatch):
    real = Path.rename

    def rename(self, target):
        if ".partial-" in self.name:  # the staging dir moving into place
            raise OSError("rename failed")
        return real(self, target)
    monkeypatch.setattr(Path, "rename", rename)


@pytest.mark.parametrize("fail", [_fail_in_save_file, _fail_in_config, _fail_in_swap])
def test_a_failed_export_leaves_the_old_one_intact_and_no_staging_dir(tmp_path, monkeypatch, fail):
    old = _model(0)
    path = export_model(old, tmp_path / "export")
    fail(monkeypatch)
    with pytest.raises((OSError, KeyboardInterrupt)):
        export_model(_model(1), path)
    monkeypatch.undo()
    _assert_same_weights(load_pretrained(path), old)
    assert _leftovers(path) == []


def test_evaluate_reconstruction_refuses_an_encoder_only_model(tmp_path):
    from hsfm_train.stages.eval_recon import EvalConfig, evaluate_reconstruction

    encoder = load_pretrained(export_model(_model(), tmp_path / "encoder", encoder_only=True))
    with pytest.raises(ConfigError, match="encoder-only"):
        evaluate_reconstruction(encoder, [], EvalConfig())


def test_eval_recon_cli_on_an_encoder_only_export_is_one_line(tmp_path, demo_eval, capsys, monkeypatch):
    from hsfm_train.cli import main

    monkeypatch.delenv("HSFM_DEBUG", raising=False)
    path = export_model(_model(), tmp_path / "encoder", encoder_only=True)
    assert main(["eval-recon", str(path), "--shards", str(demo_eval)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hsfm: error:"), lines
    assert "encoder-only" in lines[0] and "decoder" in lines[0]
