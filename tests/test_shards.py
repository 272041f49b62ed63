"""Shard writing: round trip, index counts and statistics, determinism, nodata, atomicity, bad input."""
from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from hsfm_train.data.scene import Scene
from hsfm_train.data.shards import (
    INDEX_FILE,
    ShardBuildConfig,
    build_shards,
    decode_sample,
    iter_raw_samples,
    load_index,
    shard_urls,
    verify_shards,
)
from hsfm_train.data.tiling import TilingConfig, tile_origins
from hsfm_train.errors import DataFormatError
from tests.conftest import REPO_ROOT
from tests.helpers import salinas_a_scene, samson_scene


def read_all_samples(index: dict) -> list[dict]:
    samples = []
    for url in shard_urls(index):
        with open(url, "rb") as handle:
            samples += [decode_sample(raw, key, url) for key, raw in iter_raw_samples(handle, url, {})]
    return samples


def test_tile_origins_cover_the_border():
    assert tile_origins(95, 32, 32) == [0, 32, 63]
    assert tile_origins(64, 32, 16) == [0, 16, 32]
    assert tile_origins(31, 32, 32) == []


def test_float32_round_trip_reassembles_samson_exactly(tmp_path):
    scene = samson_scene()
    index = build_shards([scene], ShardBuildConfig(str(tmp_path), dtype="float32", max_samples_per_shard=4,
                                                   tiling=TilingConfig(tile_size=32)))
    samples = read_all_samples(load_index(tmp_path))
    assert len(samples) == index["total_samples"] == 9  # origins 0, 32, 63 on both axes
    assert [r["samples"] for r in index["shards"]] == [4, 4, 1]
    cube = np.full(scene.cube.shape, np.nan, dtype=np.float32)
    abundances = np.full(scene.abundances.shape, np.nan, dtype=np.float32)
    for sample in samples:
        row, col = sample["meta"]["origin"]
        cube[row:row + 32, col:col + 32] = np.moveaxis(sample["hsi"], 0, 2)
        abundances[row:row + 32, col:col + 32] = np.moveaxis(sample["abundances"], 0, 2)
        np.testing.assert_array_equal(sample["wavelengths"], scene.wavelengths_nm)
        np.testing.assert_array_equal(sample["endmembers"], scene.endmembers)
        assert sample["meta"]["endmember_names"] == scene.endmember_names
    np.testing.assert_array_equal(cube, scene.cube)
    np.testing.assert_array_equal(abundances, scene.abundances)


def test_float16_tiles_stay_within_half_precision(tmp_path):
    scene = salinas_a_scene()  # integer DN up to ~8400
    build_shards([scene], ShardBuildConfig(str(tmp_path), dtype="float16", tiling=TilingConfig(tile_size=32)))
    index = load_index(tmp_path)
    with tarfile.open(shard_urls(index)[0]) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".hsi.npy"))
        stored = np.load(io.BytesIO(archive.extractfile(member).read()), allow_pickle=False)
    assert stored.dtype == np.float16
    for sample in read_all_samples(index):
        assert sample["hsi"].dtype == np.float32 and sample["meta"]["dtype"] == "float16"
        row, col = sample["meta"]["origin"]
        original = np.moveaxis(scene.cube[row:row + 32, col:col + 32], 2, 0)
        np.testing.assert_allclose(sample["hsi"].astype(np.float32), original, rtol=2**-11, atol=0)
        np.testing.assert_array_equal(sample["labels"], scene.labels[row:row + 32, col:col + 32])


