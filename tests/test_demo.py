"""The packaged demo data behind `hsfm pretrain` with no arguments: asset fidelity, splits, band sets, caching."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from hsfm_train.data.demo import DEMO_FILE, DemoDataConfig, build_demo_shards, load_demo_samson
from hsfm_train.data.shards import iter_raw_samples, load_index, shard_urls, verify_shards
from hsfm_train.errors import ConfigError
from tests.conftest import shared_file

SAMSON_ROWS = 95
FLOAT16_TOLERANCE = 2.5e-4  # half a float16 ulp just below 1.0 is 2.44e-4


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, build_demo_shards(root)


def _tile_metas(shard_dir) -> list[dict]:
    metas = []
    for url in shard_urls(load_index(shard_dir)):
        with open(url, "rb") as handle:
            metas += [json.loads(raw["meta.json"]) for _, raw in iter_raw_samples(handle, url, {})]
    return metas


def _samson_rows(index: dict) -> tuple[int, int]:
    """The Samson row range a split was cropped from, as recorded in its scene's source."""
    (record,) = [scene for scene in index["scenes"] if scene["sensor"] == "samson"]
    start, stop = map(int, re.search(r"rows (\d+):(\d+)$", record["source"]).groups())
    return start, stop


def test_demo_build_has_both_splits_and_every_band_set(demo_build):
    _, (train_dir, eval_dir) = demo_build
    for shard_dir in (train_dir, eval_dir):
        index = load_index(shard_dir)
        assert index["total_samples"] > 0
        assert sorted(band_set["bands"] for band_set in index["band_sets"].values()) == [156, 218, 224]
        for band_set in index["band_sets"].values():
            assert band_set["samples"] > 0
            assert band_set["wavelengths_nm"] is not None and np.isfinite(band_set["wavelengths_nm"]).all()
        report = verify_shards(index)
        assert report["problems"] == [] and report["samples"] == index["total_samples"]


def test_demo_splits_share_no_samson_rows_and_no_synthetic_scene(demo_build):
    _, (train_dir, eval_dir) = demo_build
    config = DemoDataConfig()
    train_index, eval_index = load_index(train_dir), load_index(eval_dir)
    split_row = SAMSON_ROWS - config.holdout_rows
    assert _samson_rows(train_index) == (0, split_row)
    assert _samson_rows(eval_index) == (split_row, SAMSON_ROWS)

    for shard_dir, (first_row, stop_row) in ((train_dir, (0, split_row)), (eval_dir, (split_row, SAMSON_ROWS))):
        samson_tiles = [meta for meta in _tile_metas(shard_dir) if meta["sensor"] == "samson"]
        assert samson_tiles
        for meta in samson_tiles:
            top = first_row + meta["origin"][0]  # origins are relative to the cropped scene
            assert first_row <= top and top + meta["size"][0] <= stop_row

    def synthetic_seeds(index):
        return {scene["name"].rsplit("_", 1)[1] for scene in index["scenes"] if scene["sensor"] != "samson"}

    assert len(synthetic_seeds(train_index)) == config.synthetic_scenes
    assert len(synthetic_seeds(eval_index)) == config.holdout_synthetic
    assert not synthetic_seeds(train_index) & synthetic_seeds(eval_index)


def test_demo_build_is_reused_until_the_config_changes(tmp_path):
    config = DemoDataConfig(synthetic_scenes=2, holdout_synthetic=1)
    train_dir, eval_dir = build_demo_shards(tmp_path, config)
    stamps = [(d / "index.json").stat().st_mtime_ns for d in (train_dir, eval_dir)]

    # Same config, grids given as a list (as from a config file): reused, nothing rewritten.
    same = DemoDataConfig(synthetic_scenes=2, holdout_synthetic=1, synthetic_grids=list(config.synthetic_grids))
    assert build_demo_shards(tmp_path, same) == (train_dir, eval_dir)
    assert [(d / "index.json").stat().st_mtime_ns for d in (train_dir, eval_dir)] == stamps

    changed = DemoDataConfig(synthetic_scenes=4, holdout_synthetic=1)
    build_demo_shards(tmp_path, changed)
    assert (train_dir / "index.json").stat().st_mtime_ns != stamps[0]
    assert load_index(train_dir)["total_samples"] > 0
    assert len(load_index(train_dir)["scenes"]) == 1 + changed.synthetic_scenes
    assert json.loads((tmp_path / DEMO_FILE).read_text())["config"]["synthetic_scenes"] == 4


def test_demo_config_rejects_a_holdout_smaller_than_a_tile():
    with pytest.raises(ConfigError, match="holdout_rows"):
        DemoDataConfig(holdout_rows=8, tile_size=32)


def test_shipped_samson_asset_matches_the_shared_scene():
    with np.load(shared_file("unmixing/samson/samson.npz")) as shared:
        scene = load_demo_samson()
        assert scene.sensor == "samson" and scene.cube.dtype == np.float32
        assert scene.cube.shape == shared["cube"].shape == (SAMSON_ROWS, SAMSON_ROWS, 156)
        np.testing.assert_allclose(scene.cube, shared["cube"], rtol=0, atol=FLOAT16_TOLERANCE)
        np.testing.assert_allclose(scene.abundances, shared["abundances"], rtol=0, atol=2 * FLOAT16_TOLERANCE)
        np.testing.assert_array_equal(scene.wavelengths_nm, shared["wavelengths_nm"])
        np.testing.assert_array_equal(scene.endmembers, shared["endmembers"])
        assert scene.endmember_names == list(shared["endmember_names"])
    np.testing.assert_allclose(scene.abundances.sum(axis=2), 1.0, atol=1e-6)


def test_real_scenes_join_training_and_their_holdout_rows_join_evaluation(tmp_path):
    path = shared_file("classification/indian_pines/indian_pines.npz")
    config = DemoDataConfig(synthetic_scenes=1, holdout_synthetic=1, urban_scenes=1, synthetic_endmembers=[3, 6],
                            real_scenes=[{"path": str(path), "holdout_rows": 32}])
    train_dir, eval_dir = build_demo_shards(tmp_path, config)
    train, held_out = load_index(train_dir), load_index(eval_dir)
    train_sources = {scene["name"]: scene["source"] for scene in train["scenes"]}
    eval_sources = {scene["name"]: scene["source"] for scene in held_out["scenes"]}
    (train_name,) = [name for name in train_sources if name.startswith("indian")]
    (eval_name,) = [name for name in eval_sources if name.startswith("indian")]
    assert train_sources[train_name].endswith("rows 0:113") and eval_sources[eval_name].endswith("rows 113:145")
    assert sum(name.startswith("urban-train") for name in train_sources) == 1  # Urban abundances: training only
    assert not any(name.startswith("urban") for name in eval_sources)
    # a changed file is not served from the old build
    record = json.loads((tmp_path / DEMO_FILE).read_text())
    assert record["real_files"][0] is not None


def test_real_scene_too_small_to_split_is_named(tmp_path):
    path = shared_file("classification/salinasA/salinasA.npz")
    with pytest.raises(ConfigError, match="salinasA.npz"):
        build_demo_shards(tmp_path, DemoDataConfig(synthetic_scenes=0, holdout_synthetic=0,
                                                   real_scenes=[{"path": str(path), "holdout_rows": 60}]))
