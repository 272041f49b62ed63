"""`hsfm fewshot` end to end on a 20 x 20 crop of real Salinas-A (3 classes) with tiny random backbones: the
outputs, a frozen backbone, what the pseudo-labels may read (transductive: never the query labels; inductive:
label-0 pixels only), a ground-truth-only Urban crop as source with mixup DA, reuse of finished seeds, and config
errors named before anything is written. Random weights: the tests check the machinery, not accuracy."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hsfm_train.stages.fewshot as fewshot
from hsfm_train.cli import main
from hsfm_train.data.readers import read_scene
from hsfm_train.engine.export import export_model, load_pretrained
from hsfm_train.errors import ConfigError
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.stages.fewshot import FewshotStage
from tests.conftest import shared_file

MICRO = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8, patch_size=4)
QUICK = ["shots=2", "seeds=2", "patch_size=5", "source_episodes=3", "target_episodes=4", "pseudo_label_every=2",
         "episodes.n_support=2", "episodes.n_query=3", "embedding_dim=16", "device=cpu"]
SUMMARY_KEYS = {"oa_mean", "oa_std", "aa_mean", "aa_std", "kappa_mean", "kappa_std", "per_seed", "seeds", "shots",
                "complete", "runs_reused", "backbone", "trainable_parameters", "total_parameters", "mode", "adapter",
                "mixup_da", "pseudo_labelling", "sources", "seconds_per_seed", "chance_oa", "config"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    """Salinas-A rows 60-79, columns 8-27 (classes 10, 13, 14 with 33, 61 and 185 pixels; 121 unlabelled),
    every 4th corrected band (51), as a scene file with its band centres."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the preset's calibration note
        scene = read_scene(shared_file("classification/salinasA/salinasA.npz"), sensor_preset="aviris",
                           bands="corrected")
    path = tmp_path_factory.mktemp("salinasA") / "salinasA_crop.npz"
    np.savez(path, cube=scene.cube[60:80, 8:28, ::4], labels=scene.labels[60:80, 8:28],
             wavelengths_nm=scene.wavelengths_nm[::4])
    return path


@pytest.fixture(scope="module")
def urban_crop(tmp_path_factory):
    """Urban's ground truth only (no cube), rows 60-79, columns 0-19: all four materials dominate somewhere."""
    truth = np.load(shared_file("unmixing/urban/urban_gt_end4.npz"))
    path = tmp_path_factory.mktemp("urban") / "urban_gt_crop.npz"
    np.savez(path, endmembers=truth["endmembers"], abundances=truth["abundances"][60:80, 0:20],
             endmember_names=truth["endmember_names"])
    return path


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
    torch.manual_seed(0)
    return export_model(SpectralMAE(ModelConfig(**MICRO)).eval(), tmp_path_factory.mktemp("fewshot") / "export")


def fewshot_run(tmp_path, *overrides: str) -> dict:
    config = FewshotStage.load_config([*QUICK, f"output_dir={tmp_path}", *overrides])
    return FewshotStage(config).execute()