def test_index_statistics_match_numpy_and_counts_match_shards(tmp_path):
    scene = samson_scene()
    cropped = Scene("samson64", scene.cube[:64, :64], scene.wavelengths_nm, "samson")
    index = build_shards([cropped], ShardBuildConfig(str(tmp_path), dtype="float32", max_samples_per_shard=3,
                                                     tiling=TilingConfig(tile_size=16)))
    (band_set,) = index["band_sets"].values()
    pixels = cropped.cube.reshape(-1, cropped.num_bands).astype(np.float64)
    np.testing.assert_allclose(band_set["mean"], pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(band_set["std"], pixels.std(0, ddof=1), rtol=1e-5)
    assert band_set["samples"] == 16 and band_set["pixels"] == 64 * 64
    report = verify_shards(load_index(tmp_path))
    assert report == {"shards": 6, "samples": 16, "problems": [], "counts": {}}


def test_build_is_deterministic_and_seed_changes_order(tmp_path):
    def digests(folder: Path, seed: int) -> list[str]:
        build_shards([samson_scene(), salinas_a_scene()],
                     ShardBuildConfig(str(folder), seed=seed, max_samples_per_shard=5, tiling=TilingConfig(16)))
        return [r["sha256"] for r in load_index(folder)["shards"]] + [(folder / INDEX_FILE).read_text()]

    first, second, other_seed = digests(tmp_path / "a", 0), digests(tmp_path / "b", 0), digests(tmp_path / "c", 1)
    assert first == second
    assert first[:-1] != other_seed[:-1]
    for name in ("a", "b"):  # byte-identical files, not only identical hashes in the index
        assert hashlib.sha256((tmp_path / name / "shard-000000.tar").read_bytes()).hexdigest() == first[0]


def test_nodata_tiles_are_dropped_or_masked(tmp_path):
    scene = samson_scene()
    cube = scene.cube[:64, :64].copy()
    cube[:32, :32] = np.nan  # one whole tile of nodata
    cube[32:40, 32:64] = -1.0  # a quarter of another tile carries the nodata value
    build = ShardBuildConfig(str(tmp_path), dtype="float32",
                             tiling=TilingConfig(tile_size=32, max_nodata_fraction=0.3, nodata_value=-1.0))
    index = build_shards([Scene("holes", cube, scene.wavelengths_nm, "samson")], build)
    assert index["total_samples"] == 3 and index["dropped"] == {"tile_mostly_nodata": 1}
    by_origin = {tuple(s["meta"]["origin"]): s for s in read_all_samples(load_index(tmp_path))}
    masked = by_origin[(32, 32)]
    assert masked["valid"][:8].sum() == 0 and masked["valid"][8:].all()
    assert (masked["hsi"][:, :8] == 0).all() and masked["meta"]["valid_fraction"] == 0.75
    assert "valid" not in by_origin[(0, 32)]


def test_optical_sar_pair_is_one_sample_with_two_arrays(tmp_path):
    rng = np.random.default_rng(0)
    pair = Scene("pair", rng.random((64, 64, 3)), [664.6, 559.8, 492.4], "sentinel2_rgb",
                 pair=rng.random((64, 64, 1)), pair_wavelengths_nm=[5.5465763e7], pair_sensor="sentinel1_vh")
    index = build_shards([pair], ShardBuildConfig(str(tmp_path), dtype="float32", tiling=TilingConfig(32)))
    assert len(index["band_sets"]) == 2  # optical and SAR each get statistics
    sample = read_all_samples(load_index(tmp_path))[0]
    row, col = sample["meta"]["origin"]
    np.testing.assert_array_equal(sample["pair"][0], pair.pair[row:row + 32, col:col + 32, 0])
    assert sample["meta"]["pair_sensor"] == "sentinel1_vh" and sample["pair_wavelengths"].shape == (1,)


def test_bad_build_input_gets_one_clear_error(tmp_path):
    scene = samson_scene()
    with pytest.raises(DataFormatError, match="float16 range"):
        build_shards([Scene("hot", scene.cube * 1e6, None)], ShardBuildConfig(str(tmp_path / "a")))
    with pytest.raises(DataFormatError, match="named 'samson'"):
        build_shards([scene, scene], ShardBuildConfig(str(tmp_path / "b")))
    build_shards([scene], ShardBuildConfig(str(tmp_path / "c")))
    with pytest.raises(FileExistsError, match="overwrite"):
        build_shards([scene], ShardBuildConfig(str(tmp_path / "c")))
    with pytest.raises(DataFormatError, match="no tiles"):
        build_shards([Scene("tiny", scene.cube[:8, :8], None)], ShardBuildConfig(str(tmp_path / "d")))


def test_failed_build_leaves_no_index_and_no_partial_shard(tmp_path):
    def scenes():
        yield samson_scene()
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError):
        build_shards(scenes(), ShardBuildConfig(str(tmp_path), max_samples_per_shard=4, tiling=TilingConfig(16)))
    assert not (tmp_path / INDEX_FILE).exists()
    assert not list(tmp_path.glob(".*partial"))
    for shard in tmp_path.glob("*.tar"):  # complete shards only
        with tarfile.open(shard) as archive:
            assert all(archive.extractfile(m).read() is not None for m in archive.getmembers())


def test_sigkill_mid_build_never_leaves_a_truncated_shard_under_its_final_name(tmp_path):
    samson_scene()  # skips here, not inside the child process, when the shared data is absent
    out = tmp_path / "out"
    script = (
        "import time\n"
        "from hsfm_train.data.shards import ShardBuildConfig, build_shards\n"
        "from hsfm_train.data.tiling import TilingConfig\n"
        "from tests.helpers import samson_scene\n"
        "def scenes():\n"
        "    s = samson_scene()\n"
        "    for i in range(1000):\n"
        "        s.name = f'samson{i}'\n"
        "        yield s\n"
        "        time.sleep(0.02)\n"
        f"build_shards(scenes(), ShardBuildConfig({str(out)!r}, max_samples_per_shard=50, tiling=TilingConfig(8)))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.tar"))) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(out.glob("*.tar"))
    assert finished, "the build never finished a shard"
    assert not (out / INDEX_FILE).exists()
    for shard in finished:
        with open(shard, "rb") as handle:
            assert len(list(iter_raw_samples(handle, str(shard), {}))) == 50
    # a rebuild in the same place cleans the leftovers and succeeds
    index = build_shards([samson_scene()], ShardBuildConfig(str(out), overwrite=True, tiling=TilingConfig(32)))
    assert not list(out.glob(".*partial")) and sorted(out.glob("*.tar")) == [out / "shard-000000.tar"]
    assert verify_shards(load_index(out))["problems"] == [] and index["total_samples"] == 9


def test_verify_reports_a_corrupted_shard(tmp_path):
    build_shards([samson_scene()], ShardBuildConfig(str(tmp_path), max_samples_per_shard=3, tiling=TilingConfig(32)))
    shard = tmp_path / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = verify_shards(load_index(tmp_path))
    assert report["counts"].get("corrupt_shard") == 1
    assert any("shard-000001.tar" in p and "index says 3" in p for p in report["problems"])


def test_load_index_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_index(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        load_index(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"shards": []}))
    with pytest.raises(DataFormatError, match="not an hsfm shard index"):
        load_index(tmp_path)
