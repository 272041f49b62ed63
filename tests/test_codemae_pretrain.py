"""CoDe-MAE pretraining (objective=codemae): the joint model and objective on micro sizes, unpaired batches,
distillation token by token, and `hsfm pretrain experiment=codemae` end to end on real Volkov pairs, whose export
the other stages load."""
from __future__ import annotations

import json

import pytest
import torch

from hsfm_train.cli import main
from hsfm_train.engine.export import export_model, load_pretrained
from hsfm_train.errors import ConfigError
from hsfm_train.models.codemae import JointHeadsConfig, JointOpticalSAR
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.objectives.pretrain import JointObjective, ObjectiveConfig
from tests.conftest import shared_file

MICRO = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8, patch_size=4)
RGB = torch.tensor([664.6, 559.8, 492.4])
VH = torch.tensor([5.5465763e7])
VOLKOV = "optical_sar/volkov_s1s2_aligned/volkov_s1s2_256.npz"
CODEMAE = ObjectiveConfig(name="codemae", joint=True, degraded=1.0, conditioned_contrastive=1.0,
                          rigid_contrastive=1.0, distillation=1.0, teacher="unused-here")


def _batch(count: int = 4, paired: bool = True) -> dict:
    generator = torch.Generator().manual_seed(0)
    batch = {"hsi": torch.randn(count, 3, 16, 16, generator=generator), "wavelengths": RGB.expand(count, -1).clone(),
             "band_mask": torch.ones(count, 3, dtype=torch.bool), "band_mean": torch.full((count, 3), 0.2),
             "band_std": torch.full((count, 3), 0.1)}
    if paired:
        batch["pair"] = torch.randn(count, 1, 16, 16, generator=generator)
        batch["pair_wavelengths"] = VH.expand(count, -1).clone()
    return batch


def _forward(model, batch, seed=0):
    return model(batch["hsi"], batch["wavelengths"], batch["band_mask"], batch.get("pair"),
                 batch.get("pair_wavelengths"), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    return SpectralMAE(ModelConfig(**{**MICRO, "embed_dim": 48, "num_heads": 4})).eval().requires_grad_(False)


def test_the_visible_ids_name_the_tokens_the_encoder_saw():
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig(**MICRO))
    batch = _batch()
    out = model(batch["hsi"], batch["wavelengths"], generator=torch.Generator().manual_seed(3))
    mask = out.token_mask.flatten(1)  # [N, G*P], True = masked
    for row in range(len(mask)):
        assert set(out.visible_ids[row].tolist()) == set((~mask[row]).nonzero().flatten().tolist())
    assert out.latent.shape[1] == 1 + out.visible_ids.shape[1]


def test_every_term_is_computed_and_distillation_compares_token_by_token(teacher):
    torch.manual_seed(0)
    model = JointOpticalSAR(ModelConfig(**MICRO), JointHeadsConfig(teacher_dim=48))
    batch = _batch()
    out = _forward(model, batch)
    loss, parts = JointObjective(CODEMAE, teacher)(model, out, batch, torch.ones(4, dtype=torch.bool))
    assert set(parts) == {"mse", "mse_sar", "degraded", "conditioned_contrastive", "rigid_contrastive",
                          "distillation"}
    torch.testing.assert_close(loss, sum(parts.values()))
    # distillation by hand: the teacher's tokens at the student's visible positions, layer-normed
    tokens = teacher.encode(batch["hsi"], batch["wavelengths"])[:, 1:]
    ids = out["optical"].visible_ids
    target = torch.stack([tokens[row, ids[row]] for row in range(4)])
    expected = torch.nn.functional.smooth_l1_loss(out["distilled"], torch.nn.functional.layer_norm(target, (48,)))
    torch.testing.assert_close(parts["distillation"], expected)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    # only the SWIR group's tokenizer and decoder head: neither RGB nor C-band SAR has a band there
    assert missing and all(name.split('.')[-2] == '1' and ('projections' in name or 'heads' in name)
                           for name in missing)
    assert all(p.grad is None for p in teacher.parameters())


