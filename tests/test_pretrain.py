"""The pretraining stage end to end through its CLI: export -> load, evaluation, and start-up errors that name the
key at fault. Kill / signal / concurrent-run behaviour is in test_reliability.py.

Runs use a micro model on the demo shards so that each process takes seconds on 2 cores."""
from __future__ import annotations

import json

import pytest
import torch

from tests.runs import MICRO, error_lines, overrides as _overrides, run as _run


def test_export_round_trip_and_encoder_only(demo_dir, tmp_path):
    from hsfm_train import load_pretrained
    from hsfm_train.engine.export import load_checkpoint_model

    run = tmp_path / "run"
    result = _run(["pretrain", *_overrides(demo_dir, run, "trainer.max_steps=2", "objective=karma",
                                           "model.lsmm.init=vca")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_pretrained(run / "export")
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["model"]["lsmm"]["num_endmembers"] == 8 and config["provenance"]["step"] == 2
    assert set(config["normalization"]) and all(len(s["mean"]) == s["bands"] for s in config["normalization"].values())
    from_checkpoint = load_checkpoint_model(run)
    hsi, wavelengths = torch.randn(2, 156, 32, 32), torch.linspace(400.0, 900.0, 156)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        a = model(hsi, wavelengths, generator=generator()).prediction
        b = from_checkpoint(hsi, wavelengths, generator=generator()).prediction
    assert torch.equal(a, b)

    encoder_dir = tmp_path / "encoder"
    result = _run(["export", str(run), "--out", str(encoder_dir), "--encoder-only"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    encoder = load_pretrained(encoder_dir)
    assert encoder.lsmm is None and not any(k.startswith("decoder") for k in encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(encoder.encode(hsi, wavelengths), model.encode(hsi, wavelengths))
    with pytest.raises(RuntimeError, match="encoder-only"):
        encoder(hsi, wavelengths)

    result = _run(["eval-recon", str(run / "export"), "--shards", str(demo_dir / "eval"), "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout)
    assert scores["images"] == 23 and 0 < scores["sam_deg"] < 90 and -1 <= scores["ssim"] <= 1

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((run / "export" / "config.json").read_text())
    data = (run / "export" / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = _run(["eval-recon", str(truncated), "--shards", str(demo_dir / "eval")], tmp_path)
    assert result.returncode == 2 and "model.safetensors" in result.stderr and "truncated" in result.stderr


@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_step=3"], r"max_step.*did you mean 'trainer.max_steps'"),
    (["objective=karmaa"], r"karmaa"),
    (["trainer.global_batch=102"], r"global_batch 102 is not divisible by batch_size 4"),
    (["objective.physics=1.0"], r"physics term but the model has no LSMM head"),
    (["model.embed_dim=30"], r"embed_dim 30 must be divisible by 4"),
    (["trainer.precision=bf16"], r"bf16 needs a GPU"),
    (["trainer.optim.lr=-0.001"], r"trainer.optim: lr must be a finite number > 0"),
    (["trainer.optim.lr=nan"], r"trainer.optim: lr must be a finite number > 0 .*got nan"),
    (["trainer.optim.base_lr=0"], r"base_lr must be a finite number > 0"),
    (["trainer.optim.betas=[0.9,1.5]"], r"betas must be two values in \[0, 1\)"),
    (["eval.mask_ratio=1.5"], r"eval: mask_ratio must be in \(0, 1\), got 1.5"),
])
def test_startup_errors_name_the_problem(demo_dir, tmp_path, overrides, message):
    result = _run(["pretrain", *_overrides(demo_dir, tmp_path / "run", *overrides)], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_band_set_without_wavelengths_fails_at_startup(tmp_path):
    from tests.conftest import shared_file

    salinas = shared_file("classification/salinasA/salinasA.npz")
    shards = tmp_path / "salinas"
    built = _run(["shards", "build", str(salinas), "--out", str(shards), "--quiet"], tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    result = _run(["pretrain", *MICRO, "data=shards", f"data.train.shards={shards}", f"data.eval.shards={shards}",
                   f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2
    assert "has no wavelengths" in result.stderr and "aviris" in result.stderr.lower()


def test_data_eval_configures_the_evaluation_loader(demo_dir, tmp_path):
    # data.eval.batch_size and data.eval.crop_size used to be ignored (eval.batch_size was read instead)
    result = _run(["pretrain", *_overrides(demo_dir, tmp_path / "run", "trainer.max_steps=1", "data.eval.batch_size=5",
                                           "data.eval.crop_size=16")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval"]["trained"]["images"] == 5  # eval.max_batches=1 batch of data.eval.batch_size
    refused = _run(["pretrain", *_overrides(demo_dir, tmp_path / "other", "data.eval.crop_size=10")], tmp_path)
    assert refused.returncode == 2 and "tiles of 10 px are not divisible by model.patch_size 4" in refused.stderr


def test_fingerprint_ignores_options_at_their_defaults_so_upgrades_keep_runs_resumable():
    from hsfm_train.stages.pretrain import fingerprint, load_pretrain_config

    config = load_pretrain_config([])
    explicit = load_pretrain_config(["model.group_mask_prob=0.0", "objective.physics_warmup_steps=0",
                                     "model.lsmm.init=random"])
    assert fingerprint(explicit) == fingerprint(config)  # an option spelled out at its default is the same run
    for override in ("model.group_mask_prob=0.5", "objective.decorrelation=0.5", "model.lsmm.num_endmembers=4",
                     "data.train.batch_size=8", "seed=3"):
        assert fingerprint(load_pretrain_config([override])) != fingerprint(config), override
