"""`hsfm eval-pairs` and the optical-SAR pair reader: the split by source image, retrieval and RankMe by hand,
a YAML manifest of PNG pairs, and a tiny end-to-end run on real Volkov pairs with a micro random backbone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hsfm_train.cli import main
from hsfm_train.data.pairs import held_out, read_pairs, select_split
from hsfm_train.engine.export import export_model
from hsfm_train.errors import ConfigError
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.metrics import effective_rank
from hsfm_train.stages.eval_pairs import EvalPairsStage, recall_at_k
from tests.conftest import shared_file

VOLKOV = "optical_sar/volkov_s1s2_aligned/volkov_s1s2_256.npz"
MICRO = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8, patch_size=4)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_split_keeps_each_source_image_on_one_side():
    pairs = read_pairs(shared_file(VOLKOV), {"indices": list(range(40))})
    held, train = select_split(pairs, "held_out", 0.2), select_split(pairs, "train", 0.2)
    assert len(held) + len(train) == 40 and held and train
    assert not {p.source for p in held} & {p.source for p in train}
    assert {p.name for p in held} | {p.name for p in train} == {p.name for p in pairs}
    # the rule is a property of the source name alone: the same in any subset, any order
    assert [p.name for p in select_split(pairs[::-1], "held_out", 0.2)] == [p.name for p in held][::-1]
    fraction = np.mean([held_out(f"source-{i}", 0.2) for i in range(4000)])
    assert 0.18 < fraction < 0.22


def test_recall_at_k_and_rankme_by_hand():
    similarity = np.array([[0.9, 0.1, 0.0],
                           [0.8, 0.5, 0.0],  # the correct column is second
                           [0.3, 0.3, 0.3]])  # a three-way tie counts against
    assert recall_at_k(similarity, [1, 2, 3]) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    assert effective_rank(np.eye(6)[:, :4] * 3.0, centre=False) == pytest.approx(4.0, rel=1e-6)  # four equal singular values
    line = np.outer(np.arange(1, 9), np.ones(5))
    assert effective_rank(line, centre=False) == pytest.approx(1.0, rel=1e-6)
    shared = np.eye(6)[:, :4] + 10.0  # what every row shares dominates RankMe; centring removes it
    assert effective_rank(shared, centre=False) < 1.5 < effective_rank(shared)


def test_a_manifest_of_png_pairs_is_read_with_its_options(tmp_path):
    rng = np.random.default_rng(0)
    entries = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"opt{i}.png")
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / f"sar{i}.png")
        entries.append(f"- {{path: opt{i}.png, pair: sar{i}.png, wavelengths_nm: [665, 560, 492]}}")
    manifest = tmp_path / "pairs.yaml"
    manifest.write_text("\n".join(entries) + "\n")
    pairs = read_pairs(manifest)
    assert len(pairs) == 2 and pairs[0].optical.shape == (16, 16, 3) and pairs[0].sar.shape == (16, 16, 1)
    np.testing.assert_allclose(pairs[1].optical_wavelengths, [665, 560, 492])
    assert pairs[0].sar_wavelengths[0] > 1e7  # C band, in nm
    np.testing.assert_allclose(pairs[0].optical * 255, np.asarray(Image.open(tmp_path / "opt0.png")), atol=1e-3)


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
    torch.manual_seed(0)
    return export_model(SpectralMAE(ModelConfig(**MICRO)).eval(), tmp_path_factory.mktemp("pairs") / "export")


def test_an_end_to_end_run_reports_retrieval_rank_and_reconstruction(micro_export, tmp_path, capsys):
    out = tmp_path / "out"
    common = [f"data.pairs={shared_file(VOLKOV)}", "data.reader.indices=[0,1,2,3,4,5,6,7]", "data.crop=16",
              "device=cpu"]
    assert main(["eval-pairs", f"backbone={micro_export}", *common, f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "SAR -> optical: R@1" in printed and "chance 12.5" in printed
    summary = json.loads((out / "summary.json").read_text())
    for key in ("sar_to_optical_r1", "sar_to_optical_r5", "optical_to_sar_r1", "optical_to_sar_r5",
                "effective_rank_optical", "effective_rank_sar", "pairs"):
        assert key in summary
    assert summary["pairs"] == 8 and summary["chance_r1"] == pytest.approx(1 / 8)
    assert 0.0 <= summary["sar_to_optical_r1"] <= summary["sar_to_optical_r5"] <= 1.0
    assert 1.0 <= summary["effective_rank_optical"] <= 8.0  # at most the number of pairs
    assert 1.0 <= summary["effective_rank_tokens_sar"] <= 32.0  # at most the embedding width
    for modality in ("optical", "sar"):
        entry = summary["reconstruction"][modality]
        assert entry["images"] == 8 and set(entry["baselines"]) == {"nearest_visible", "visible_mean"}
        assert np.isfinite(entry["model"]["psnr"])
    assert (out / "figures" / "singular_values.png").read_bytes()[:8] == PNG_MAGIC
    # the random-init control of the same architecture, fed the same way
    control = tmp_path / "control"
    assert main(["eval-pairs", "backbone=random", f"random_like={micro_export}", *common,
                 f"output_dir={control}"]) == 0
    assert "random init" in json.loads((control / "summary.json").read_text())["backbone"]


def test_config_errors_are_named_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError) as error:
        EvalPairsStage.load_config(["data.split=test", "data.crop=-1", "ks=[0]", f"data.pairs={tmp_path}/none.npz"])
    message = str(error.value)
    for part in ("data.split", "data.crop", "ks", "does not exist"):
        assert part in message
    out = tmp_path / "out"
    assert main(["eval-pairs", f"data.pairs={tmp_path}/none.npz", f"output_dir={out}"]) != 0
    assert not (out / "summary.json").exists()


def test_paired_shards_keep_one_split_and_can_mix_in_unpaired_samples(tmp_path):
    from hsfm_train.data.pairs import held_out
    from hsfm_train.data.shards import load_index

    manifest = tmp_path / "pairs.yaml"
    manifest.write_text(f"- {{path: {shared_file(VOLKOV)}, indices: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}}\n")
    scenes = {}
    for split in ("held_out", "train"):
        out = tmp_path / split
        assert main(["shards", "build", "--manifest", str(manifest), "--out", str(out), "--tile-size", "64",
                     "--split", split, "--held-out-fraction", "0.5", "--quiet"]) == 0
        records = load_index(out)["scenes"]
        assert records and all(record["has_pair"] for record in records)
        scenes[split] = {record["name"] for record in records}
    assert not scenes["held_out"] & scenes["train"] and len(scenes["held_out"] | scenes["train"]) == 12
    for name in scenes["held_out"]:
        source = name.split("_", 1)[1].rsplit("_", 1)[0]  # volkov_<source image>_<index>
        assert held_out(source, 0.5)
    mixed = tmp_path / "mixed"
    assert main(["shards", "build", "--manifest", str(manifest), "--out", str(mixed), "--tile-size", "64",
                 "--unpair-fraction", "0.5", "--quiet"]) == 0
    flags = [record["has_pair"] for record in load_index(mixed)["scenes"]]
    assert len(flags) == 12 and any(flags) and not all(flags)


def test_retrieval_centres_each_modality_so_a_shared_offset_is_not_evidence(micro_export, tmp_path, monkeypatch):
    """Pair i's two embeddings share a small signal s_i; each modality adds its own large constant. Centred,
    every pair is found first; raw, the constants decide."""
    import hsfm_train.stages.eval_pairs as eval_pairs

    rng = np.random.default_rng(0)
    signal = rng.normal(size=(8, 16))
    offsets = {"optical": np.r_[50.0, np.zeros(15)], "sar": np.r_[0.0, 50.0, np.zeros(14)]}
    tilt = {"optical": np.linspace(0, 3, 8)[:, None] * np.r_[0, 0, 1.0, np.zeros(13)],
            "sar": np.linspace(3, 0, 8)[:, None] * np.r_[0, 0, 1.0, np.zeros(13)]}

    def fake(model, data, batch_size, device, max_tokens):
        images = (signal + offsets[data.name] + tilt[data.name]).astype(np.float32)
        return images, images

    monkeypatch.setattr(eval_pairs, "embed_modality", fake)
    common = [f"backbone={micro_export}", f"data.pairs={shared_file(VOLKOV)}", "data.reader.indices=[0,1,2,3,4,5,6,7]",
              "data.crop=16", "reconstruction=false", "device=cpu"]
    centred = eval_pairs.EvalPairsStage(eval_pairs.load_eval_pairs_config([*common, f"output_dir={tmp_path}/a"]))
    raw = eval_pairs.EvalPairsStage(eval_pairs.load_eval_pairs_config([*common, "centre=false",
                                                                       f"output_dir={tmp_path}/b"]))
    assert centred.execute()["sar_to_optical_r1"] == 1.0
    assert raw.execute()["sar_to_optical_r1"] < 0.5


def test_tiles_cut_every_pair_into_its_own_smaller_pairs():
    from hsfm_train.data.pairs import ImagePair
    from hsfm_train.stages.eval_pairs import tile_pairs

    optical = np.arange(10 * 9 * 3, dtype=np.float32).reshape(10, 9, 3)
    pair = ImagePair("p", "src", optical, np.array([490.0, 560.0, 665.0]), optical[..., :1] * 2, np.array([5.5e7]))
    tiles = tile_pairs([pair], 4)
    assert [t.name for t in tiles] == ["p/r0c0", "p/r0c1", "p/r1c0", "p/r1c1"]  # the 2 px remainders dropped
    assert all(t.source == "src" and t.optical.shape == (4, 4, 3) and t.sar.shape == (4, 4, 1) for t in tiles)
    np.testing.assert_array_equal(tiles[3].optical, optical[4:8, 4:8])
    np.testing.assert_array_equal(tiles[2].sar, optical[4:8, 0:4, :1] * 2)  # SAR cut at the same place
    with pytest.raises(Exception, match="exceeds"):
        tile_pairs([pair], 12)


def test_a_tiled_run_scores_every_tile_as_a_pair(micro_export, tmp_path):
    out = tmp_path / "tiled"
    assert main(["eval-pairs", f"backbone={micro_export}", f"data.pairs={shared_file(VOLKOV)}",
                 "data.reader.indices=[0,1]", "data.crop=32", "data.tile=16", "reconstruction=false", "device=cpu",
                 f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["pairs"], summary["images"], summary["tile"]) == (8, 2, 16)
    assert summary["chance_r1"] == pytest.approx(1 / 8)


def test_the_pairs_table_pools_seeds_and_keeps_the_copy_baselines(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    def summary(r1: float, pairs: int, psnr: float | None = None) -> dict:
        entry = {"pairs": pairs, "chance_r1": 1 / pairs, "chance_r5": 5 / pairs, "sar_to_optical_r1": r1,
                 "optical_to_sar_r1": r1 / 2, "sar_to_optical_r5": 2 * r1, "optical_to_sar_r5": r1,
                 "effective_rank_optical": 4.0, "effective_rank_sar": 3.0, "effective_rank_tokens_optical": 20.0,
                 "effective_rank_tokens_sar": 10.0, "reconstruction": None}
        if psnr is not None:
            scores = {"model": {"psnr": psnr}, "baselines": {"nearest_visible": {"psnr": 17.0},
                                                             "visible_mean": {"psnr": 15.0}}}
            entry["reconstruction"] = {"optical": scores, "sar": scores}
        return entry

    for seed, r1 in ((0, 0.1), (1, 0.3)):
        for view, pairs in (("whole", 40), ("tiles", 640)):
            out = tmp_path / f"joint-s{seed}-{view}"
            out.mkdir()
            (out / "summary.json").write_text(json.dumps(summary(r1, pairs, 14.0 + seed if view == "whole" else None)))
    tool = Path(__file__).resolve().parents[1] / "tools" / "pairs_table.py"
    lines = subprocess.run([sys.executable, str(tool), str(tmp_path)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert lines[2].startswith("| chance (640 tile pairs; 40 image pairs) | - | 0.16 | 2.5 | 0.78 |")
    assert lines[3].endswith("| 17.00 / 17.00 |") and lines[4].endswith("| 15.00 / 15.00 |")
    assert lines[5].startswith("| joint | 2 | 20.00 +- 14.14 / 10.00 +- 7.07 | 20.0 +- 14.1 / 10.0 +- 7.1 |")
    assert lines[5].endswith("| 4.0 +- 0.0 / 3.0 +- 0.0; 20.0 +- 0.0 / 10.0 +- 0.0 | 14.50 +- 0.71 / 14.50 +- 0.71 |")