def test_an_unpaired_batch_zeroes_the_cross_modal_terms_but_reaches_every_head(teacher):
    torch.manual_seed(0)
    model = JointOpticalSAR(ModelConfig(**MICRO), JointHeadsConfig(teacher_dim=48))
    batch = _batch(paired=False)
    out = _forward(model, batch)
    assert "sar" not in out
    loss, parts = JointObjective(CODEMAE, teacher)(model, out, batch, torch.zeros(4, dtype=torch.bool))
    assert parts["degraded"] == 0 and parts["conditioned_contrastive"] == 0 and parts["rigid_contrastive"] == 0
    torch.testing.assert_close(loss, parts["mse"] + parts["distillation"])
    loss.backward()
    for head in (model.optical_to_sar, model.sar_to_optical, model.pooling):
        assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in head.parameters())


@pytest.mark.parametrize("scoring", ["pairwise", "own_partner"])
def test_the_conditioned_term_scores_the_paired_samples_as_configured(scoring):
    from hsfm_train.objectives.codemae import info_nce, pairwise_conditioned_scores, score_info_nce

    torch.manual_seed(0)
    model = JointOpticalSAR(ModelConfig(**MICRO), JointHeadsConfig(conditioned_scoring=scoring))
    objective = ObjectiveConfig(name="codemae", joint=True, conditioned_contrastive=1.0, conditioned_scoring=scoring)
    batch = _batch()
    out = _forward(model, batch)
    paired = torch.tensor([True, True, False, True])
    _, parts = JointObjective(objective)(model, out, batch, paired)
    optical, sar = out["optical"].latent[paired, 1:], out["sar"].latent[paired, 1:]
    if scoring == "pairwise":
        expected = score_info_nce(pairwise_conditioned_scores(model.pooling, optical, sar))
    else:
        expected = info_nce(model.pooling(optical, sar), model.pooling(sar, optical))
    torch.testing.assert_close(parts["conditioned_contrastive"], expected)


def test_sampled_negatives_score_each_sample_against_k_others_drawn_from_the_step_generator():
    from hsfm_train.objectives.codemae import sampled_conditioned_scores, sampled_score_info_nce

    torch.manual_seed(0)
    model = JointOpticalSAR(ModelConfig(**MICRO), JointHeadsConfig(conditioned_negatives=2))
    objective = ObjectiveConfig(name="codemae", joint=True, conditioned_contrastive=1.0, conditioned_negatives=2)
    batch = _batch(count=6)
    out = _forward(model, batch, seed=3)
    assert "conditioned_scores" not in out and out["conditioned_candidates"].shape == (6, 2)
    paired = torch.ones(6, dtype=torch.bool)
    _, parts = JointObjective(objective)(model, out, batch, paired)
    optical, sar = out["optical"].latent[:, 1:], out["sar"].latent[:, 1:]
    expected = sampled_score_info_nce(*sampled_conditioned_scores(model.pooling, optical, sar,
                                                                  out["conditioned_candidates"]),
                                      out["conditioned_candidates"], paired)
    torch.testing.assert_close(parts["conditioned_contrastive"], expected)
    again = _forward(model, batch, seed=3)  # a resumed step draws the same negatives
    assert torch.equal(again["conditioned_candidates"], out["conditioned_candidates"])
    # k >= batch - 1 is every other pair: the full matrix
    assert "conditioned_scores" in _forward(JointOpticalSAR(ModelConfig(**MICRO),
                                                            JointHeadsConfig(conditioned_negatives=5)), batch)
    with pytest.raises(ConfigError, match="conditioned_negatives must be >= 0"):
        ObjectiveConfig(joint=True, conditioned_contrastive=1.0, conditioned_negatives=-1)


def test_the_pooling_runs_only_when_the_conditioned_term_is_on():
    torch.manual_seed(0)
    model = JointOpticalSAR(ModelConfig(**MICRO), JointHeadsConfig(conditioned_scoring=None))
    out = _forward(model, _batch())
    assert not {"conditioned_scores", "optical_conditioned", "sar_conditioned"} & set(out)
    with pytest.raises(ConfigError, match="conditioned_scoring must be one of"):
        ObjectiveConfig(joint=True, conditioned_contrastive=1.0, conditioned_scoring="diagonal")
    with pytest.raises(ValueError, match="not one of"):
        JointHeadsConfig(conditioned_scoring="diagonal")


