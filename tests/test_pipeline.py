"""The streaming loader: splitting, equal batches, determinism, resume, band sets, bad and hostile input."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hsfm_train.data.augment import AugmentConfig, augment
from hsfm_train.data.pipeline import DataWarning, LoaderConfig, StreamingLoader
from hsfm_train.data.shards import ShardBuildConfig, build_shards, load_index
from hsfm_train.data.tiling import TilingConfig
from hsfm_train.errors import ConfigError, DataQualityError, UnsafeDataError
from tests.helpers import append_handmade_shard, meta_bytes, npy_bytes, salinas_a_scene, samson_scene


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """Samson (156 bands, 121 tiles) and Salinas-A (224 bands, 100 tiles) in 10 shards."""
    root = tmp_path_factory.mktemp("mixed")
    build_shards([samson_scene(), salinas_a_scene()],
                 ShardBuildConfig(str(root), max_samples_per_shard=24, tiling=TilingConfig(16, 8)))
    return root


def config(root: Path, **overrides) -> LoaderConfig:
    settings = dict(shards=str(root), batch_size=8, num_workers=2, shuffle_buffer=32, seed=7)
    return LoaderConfig(**{**settings, **overrides})


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def test_finite_mode_two_ranks_two_workers_disjoint_and_complete(mixed_shards):
    index = load_index(mixed_shards)
    seen = []
    for rank in range(2):
        seen.append(keys_of(StreamingLoader(config(mixed_shards, resampled=False), rank=rank, world_size=2)))
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(seen[0]) + len(seen[1]) == len(set(seen[0]) | set(seen[1])) == index["total_samples"] == 121 + 100
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_resampled_mode_gives_every_rank_the_same_number_of_batches(mixed_shards):
    lengths = []
    for rank in range(2):
        loader = StreamingLoader(config(mixed_shards), rank=rank, world_size=2)
        batches = list(loader)
        lengths.append((len(loader), len(batches)))
        assert all(b["hsi"].shape[0] == 8 for b in batches)
        assert loader.epoch == 1
    # open_clip rule: ceil(221 / (8 * 2)) = 14 batches, already a multiple of 2 workers
    assert lengths == [(14, 14), (14, 14)]
    ranks = [keys_of(StreamingLoader(config(mixed_shards), rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] != ranks[1]  # ranks draw independent streams


def test_batches_never_mix_band_sets_and_carry_matching_wavelengths(mixed_shards):
    index = load_index(mixed_shards)
    band_sets_seen = set()
    for batch in StreamingLoader(config(mixed_shards, resampled=False)):
        (band_set,) = set(batch["band_set"])
        band_sets_seen.add(band_set)
        bands = index["band_sets"][band_set]["bands"]
        assert batch["hsi"].shape[1] == bands and batch["band_mask"].all()
        expected = index["band_sets"][band_set]["wavelengths_nm"]
        if expected is None:
            assert torch.isnan(batch["wavelengths"]).all()
        else:
            torch.testing.assert_close(batch["wavelengths"][0], torch.tensor(expected))
    assert len(band_sets_seen) == 2


def test_pad_mode_masks_the_padded_bands(mixed_shards):
    mixed = 0
    for batch in StreamingLoader(config(mixed_shards, resampled=False, batching="pad", shuffle_buffer=64)):
        assert batch["hsi"].shape[1] == 224 or batch["band_mask"].all()
        for i, band_set in enumerate(batch["band_set"]):
            bands = int(batch["band_mask"][i].sum())
            assert bands == (156 if band_set.startswith("samson") else 224)
            assert (batch["hsi"][i, bands:] == 0).all()
        mixed += len(set(batch["band_set"])) > 1
    assert mixed > 0


def test_normalisation_uses_index_statistics(mixed_shards):
    batches = list(StreamingLoader(config(mixed_shards, resampled=False, shuffle_buffer=0, num_workers=0)))
    samson = torch.cat([b["hsi"] for b in batches if b["band_set"][0].startswith("samson")])
    per_band_mean = samson.mean(dim=(0, 2, 3))
    per_band_std = samson.std(dim=(0, 2, 3))
    assert per_band_mean.abs().max() < 0.05 and (per_band_std - 1).abs().max() < 0.05


def test_same_seed_same_batches_other_seed_other_batches(mixed_shards):
    augmenting = AugmentConfig(enabled=True, blur=0.5, jitter=0.5, spectral_noise=0.5)
    runs = [list(StreamingLoader(config(mixed_shards, seed=s, augment=augmenting, batches_per_epoch=6)))
            for s in (3, 3, 4)]
    assert keys_of(runs[0]) == keys_of(runs[1])
    for a, b in zip(runs[0], runs[1]):
        torch.testing.assert_close(a["hsi"], b["hsi"], rtol=0, atol=0)
    assert keys_of(runs[0]) != keys_of(runs[2])


@pytest.mark.parametrize("resampled", [True, False])
def test_resume_continues_from_the_recorded_position(mixed_shards, resampled):
    settings = dict(resampled=resampled, augment=AugmentConfig(enabled=True, spectral_noise=1.0))
    reference = list(StreamingLoader(config(mixed_shards, **settings)))
    interrupted = StreamingLoader(config(mixed_shards, **settings))
    consumed = []
    for batch in interrupted:
        consumed.append(batch)
        if len(consumed) == 5:
            break
    state = interrupted.state_dict()
    resumed_loader = StreamingLoader(config(mixed_shards, **settings))
    resumed_loader.load_state_dict(state)
    resumed = list(resumed_loader)
    assert keys_of(consumed) + keys_of(resumed) == keys_of(reference)
    for got, expected in zip(consumed + resumed, reference):
        torch.testing.assert_close(got["hsi"], expected["hsi"], rtol=0, atol=0)
    assert resumed_loader.epoch == 1 and resumed_loader.state_dict()["delivered_per_worker"] == [0, 0]


def endless(loader: StreamingLoader):
    """Batches across epochs, as the trainer draws them."""
    while True:
        yield from loader


def take(batches, count: int) -> list[dict]:
    return [next(batches) for _ in range(count)]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("position", [1, 2, 4], ids=["first", "middle", "last"])
def test_resume_at_any_position_of_an_epoch_continues_the_same_stream(mixed_shards, workers, position):
    # 4 batches per epoch; a checkpoint after the epoch's last batch used to record an exhausted epoch, so the
    # resumed loader delivered nothing
    settings = dict(num_workers=workers, batches_per_epoch=4, augment=AugmentConfig(enabled=True))
    reference = take(endless(StreamingLoader(config(mixed_shards, **settings))), 8)
    interrupted = StreamingLoader(config(mixed_shards, **settings))
    consumed = take(endless(interrupted), position)
    state = interrupted.state_dict()
    if position == 4:
        assert state["epoch"] == 1 and state["delivered_per_worker"] == [0] * max(workers, 1)
    resumed_loader = StreamingLoader(config(mixed_shards, **settings))
    resumed_loader.load_state_dict(state)
    resumed = take(endless(resumed_loader), 8 - position)
    assert keys_of(consumed + resumed) == keys_of(reference)
    for got, expected in zip(consumed + resumed, reference):
        torch.testing.assert_close(got["hsi"], expected["hsi"], rtol=0, atol=0)


def test_state_recorded_at_an_exhausted_epoch_resumes_at_the_next_one(mixed_shards):
    # checkpoints written before the fix hold {'epoch': e, 'delivered_per_worker': [all of the epoch]}
    loader = StreamingLoader(config(mixed_shards, num_workers=0, batches_per_epoch=4))
    state = {**loader.state_dict(), "epoch": 3, "delivered_per_worker": [4]}
    loader.load_state_dict(state)
    assert loader.state_dict()["epoch"] == 4 and loader.state_dict()["delivered_per_worker"] == [0]
    assert len(take(endless(loader), 4)) == 4


def test_resume_with_other_settings_is_refused(mixed_shards):
    loader = StreamingLoader(config(mixed_shards))
    next(iter(loader))
    other = StreamingLoader(config(mixed_shards, batch_size=4))
    with pytest.raises(ConfigError, match="batch_size: recorded 8, now 4"):
        other.load_state_dict(loader.state_dict())


def test_augmentation_moves_labels_with_the_image():
    rng = np.random.default_rng(0)
    hsi = rng.random((5, 12, 12), dtype=np.float32)
    labels = (hsi[0] * 1000).astype(np.int16)  # labels are a function of the image
    sample = {"hsi": hsi.copy(), "labels": labels.copy(), "valid": np.ones((12, 12), np.uint8)}
    always = AugmentConfig(enabled=True, hflip=1.0, vflip=1.0, rotate90=1.0)
    augment(sample, always, rng, np.ones(5, np.float32))
    assert not np.array_equal(sample["hsi"], hsi)
    np.testing.assert_array_equal(sample["labels"], (sample["hsi"][0] * 1000).astype(np.int16))


@pytest.fixture()
def shards_with_bad_samples(tmp_path) -> Path:
    build_shards([samson_scene()], ShardBuildConfig(str(tmp_path), max_samples_per_shard=10, tiling=TilingConfig(16)))
    band_set = next(iter(load_index(tmp_path)["band_sets"]))
    good = np.zeros((156, 16, 16), np.float16)
    nan = good.copy()
    nan[3, 4, 5] = np.nan
    append_handmade_shard(tmp_path, "bad-000000.tar", [
        ("nan_tile", {"hsi.npy": npy_bytes(nan), "meta.json": meta_bytes(156, band_set)}),
        ("int_tile", {"hsi.npy": npy_bytes(good.astype(np.int32)), "meta.json": meta_bytes(156, band_set)}),
        ("short_tile", {"hsi.npy": npy_bytes(good[:100]), "meta.json": meta_bytes(156, band_set)}),
        ("wrong_meta", {"hsi.npy": npy_bytes(good[:100]), "meta.json": meta_bytes(100, band_set)}),
        ("no_meta", {"hsi.npy": npy_bytes(good)}),
        ("unknown_set", {"hsi.npy": npy_bytes(good), "meta.json": meta_bytes(156, "other-b156-x")}),
        ("fine_tile", {"hsi.npy": npy_bytes(good), "meta.json": meta_bytes(156, band_set)}),
    ])
    return tmp_path


def test_bad_samples_are_skipped_counted_and_warned(shards_with_bad_samples):
    loader = StreamingLoader(config(shards_with_bad_samples, resampled=False, num_workers=0, max_fail_fraction=0.5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = keys_of(loader)
    assert "fine_tile" in keys and len(keys) == 36 + 1
    assert loader.stats == {"good": 37, "bad": 6, "non_finite": 1, "wrong_dtype": 1, "wrong_band_count": 2,
                            "incomplete_sample": 1, "unknown_band_set": 1}
    assert any(issubclass(w.category, DataWarning) and "nan_tile" in str(w.message) for w in caught)


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_bad_samples_is_one_clean_error(shards_with_bad_samples, workers):
    loader = StreamingLoader(config(shards_with_bad_samples, resampled=False, num_workers=workers,
                                    max_fail_fraction=0.05))
    with pytest.raises(DataQualityError, match="max_fail_fraction 0.05") as raised:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            list(loader)
    # raised in a worker, it used to arrive wrapped: "Caught DataQualityError in DataLoader worker process 0"
    # followed by the worker's traceback
    message = str(raised.value)
    assert "\n" not in message and "Caught" not in message and "Traceback" not in message


@pytest.mark.parametrize("workers", [0, 2])
def test_each_bad_sample_is_warned_about_once_over_many_epochs(shards_with_bad_samples, workers):
    loader = StreamingLoader(config(shards_with_bad_samples, num_workers=workers, max_fail_fraction=0.5,
                                    batches_per_epoch=4, shuffle_buffer=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):  # six epochs: the 7-tile bad shard is drawn again and again
            list(loader)
    skipped = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert loader.stats["bad"] > 6  # the same bad samples were read many times...
    assert len(skipped) == len(set(skipped)) and len(skipped) <= 6  # ...and warned about once each
    assert loader.stats["good"] + loader.stats["bad"] >= 6 * 4 * 8  # counts add up across epochs


def test_shard_source_reads_the_index_files_from_where_the_user_says(mixed_shards, tmp_path):
    # an index folder without its shards, and the shards reached through a user-configured pipe: source
    (tmp_path / "index.json").write_text((mixed_shards / "index.json").read_text())
    expected = keys_of(StreamingLoader(config(mixed_shards, resampled=False, num_workers=0)))
    remote = config(tmp_path, resampled=False, num_workers=0, shard_source=f"pipe:cat {mixed_shards}/{{file}}")
    assert keys_of(StreamingLoader(remote)) == expected
    with pytest.raises(DataQualityError, match="unreadable_shard"):  # without it: looked for beside the index
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            list(StreamingLoader(config(tmp_path, resampled=False, num_workers=0, max_fail_fraction=0.0)))


def test_truncated_shard_is_skipped_and_counted(tmp_path):
    build_shards([samson_scene()], ShardBuildConfig(str(tmp_path), max_samples_per_shard=12, tiling=TilingConfig(16)))
    shard = tmp_path / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * 0.6)])
    loader = StreamingLoader(config(tmp_path, resampled=False, num_workers=0, max_fail_fraction=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = keys_of(loader)
    assert loader.stats["corrupt_shard"] == 1
    assert 36 - 12 < len(keys) < 36  # the complete samples before the damage are kept
    assert any("shard-000001.tar" in str(w.message) for w in caught)


@pytest.mark.parametrize("payload", ["pyd", "object_npy"])
def test_pickle_payloads_are_refused(tmp_path, payload):
    build_shards([samson_scene()], ShardBuildConfig(str(tmp_path), tiling=TilingConfig(32)))
    band_set = next(iter(load_index(tmp_path)["band_sets"]))
    if payload == "pyd":  # webdataset's pickle extension; the bytes here would run code if unpickled
        members = {"hsi.pyd": b"cos\nsystem\n(S'echo pwned'\ntR.", "meta.json": meta_bytes(156, band_set)}
    else:
        members = {"hsi.npy": npy_bytes(np.array([{"a": 1}], dtype=object)), "meta.json": meta_bytes(156, band_set)}
    append_handmade_shard(tmp_path, "evil-000000.tar", [("evil", members)])
    for workers in (0, 2):
        with pytest.raises(Exception) as raised:
            list(StreamingLoader(config(tmp_path, resampled=False, num_workers=workers, max_fail_fraction=1.0)))
        assert "evil" in str(raised.value) and "unpickling" in str(raised.value)
        if workers == 0:
            assert isinstance(raised.value, UnsafeDataError)