def test_an_end_to_end_run_writes_the_summary_seed_records_and_figures(crop, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["fewshot", "backbone=random", f"data.target={crop}", *QUICK, f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "chance 33.3 %" in printed and "trainable of" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["complete"] and summary["seeds"] == 2 and summary["shots"] == 2 and summary["runs_reused"] == 0
    assert summary["mode"] == "transductive" and summary["adapter"]["kind"] == "cp" and summary["sources"] == []
    assert not summary["mixup_da"] and summary["chance_oa"] == pytest.approx(1 / 3)
    assert "preset 'tiny'" in summary["backbone"]
    assert [record["seed"] for record in summary["per_seed"]] == [0, 1]
    assert 0.0 <= summary["oa_mean"] <= 1.0 and 0.0 <= summary["aa_mean"] <= 1.0 and summary["kappa_mean"] <= 1.0
    for number, record in enumerate(summary["per_seed"]):
        assert 0.0 <= record["oa"] <= 1.0 and np.array(record["confusion"]).shape == (3, 3)
        assert np.sum(record["confusion"]) == record["query_pixels"] == 279 - 6
        assert record["pseudo_label_updates"] == 2 and 0.0 <= record["pseudo_label_accuracy"] <= 1.0
        saved = json.loads((out / "runs" / f"run_{number:03d}.json").read_text())
        assert saved["run"] == record and "identity" in saved
        with np.load(out / "runs" / f"run_{number:03d}.npz") as arrays:
            assert arrays["predicted"].shape == (20, 20)
    for name in ("confusion", "classification_map"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    assert "baseline input spectra, logistic regression: OA" in printed
    assert set(summary["baselines"]) == {"spectra_linear", "spectra_prototypes", "spectra_propagation"}
    for entry in summary["baselines"].values():
        assert len(entry["oa_per_seed"]) == 2 and 0.0 <= entry["oa_mean"] <= 1.0
    tool = Path(__file__).resolve().parents[1] / "tools" / "fewshot_table.py"
    table = subprocess.run([sys.executable, str(tool), str(out)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    oa = f"{100 * summary['oa_mean']:.1f} +- {100 * summary['oa_std']:.1f}"
    linear = summary["baselines"]["spectra_linear"]
    expected = f"| {summary['target_name']} | random init | cp | tile | propagation | transductive | off | - | 2 | {oa}"
    assert table[2].startswith(expected), table
    assert f"| {100 * linear['oa_mean']:.1f} +- {100 * linear['oa_std']:.1f} |" in table[2]


def test_the_spectra_baselines_score_each_seeds_own_split(crop):
    """The nearest-class-mean baseline by hand, on seed 1's split: standardise on the support, class means,
    nearest mean."""
    from hsfm_train.fewshot.episodes import target_split

    config = fewshot.load_fewshot_config(["backbone=random", f"data.target={crop}", *QUICK])
    target = fewshot.read_inputs(config).target
    found = fewshot.input_spectra_baselines(target, fewshot.draw_splits(target, config)[0], config)
    split = target_split(target.labels.reshape(target.shape), config.shots, seed=1)
    x = target.cube.reshape(-1, target.cube.shape[-1]).astype(np.float64)
    mean, std = x[split.support].mean(0), x[split.support].std(0)
    z = (x - mean) / np.where(std > 0, std, 1)
    centres = np.stack([z[split.support][split.support_labels == i].mean(0) for i in range(len(target.classes))])
    nearest = np.argmin(((z[split.query][:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    expected = np.mean(np.asarray(target.classes)[nearest] == target.labels[split.query])
    assert found["spectra_prototypes"]["oa_per_seed"][1] == pytest.approx(expected)
    assert len(found["spectra_linear"]["oa_per_seed"]) == config.seeds
    assert len(found["spectra_propagation"]["oa_per_seed"]) == config.seeds
    inductive = fewshot.input_spectra_baselines(target, fewshot.draw_splits(target, config)[0],
                                                fewshot.replace(config, mode="inductive"))
    assert "spectra_propagation" not in inductive  # it reads the query pixels' spectra: transductive only


@pytest.mark.parametrize("kind", ["cp", "lora"])
def test_the_backbone_stays_frozen_and_only_the_adapter_and_head_train(kind, crop, micro_export, tmp_path,
                                                                      monkeypatch):
    results = []
    run_seed = fewshot.run_seed
    monkeypatch.setattr(fewshot, "run_seed", lambda *a, **k: results.append(run_seed(*a, **k)) or results[-1])
    summary = fewshot_run(tmp_path, f"backbone={micro_export}", f"data.target={crop}", f"adapter.kind={kind}")
    exported = load_pretrained(micro_export).state_dict()
    d, dim, depth, heads = MICRO["embed_dim"] // MICRO["num_heads"], MICRO["embed_dim"], MICRO["depth"], \
        MICRO["num_heads"]
    adapter = depth * heads * d * d if kind == "cp" else depth * 8 * (dim + 3 * dim)  # lora_rank 8
    head = dim * 16 + 16
    assert summary["trainable_parameters"] == adapter + head
    assert summary["parameters"] == {"adapter": adapter, "head": head,
                                     "backbone_frozen": summary["total_parameters"] - adapter - head}
    assert len(results) == 2
    for result in results:
        embedder = result.embedder
        state = embedder.backbone.state_dict()
        frozen = {k for k in state if k in exported}
        assert frozen and all(torch.equal(state[k], exported[k]) for k in frozen)
        trainable = {n for n, p in embedder.named_parameters() if p.requires_grad}
        assert all(n.startswith("head.") or "coalescent" in n or "lora_" in n for n in trainable)
        assert sum(p.numel() for p in embedder.parameters() if p.requires_grad) == adapter + head
        # they did train: the adapter moved away from its initialisation
        config = FewshotStage.load_config([*QUICK, f"adapter.kind={kind}", f"data.target={crop}"])
        fresh = fewshot.new_embedder(load_pretrained(micro_export), config, result.record["seed"])
        fresh_state = fresh.backbone.state_dict()
        moved = [k for k in state if k not in exported and not torch.equal(state[k], fresh_state[k])]
        assert moved
    for key, value in load_pretrained(micro_export).state_dict().items():  # the export on disk is untouched
        assert torch.equal(value, exported[key])


def _capture(monkeypatch, name: str) -> list:
    captured = []
    original = getattr(fewshot, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append((args, result))
        return result
    monkeypatch.setattr(fewshot, name, wrapper)
    return captured


def test_a_run_that_trains_nothing_reads_the_backbones_own_features(crop, micro_export, tmp_path, monkeypatch):
    """target_episodes=0 without a source: no adapter at its random init, no random head; the adapter kind then
    changes nothing."""
    seeds = _capture(monkeypatch, "run_seed")
    frozen = ["target_episodes=0", "pseudo_labelling=false", "readout=tile+centre"]
    by_kind = {kind: fewshot_run(tmp_path / kind, f"backbone={micro_export}", f"data.target={crop}",
                                 f"adapter.kind={kind}", *frozen) for kind in ("cp", "lora")}
    for summary in by_kind.values():
        assert summary["trainable_parameters"] == 0
        assert any("nothing trains" in note for note in summary["notes"])
    assert by_kind["cp"]["oa_per_seed"] == by_kind["lora"]["oa_per_seed"]
    tool = Path(__file__).resolve().parents[1] / "tools" / "fewshot_table.py"
    table = subprocess.run([sys.executable, str(tool), str(tmp_path / "cp")], capture_output=True, text=True,
                           check=True).stdout
    assert "| none (trains nothing) | tile+centre |" in table
    exported = load_pretrained(micro_export).state_dict()
    for _, result in seeds:
        embedder = result.embedder
        assert isinstance(embedder.head, torch.nn.Identity) and embedder.output_dim == 2 * MICRO["embed_dim"]
        state = embedder.backbone.state_dict()
        assert set(state) <= set(exported) and all(torch.equal(state[k], exported[k]) for k in state)  # no adapter
    trained = fewshot_run(tmp_path / "trained", f"backbone={micro_export}", f"data.target={crop}", "seeds=1",
                          "readout=tile+centre")
    assert trained["trainable_parameters"] > 0 and isinstance(seeds[-1][1].embedder.head, torch.nn.Linear)


def test_transductive_pseudo_labels_never_read_the_query_labels(crop, micro_export, tmp_path, monkeypatch):
    """The same support; the query pixels' labels shuffled among them: pseudo-labels, trained model and
    predictions are identical; only the scores (which read the query labels, after training) change."""
    with np.load(crop) as arrays:
        scene = {k: arrays[k] for k in arrays.files}
    original = scene["labels"].copy()
    split = fewshot.target_split(original, 2, seed=0)
    shuffled = original.reshape(-1).copy()
    shuffled[split.query] = shuffled[np.random.default_rng(0).permutation(split.query)]
    assert (shuffled != original.reshape(-1)).sum() > 50
    changed = tmp_path / "shuffled.npz"
    np.savez(changed, **{**scene, "labels": shuffled.reshape(original.shape)})
    target_split = fewshot.target_split
    monkeypatch.setattr(fewshot, "target_split", lambda labels, shots, seed: target_split(original, shots, seed))

    outcomes = []
    for number, path in enumerate((crop, changed)):
        pseudo = _capture(monkeypatch, "compute_pseudo_labels")
        scores = _capture(monkeypatch, "classification_scores")
        summary = fewshot_run(tmp_path / str(number), "backbone=random", f"random_like={micro_export}",
                              f"data.target={path}", "seeds=1")
        outcomes.append(([(r.indices, r.classes, r.pool) for _, r in pseudo], scores[0][0][1], summary))
    (first_pseudo, first_predicted, first), (second_pseudo, second_predicted, second) = outcomes
    assert len(first_pseudo) == len(second_pseudo) == 3  # two updates, and the final propagation
    for (a_index, a_class, a_pool), (b_index, b_class, b_pool) in zip(first_pseudo, second_pseudo):
        np.testing.assert_array_equal(a_pool, split.query)
        np.testing.assert_array_equal(a_index, b_index)
        np.testing.assert_array_equal(a_class, b_class)
        np.testing.assert_array_equal(a_pool, b_pool)
    np.testing.assert_array_equal(first_predicted, second_predicted)
    assert first["per_seed"][0]["loss"] == second["per_seed"][0]["loss"]
    assert first["oa_mean"] != second["oa_mean"]


def test_inductive_pseudo_labels_come_from_unlabelled_pixels_only(crop, micro_export, tmp_path, monkeypatch):
    pseudo = _capture(monkeypatch, "compute_pseudo_labels")
    summary = fewshot_run(tmp_path, "backbone=random", f"random_like={micro_export}", f"data.target={crop}",
                          "mode=inductive", "seeds=1")
    labels = np.load(crop)["labels"].reshape(-1)
    assert pseudo
    for _, result in pseudo:
        np.testing.assert_array_equal(result.pool, np.flatnonzero(labels == 0))
        assert len(result.indices) and (labels[result.indices] == 0).all()
    record = summary["per_seed"][0]
    assert summary["mode"] == "inductive" and record["pseudo_label_pool"] == 121
    assert record["pseudo_label_accuracy"] is None  # the pool has no labels to check against


def test_a_ground_truth_only_source_runs_with_mixup_and_records_lambda(crop, urban_crop, micro_export, tmp_path,
                                                                       monkeypatch):
    mixed_inputs = []
    mix = fewshot.mix
    monkeypatch.setattr(fewshot, "mix", lambda a, b, lam: mixed_inputs.append(a.dim()) or mix(a, b, lam))
    summary = fewshot_run(tmp_path, f"backbone={micro_export}", f"data.target={crop}", f"data.source=[{urban_crop}]",
                          "data.source_reader.sensor_preset=hydice_urban162", "pca_bands=6", "readout=centre", "seeds=1")
    assert summary["mixup_da"] and summary["pca_bands"] == 6
    (source,) = summary["sources"]
    assert source["kind"].startswith("semi-real") and source["classes"] == [1, 2, 3, 4]
    assert source["shape"] == [20, 20, 6]
    record = summary["per_seed"][0]
    assert record["mixup_episodes"] == 4 and record["loss"]["source"]["episodes"] == 3
    trajectory = record["lambda_trajectory"]
    assert len(trajectory) == 4 and all(0.0 <= point["lambda"] <= 1.0 for point in trajectory)
    assert trajectory[0]["distance_ratio"] == 1.0
    assert 4 in mixed_inputs  # pca_bands: one band count, so the patches were mixed too


@pytest.mark.parametrize("readout", ["tile", "tile+centre"])
def test_the_tile_readout_runs_with_a_source_crop_and_mixes_embeddings_only(readout, crop, urban_crop, micro_export,
                                                                           tmp_path, monkeypatch):
    mixed_inputs = []
    mix = fewshot.mix
    monkeypatch.setattr(fewshot, "mix", lambda a, b, lam: mixed_inputs.append(a.dim()) or mix(a, b, lam))
    windows = []
    crop_episode = fewshot.crop_source_episode
    monkeypatch.setattr(fewshot, "crop_source_episode",
                        lambda *a, **k: windows.append(crop_episode(*a, **k)) or windows[-1])
    summary = fewshot_run(tmp_path, f"backbone={micro_export}", f"data.target={crop}", f"data.source=[{urban_crop}]",
                          "data.source_reader.sensor_preset=hydice_urban162", f"readout={readout}", "source_crop=12",
                          "seeds=1")
    assert summary["readout"] == readout and summary["mixup_da"]
    record = summary["per_seed"][0]
    assert record["mixup_episodes"] == 4 and record["loss"]["source"]["episodes"] == 3
    assert len(windows) == 3 + 4 and all(draw.window[2:] == (12, 12) for draw in windows)
    assert mixed_inputs and 4 not in mixed_inputs  # 51 vs 162 bands, and tiles: embeddings only
    assert 0.0 <= record["oa"] <= 1.0


def test_prediction_by_label_propagation_scores_the_propagated_query_labels(crop, micro_export, tmp_path,
                                                                           monkeypatch):
    pseudo = _capture(monkeypatch, "compute_pseudo_labels")
    scores = _capture(monkeypatch, "classification_scores")
    summary = fewshot_run(tmp_path, "backbone=random", f"random_like={micro_export}", f"data.target={crop}",
                          "predict=propagation", "seeds=1")
    record = summary["per_seed"][0]
    split = fewshot.target_split(np.load(crop)["labels"], 2, seed=0)
    (_, final) = pseudo[-1]
    np.testing.assert_array_equal(final.pool, split.query)  # the last propagation spans every query pixel
    classes = np.array([10, 13, 14])
    (_, by_prototype), (arguments, by_propagation) = scores[-2:]  # after the spectra baselines'
    propagated = arguments[1]
    np.testing.assert_array_equal(propagated, classes[final.pool_classes])
    assert record["oa"] == record["oa_propagation"] == pytest.approx(by_propagation["oa"])
    assert record["oa_prototype"] == pytest.approx(by_prototype["oa"])
    with np.load(tmp_path / "runs" / "run_000.npz") as arrays:
        predicted = arrays["predicted"].reshape(-1)
    np.testing.assert_array_equal(predicted[split.query], propagated)
    np.testing.assert_array_equal(predicted[split.support], classes[split.support_labels])
    assert summary["predict"] == "propagation" and "oa_prototype_mean" in summary
    with pytest.raises(ConfigError, match="predict=propagation .* mode=transductive"):
        FewshotStage.load_config([*QUICK, "predict=propagation", "mode=inductive", f"data.target={crop}"])


def test_synthetic_usgs_sources_are_labelled_by_their_dominant_material(crop, micro_export, tmp_path):
    from hsfm_train.data.synthetic import generate_scenes

    settings = ["data.synthetic_sources.count=2", "data.synthetic_sources.height=16",
                "data.synthetic_sources.width=16", "data.synthetic_sources.num_endmembers=3"]
    config = FewshotStage.load_config([*QUICK, f"backbone={micro_export}", f"data.target={crop}", *settings])
    inputs = fewshot.read_inputs(config)
    expected = list(generate_scenes(config.data.synthetic_sources.scene_config(), 2, 0))
    assert [s.name for s in inputs.sources] == [scene.name for scene in expected]
    for domain, scene in zip(inputs.sources, expected):
        assert domain.kind.startswith("synthetic USGS") and domain.shape == (16, 16)
        np.testing.assert_array_equal(domain.labels, scene.abundances.reshape(-1, 3).argmax(axis=1) + 1)
        np.testing.assert_allclose(domain.wavelengths, scene.wavelengths_nm)
    summary = fewshot_run(tmp_path, f"backbone={micro_export}", f"data.target={crop}", *settings, "seeds=1")
    assert summary["mixup_da"] and len(summary["sources"]) == 2
    assert summary["per_seed"][0]["loss"]["source"]["episodes"] == 3
    with pytest.raises(ConfigError, match="synthetic_sources"):
        FewshotStage.load_config([*QUICK, f"data.target={crop}", "data.synthetic_sources.count=1",
                                  "data.synthetic_sources.grid=nowhere"])


def test_finished_seeds_are_reused_and_a_changed_setting_redoes_them(crop, micro_export, tmp_path, monkeypatch):
    common = ["backbone=random", f"random_like={micro_export}", f"data.target={crop}"]
    first = fewshot_run(tmp_path, *common, "seeds=1")
    assert first["complete"] and first["runs_reused"] == 0
    calls = []
    run_seed = fewshot.run_seed
    monkeypatch.setattr(fewshot, "run_seed", lambda inputs, config, seed, device, split: calls.append(seed)
                        or run_seed(inputs, config, seed, device, split))
    more = fewshot_run(tmp_path, *common, "seeds=2")
    assert calls == [1] and more["runs_reused"] == 1 and more["seeds"] == 2 and more["complete"]
    assert more["per_seed"][0] == first["per_seed"][0]
    assert fewshot_run(tmp_path, *common, "seeds=2", "device=cpu")["runs_reused"] == 2  # auto resolved to cpu here
    assert calls == [1]
    changed = fewshot_run(tmp_path, *common, "seeds=2", "target_episodes=3")
    assert calls == [1, 0, 1] and changed["runs_reused"] == 0


def test_config_errors_are_named_together_before_anything_is_written(crop, tmp_path, capsys):
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, cube=np.zeros((4, 4, 3), np.float32), wavelengths_nm=np.array([500.0, 600.0, 700.0]))
    out = tmp_path / "out"
    overrides = ["backbone=random", f"data.target={unlabelled}", f"data.source=[{unlabelled},{tmp_path / 'no.npz'}]",
                 "adapter.kind=prompt", "shots=0", "seeds=0", "patch_size=4", "mode=sideways", f"output_dir={out}"]
    with pytest.raises(ConfigError) as error:
        FewshotStage.load_config(overrides)
    message = str(error.value)
    for needle in ("adapter.kind must be one of cp, lora, linear, got 'prompt'", "shots must be >= 1",
                   "seeds must be >= 1", "patch_size must be an odd", "mode must be one of",
                   f"data.target {unlabelled} has no labels", f"data.source {unlabelled} has no labels",
                   f"data.source {tmp_path / 'no.npz'} does not exist"):
        assert needle in message
    assert main(["fewshot", *overrides]) == 2 and "adapter.kind" in capsys.readouterr().err
    # inputs alone are checked when the stage starts: the config prints without them
    assert main(["fewshot", "--print-config"]) == 0 and "target_episodes" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="data.target must be set"):
        fewshot_run(out, "backbone=random")
    # found only by reading the file: a label map of zeros; still nothing written
    empty = tmp_path / "empty.npz"
    np.savez(empty, cube=np.zeros((4, 4, 3), np.float32), labels=np.zeros((4, 4), np.int16),
             wavelengths_nm=np.array([500.0, 600.0, 700.0]))
    with pytest.raises(ConfigError, match="no labelled pixels"):
        fewshot_run(out, "backbone=random", f"data.target={empty}")
    assert not out.exists()


def test_the_readout_study_scores_every_frozen_feature_set(crop, micro_export):
    tool = Path(__file__).resolve().parents[1] / "tools" / "fewshot_readouts.py"
    printed = subprocess.run([sys.executable, str(tool), f"backbone={micro_export}", f"data.target={crop}",
                              "shots=2", "seeds=2", "device=cpu"], capture_output=True, text=True, check=True).stdout
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert names == ["tile", "centre 5x5", "centre 7x7", "centre 9x9", "mean 9x9", "input spectrum",
                     "tile + centre 5x5", "tile + centre 7x7", "tile + centre 9x9"]
    for row in rows:
        oa = float(row.split(" | ")[1].split(" +- ")[0])
        assert 0.0 <= oa <= 100.0