def test_cross_modal_terms_without_joint_or_a_teacher_are_refused():
    with pytest.raises(ConfigError, match="need joint=true"):
        ObjectiveConfig(degraded=1.0)
    with pytest.raises(ConfigError, match="needs objective.teacher"):
        ObjectiveConfig(joint=True, distillation=1.0)
    with pytest.raises(ConfigError, match="hyperspectral cubes"):
        ObjectiveConfig(joint=True, physics=1.0)


def test_hsfm_pretrain_experiment_codemae_runs_end_to_end_and_exports_a_plain_backbone(tmp_path, teacher):
    teacher_export = export_model(teacher, tmp_path / "teacher")
    out = tmp_path / "run"
    micro = [f"model.{key}={value}" for key, value in MICRO.items()]
    code = main(["pretrain", "experiment=codemae", *micro, f"objective.teacher={teacher_export}",
                 f"data.pairs.path={shared_file(VOLKOV)}",
                 "data.pairs.reader.indices=[0,1,2,3,4,5,6,7,8,9,10,11]", "data.pairs.tile_size=32",
                 "data.pairs.held_out_fraction=0.5", "data.pairs.unpair_fraction=0.5",
                 f"data.pairs.output_dir={tmp_path / 'shards'}", "data.train.batch_size=8", "trainer.max_steps=4",
                 "trainer.checkpoint_every=2", "trainer.figure_every=0", "eval.max_batches=1", f"output_dir={out}"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "train/loss" in r]
    assert trained and all("train/mse" in r and "train/distillation" in r for r in trained)
    fractions = {r["train/paired_fraction"] for r in trained}
    assert fractions <= {0.0, 1.0}  # a batch is paired or unpaired
    backbone = load_pretrained(out / "export")
    assert type(backbone) is SpectralMAE
    encoded = backbone.encode(torch.rand(1, 1, 16, 16), VH)  # SAR through the exported backbone
    assert encoded.shape == (1, 1 + 16, MICRO["embed_dim"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "codemae"
    # the shortcut diagnostic reads the run's checkpoint (heads included) and scores true against false pairs
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "codemae_shortcut.py"
    printed = subprocess.run([sys.executable, str(tool), str(out), "--pairs", str(shared_file(VOLKOV)), "--tiles", "8"],
                             capture_output=True, text=True, check=True).stdout
    assert "8 held-out 64 px tile pairs" in printed and "false pairs" in printed and "chance 12.5 %" in printed


def test_two_ranks_train_when_one_has_a_paired_batch_and_the_other_not(tmp_path, teacher):
    """DDP with unpaired samples: a rank whose batch has no SAR partner still reaches every cross-modal head
    inside its forward, and the ranks agree on the loss parts they log although their parts differ."""
    from tests.runs import hsfm_script, torchrun

    teacher_export = export_model(teacher, tmp_path / "teacher")
    script = tmp_path / "hsfm_cli.py"
    script.write_text(hsfm_script()[2])
    out = tmp_path / "run"
    micro = [f"model.{key}={value}" for key, value in MICRO.items()]
    result = torchrun(2, [str(script), "pretrain", "experiment=codemae", *micro,
                          f"objective.teacher={teacher_export}",
                          f"data.pairs.path={shared_file(VOLKOV)}",
                          "data.pairs.reader.indices=[0,1,4,5,10,11]", "data.pairs.tile_size=32",  # 2 + 2 train
                          "data.pairs.held_out_fraction=0.5", "data.pairs.unpair_fraction=0.5",
                          f"data.pairs.output_dir={tmp_path / 'shards'}", "data.train.batch_size=2",
                          "trainer.max_steps=12", "trainer.log_every=1", "trainer.checkpoint_every=6",
                          "trainer.figure_every=0", "trainer.wandb=false", "trainer.progress=false",
                          "eval.max_batches=1", f"output_dir={out}"], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    trained = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in trained if "train/loss" in r]
    assert len(trained) == 12
    fractions = [r["train/paired_fraction"] for r in trained]
    assert 0.5 in fractions, fractions  # the ranks' batches differed at least once
    assert all("train/mse_sar" in r for r in trained if r["train/paired_fraction"] > 0)
    assert all("train/mse_sar" not in r for r in trained if r["train/paired_fraction"] == 0)
    assert type(load_pretrained(out / "export")) is SpectralMAE
