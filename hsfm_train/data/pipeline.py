"""The streaming loader: shards -> validated samples -> shuffled, band-consistent batches, resumable.

Two modes:
* resampled (training): each (rank, worker) draws shards with replacement, weighted by their sample count,
  from its own seeded stream, so every rank gets exactly ``len(loader)`` batches per epoch (the open_clip
  rule: ceil(samples / global batch) rounded up to a multiple of the worker count);
* finite (evaluation): the global sample order (index order) is split into contiguous, disjoint ranges per
  rank and per worker, so every sample is seen exactly once across the job.

Samples with different band sets are never stacked together: they are bucketed by band set (``batching:
bucket``), or zero-padded to the widest band set in the batch with a ``band_mask`` (``batching: pad``).
Bad samples (NaN, wrong band count or dtype, truncated member, corrupt shard) are skipped, counted and
warned about; above ``max_fail_fraction`` the worker stops with a DataQualityError. Pickled payloads raise
UnsafeDataError at once.

Determinism and resume: the sample order of worker w at epoch e depends only on (seed, e, rank, w); the
augmentation of its n-th batch only on (seed, e, rank, w, n). ``state_dict()`` records the epoch and how many
batches each worker has delivered; a loader given that state skips exactly those batches (they are read and
validated again, not delivered) and continues with the same stream. Keep an epoch (``batches_per_epoch``) of a
size you can afford to re-read on restart.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hsfm_train.data.augment import AugmentConfig, augment, crop
from hsfm_train.data.shards import (SampleError, check_shard_source, decode_sample, iter_raw_samples, load_index,
                                    open_shard, shard_urls)
from hsfm_train import errors
from hsfm_train.errors import ConfigError, DataQualityError, HsfmError


class DataWarning(UserWarning):
    """A sample or shard was skipped."""


@dataclass
class LoaderConfig:
    shards: str
    batch_size: int = 16
    num_workers: int = 2
    resampled: bool = True
    shuffle_buffer: int = 256
    seed: int = 0
    batches_per_epoch: int | None = None  # per rank; None: ceil(samples / global batch), open_clip rounding
    batching: str = "bucket"  # "bucket" by band set, or "pad" bands with a band_mask
    normalize: bool = True  # per-band mean/std of the sample's band set, from the index
    crop_size: int | None = None  # random crop with augmentation on, centre crop otherwise
    drop_last: bool = False  # finite mode: drop the partial batch of each bucket
    max_fail_fraction: float = 0.01
    fail_check_after: int = 200  # samples seen by a worker before the fraction is enforced
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    prefetch_factor: int = 2
    pin_memory: bool = False
    # Where the index's shard files are read from, when not beside index.json: a template with {file}, such as
    # "pipe:aws s3 cp s3://bucket/ds/{file} -" or "https://host/ds/{file}". Only your own config can set it (an
    # index lists plain file names), so opting into a remote or pipe: source is always your decision.
    shard_source: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("batch_size must be >= 1, num_workers and shuffle_buffer >= 0")
        if self.batching not in ("bucket", "pad"):
            raise ConfigError(f"batching must be 'bucket' or 'pad', got {self.batching!r}")
        if not 0.0 <= self.max_fail_fraction <= 1.0:
            raise ConfigError(f"max_fail_fraction must be in [0, 1], got {self.max_fail_fraction}")
        if self.batches_per_epoch is not None and self.batches_per_epoch < 1:
            raise ConfigError(f"batches_per_epoch must be >= 1, got {self.batches_per_epoch}")
        if self.shard_source is not None:
            check_shard_source(self.shard_source)


def distributed_position() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(IterableDataset):
    """One rank's stream of collated batches; each DataLoader worker runs its own slice."""

    def __init__(self, index: dict[str, Any], config: LoaderConfig, rank: int, world_size: int,
                 epoch: int, skip_per_worker: list[int], worker_batches: int | None):
        self.urls = shard_urls(index, config.shard_source)
        self.counts = np.array([record["samples"] for record in index["shards"]], dtype=np.int64)
        self.band_sets = {
            name: {
                "bands": info["bands"],
                "wavelengths": np.array(info["wavelengths_nm"] if info["wavelengths_nm"] is not None
                                        else [np.nan] * info["bands"], dtype=np.float32),
                "mean": np.array(info.get("mean", [0.0] * info["bands"]), dtype=np.float32),
                "std": np.maximum(np.array(info.get("std", [1.0] * info["bands"]), dtype=np.float32), 1e-6),
            }
            for name, info in index["band_sets"].items()
        }
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.epoch = epoch
        self.skip_per_worker = skip_per_worker
        self.worker_batches = worker_batches
        self._events: list[tuple[str, str]] = []

    # ----------------------------------------------------------------------------- sample sources

    def _raw_samples(self, worker: int, num_workers: int, rng: np.random.Generator,
                     counters: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        if self.config.resampled:
            yield from self._resampled(rng, counters)
        else:
            yield from self._finite_slice(worker, num_workers, counters)

    def _resampled(self, rng: np.random.Generator, counters: dict[str, Any]) -> Iterator:
        probabilities = self.counts / self.counts.sum()
        barren_draws = 0  # consecutive shard reads that produced nothing: all shards unreadable
        while True:
            shard = int(rng.choice(len(self.urls), p=probabilities))
            produced = False
            for key, raw in self._read_shard(shard, counters):
                produced = True
                yield self.urls[shard], key, raw
            barren_draws = 0 if produced else barren_draws + 1
            if barren_draws > 2 * len(self.urls) + 8:
                raise DataQualityError(f"no readable sample in {barren_draws} shard draws; counts {counters}")

    def _finite_slice(self, worker: int, num_workers: int, counters: dict[str, Any]) -> Iterator:
        total = int(self.counts.sum())
        rank_start, rank_stop = _split(total, self.world_size, self.rank)
        start, stop = _split(rank_stop - rank_start, num_workers, worker)
        start, stop = rank_start + start, rank_start + stop
        offsets = np.concatenate([[0], np.cumsum(self.counts)])
        for shard in range(len(self.urls)):
            first, last = int(offsets[shard]), int(offsets[shard + 1])
            if last <= start or first >= stop:
                continue
            for position, (key, raw) in enumerate(self._read_shard(shard, counters), start=first):
                if position >= stop:
                    break
                if position >= start:
                    yield self.urls[shard], key, raw

    def _read_shard(self, shard: int, counters: dict[str, Any]) -> Iterator[tuple[str, dict[str, bytes]]]:
        url = self.urls[shard]
        try:
            stream = open_shard(url, remote=self.config.shard_source is not None)
        except Exception as error:  # a listed shard that cannot be opened is a corrupt-shard event
            self._bad(counters, "unreadable_shard", f"{url}: cannot open ({error})")
            return
        with stream:
            try:
                yield from iter_raw_samples(stream, url, counters)
            except SampleError as error:  # truncated/corrupt tar: the samples before the damage were kept
                self._bad(counters, error.reason, str(error))

    # ----------------------------------------------------------------------------- validation

    def _bad(self, counters: dict[str, Any], reason: str, message: str) -> None:
        counters[reason] = counters.get(reason, 0) + 1
        counters["bad"] = counters.get("bad", 0) + 1
        # reported to the main process with the next batch: it warns once per distinct sample over the whole
        # run, where a worker (restarted every epoch) would repeat the same warnings each epoch
        self._events.append((reason, message))
        self._enforce_fail_fraction(counters, message)

    def _enforce_fail_fraction(self, counters: dict[str, Any], last_message: str, final: bool = False) -> None:
        seen = counters.get("good", 0) + counters.get("bad", 0)
        enough = final or seen >= self.config.fail_check_after
        if enough and counters.get("bad", 0) > self.config.max_fail_fraction * seen:
            reasons = {k: v for k, v in counters.items() if k not in ("good", "bad")}
            raise DataQualityError(
                f"{counters['bad']} of {seen} samples skipped (max_fail_fraction {self.config.max_fail_fraction}); "
                f"reasons {reasons}; last: {last_message}"
            )

    def _decoded(self, raw_samples: Iterator, counters: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for url, key, raw in raw_samples:
            try:
                sample = decode_sample(raw, key, url)
                band_set = self.band_sets.get(sample["meta"]["band_set"])
                if band_set is None:
                    raise SampleError("unknown_band_set", f"{url}: {key} band set {sample['meta']['band_set']!r} "
                                                          f"is not in the shard index")
                if band_set["bands"] != sample["hsi"].shape[0]:
                    raise SampleError("wrong_band_count", f"{url}: {key} has {sample['hsi'].shape[0]} bands, "
                                                          f"its band set has {band_set['bands']}")
            except SampleError as error:
                self._bad(counters, error.reason, str(error))
                continue
            counters["good"] = counters.get("good", 0) + 1
            yield sample

    # ----------------------------------------------------------------------------- batching

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        size = self.config.shuffle_buffer
        if size <= 1:
            yield from samples
            return
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            slot = int(rng.integers(size))
            yield buffer[slot]
            buffer[slot] = sample
        for slot in rng.permutation(len(buffer)):
            yield buffer[slot]

    def _bucket_key(self, sample: dict[str, Any]) -> tuple:
        size = self.config.crop_size or tuple(sample["hsi"].shape[1:])
        band_set = sample["meta"]["band_set"] if self.config.batching == "bucket" else "*"
        return band_set, sample["meta"].get("pair_band_set"), size

    def _grouped(self, samples: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
        buckets: dict[tuple, list[dict[str, Any]]] = {}
        for sample in samples:
            key = self._bucket_key(sample)
            bucket = buckets.setdefault(key, [])
            bucket.append(sample)
            if len(bucket) == self.config.batch_size:
                yield bucket
                buckets[key] = []
        if not self.config.drop_last:  # only reached in finite mode
            yield from (bucket for bucket in buckets.values() if bucket)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        # DataLoader hands out batches round-robin starting at worker 0; on resume the logical worker whose turn
        # it is must sit in slot 0, so logical ids are rotated by the number of batches already delivered.
        rotation = sum(self.skip_per_worker) % num_workers
        worker = ((info.id if info else 0) + rotation) % num_workers
        counters: dict[str, Any] = {}
        self._events = []
        try:
            for batch in self._batches(worker, num_workers, counters):
                yield self._tagged(batch, worker, counters)
            self._enforce_fail_fraction(counters, "end of stream", final=True)
        except HsfmError as error:
            if info is None:
                raise
            # A worker's exception reaches the main process wrapped in a multi-line traceback; send it as a
            # marker instead, so the main process raises the same error with its one-line message.
            yield self._tagged({"_error": (type(error).__name__, str(error))}, worker, counters)
            return
        yield self._tagged({"_end": True}, worker, counters)  # the last skip events and counts

    def _tagged(self, batch: dict[str, Any], worker: int, counters: dict[str, Any]) -> dict[str, Any]:
        batch["_worker"], batch["_stats"], batch["_events"] = worker, dict(counters), self._events
        self._events = []
        return batch

    def _batches(self, worker: int, num_workers: int, counters: dict[str, Any]) -> Iterator[dict[str, Any]]:
        config = self.config
        stream_seed = [config.seed, self.epoch, self.rank, worker]
        rng = np.random.default_rng(np.random.SeedSequence(stream_seed))
        samples = self._decoded(self._raw_samples(worker, num_workers, rng, counters), counters)
        skip = self.skip_per_worker[worker] if worker < len(self.skip_per_worker) else 0
        for number, group in enumerate(self._grouped(self._shuffled(samples, rng))):
            if self.worker_batches is not None and number >= self.worker_batches:
                break
            if number < skip:
                continue
            batch_rng = np.random.default_rng(np.random.SeedSequence(stream_seed + [number]))
            yield self._collate(group, batch_rng)

    def _collate(self, group: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
        config = self.config
        for sample in group:
            band_set = self.band_sets[sample["meta"]["band_set"]]
            if config.crop_size:
                crop(sample, config.crop_size, rng if config.augment.enabled else None)
            if config.augment.enabled:
                augment(sample, config.augment, rng, band_set["std"])
            if config.normalize:
                sample["hsi"] = _normalise(sample["hsi"], band_set)
                pair_set = self.band_sets.get(sample["meta"].get("pair_band_set", ""))
                if "pair" in sample and pair_set is not None:
                    sample["pair"] = _normalise(sample["pair"], pair_set)
            if "valid" in sample:  # invalid pixels read as the band mean (0 after normalisation)
                invalid = sample["valid"] == 0
                sample["hsi"][:, invalid] = 0.0
        return collate(group, self.band_sets, normalized=config.normalize)


def _normalise(image: np.ndarray, band_set: dict[str, np.ndarray]) -> np.ndarray:
    return (image - band_set["mean"][:, None, None]) / band_set["std"][:, None, None]


def _split(total: int, parts: int, part: int) -> tuple[int, int]:
    return total * part // parts, total * (part + 1) // parts


def collate(group: list[dict[str, Any]], band_sets: dict[str, dict[str, np.ndarray]],
            normalized: bool = False) -> dict[str, Any]:
    """Stack samples into a batch dict; bands are zero-padded to the widest sample, ``band_mask`` says which
    are real (all True within one band set). ``hsi * band_std + band_mean`` is always the stored (reflectance)
    value: the index statistics when the loader normalised, 0 and 1 otherwise."""
    count = len(group)
    height, width = group[0]["hsi"].shape[1:]
    max_bands = max(s["hsi"].shape[0] for s in group)
    hsi = torch.zeros(count, max_bands, height, width)
    wavelengths = torch.full((count, max_bands), float("nan"))
    band_mask = torch.zeros(count, max_bands, dtype=torch.bool)
    band_mean = torch.zeros(count, max_bands)
    band_std = torch.ones(count, max_bands)
    valid = torch.ones(count, height, width, dtype=torch.bool)
    for i, sample in enumerate(group):
        bands = sample["hsi"].shape[0]
        hsi[i, :bands] = torch.from_numpy(sample["hsi"])
        wavelengths[i, :bands] = torch.from_numpy(band_sets[sample["meta"]["band_set"]]["wavelengths"])
        band_mask[i, :bands] = True
        if normalized:
            band_set = band_sets[sample["meta"]["band_set"]]
            band_mean[i, :bands] = torch.from_numpy(band_set["mean"])
            band_std[i, :bands] = torch.from_numpy(band_set["std"])
        if "valid" in sample:
            valid[i] = torch.from_numpy(sample["valid"].astype(bool))
    batch: dict[str, Any] = {
        "hsi": hsi,
        "wavelengths": wavelengths,
        "band_mask": band_mask,
        "band_mean": band_mean,
        "band_std": band_std,
        "valid": valid,
        "key": [s["key"] for s in group],
        "scene": [s["meta"]["scene"] for s in group],
        "sensor": [s["meta"].get("sensor", "unknown") for s in group],
        "band_set": [s["meta"]["band_set"] for s in group],
        "origin": torch.tensor([s["meta"].get("origin", [0, 0]) for s in group]),
    }
    if any("labels" in s for s in group):  # 0 = unlabelled for samples without labels
        batch["labels"] = torch.stack([torch.from_numpy(s["labels"].astype(np.int64)) if "labels" in s
                                       else torch.zeros(height, width, dtype=torch.int64) for s in group])
    if all("abundances" in s for s in group) and len({s["abundances"].shape for s in group}) == 1:
        batch["abundances"] = torch.from_numpy(np.stack([s["abundances"] for s in group]).astype(np.float32))
        if all("endmembers" in s for s in group) and len({s["endmembers"].shape for s in group}) == 1:
            batch["endmembers"] = torch.from_numpy(np.stack([s["endmembers"] for s in group]))
    if all("pair" in s for s in group):
        batch["pair"] = torch.from_numpy(np.stack([s["pair"] for s in group]).astype(np.float32))
        pair_set = band_sets.get(group[0]["meta"].get("pair_band_set", ""))
        if pair_set is not None:
            batch["pair_wavelengths"] = torch.from_numpy(np.stack([pair_set["wavelengths"]] * count))
    return batch


class StreamingLoader:
    """Iterable of batch dicts for one rank, with ``len()``, ``set_epoch``, ``stats`` and resumable state."""

    def __init__(self, config: LoaderConfig, rank: int | None = None, world_size: int | None = None):
        self.config = config
        default_rank, default_world = distributed_position()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world size {self.world_size}")
        self.index = load_index(config.shards)
        self.epoch = 0
        self._workers = max(config.num_workers, 1)
        self._delivered = [0] * self._workers
        self._stats: dict[str, int] = {}  # summed over the loader's life
        self._warned: set[str] = set()
        self._distinct_bad: dict[str, int] = {}
        if self.index["total_samples"] < 1:
            raise ConfigError(f"shard index {config.shards} lists no samples")

    # Worker w of an epoch delivers ``worker_batches`` batches; the rank gets that many times the workers.
    @property
    def worker_batches(self) -> int | None:
        if not self.config.resampled:
            return None
        if self.config.batches_per_epoch is not None:
            return math.ceil(self.config.batches_per_epoch / self._workers)
        global_batch = self.config.batch_size * self.world_size
        return math.ceil(math.ceil(self.index["total_samples"] / global_batch) / self._workers)

    def __len__(self) -> int:
        if self.worker_batches is not None:
            return self.worker_batches * self._workers
        # finite mode: exact only with one band set (buckets add partial batches), an upper bound otherwise
        start, stop = _split(self.index["total_samples"], self.world_size, self.rank)
        per_worker = [_split(stop - start, self._workers, w) for w in range(self._workers)]
        rounding = math.floor if self.config.drop_last else math.ceil
        return sum(rounding((b - a) / self.config.batch_size) for a, b in per_worker)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start_epoch(epoch)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self._delivered = epoch, [0] * self._workers

    @property
    def epoch_complete(self) -> bool:
        """Resampled mode: every batch of the epoch was delivered (its length is known in advance)."""
        return self.worker_batches is not None and sum(self._delivered) >= len(self)

    @property
    def stats(self) -> dict[str, int]:
        """Sample counters of this loader's life, summed over epochs and workers: good, bad and one entry per
        skip reason (samples re-read to restore a resumed position are counted again)."""
        return dict(self._stats)

    def _count(self, counters: dict[str, int], previous: dict[str, int]) -> None:
        for key, value in counters.items():
            self._stats[key] = self._stats.get(key, 0) + value - previous.get(key, 0)

    def _report_skips(self, events: list[tuple[str, str]]) -> None:
        """Warn once per distinct skipped sample or shard over the loader's life; a flood of distinct ones of one
        reason is thinned to the first three, then every power of ten."""
        for reason, message in events:
            if message in self._warned:
                continue
            self._warned.add(message)
            distinct = self._distinct_bad[reason] = self._distinct_bad.get(reason, 0) + 1
            if distinct <= 3 or math.log10(distinct).is_integer():
                warnings.warn(f"skipped ({reason}, {distinct} so far): {message}", DataWarning, stacklevel=3)

    def fingerprint(self) -> dict[str, Any]:
        shards = hashlib.sha1(json.dumps([r.get("sha256", r["file"]) for r in self.index["shards"]]).encode())
        settings = {k: v for k, v in asdict(self.config).items()
                    if k in ("batch_size", "num_workers", "resampled", "shuffle_buffer", "seed", "batches_per_epoch",
                             "batching", "crop_size", "drop_last")}
        return {**settings, "world_size": self.world_size, "rank": self.rank, "shards": shards.hexdigest()[:16]}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "delivered_per_worker": list(self._delivered), "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        recorded, current = state.get("fingerprint", {}), self.fingerprint()
        differing = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
        if differing:
            details = ", ".join(f"{k}: recorded {recorded.get(k)!r}, now {current.get(k)!r}" for k in differing)
            raise ConfigError(f"cannot resume the data position: loader settings differ ({details})")
        self._start_epoch(int(state["epoch"]))
        self._delivered = [int(n) for n in state["delivered_per_worker"]]
        if self.epoch_complete:  # recorded by a version that moved on only when asked for one batch too many
            self._start_epoch(self.epoch + 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = ShardStream(self.index, self.config, self.rank, self.world_size, self.epoch,
                             list(self._delivered), self.worker_batches)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.config.num_workers,
            prefetch_factor=self.config.prefetch_factor if self.config.num_workers else None,
            pin_memory=self.config.pin_memory,
        )
        ended = False
        counted: dict[int, dict[str, int]] = {}  # each worker's counters as last reported in this pass
        for batch in loader:
            worker = batch.pop("_worker")
            counters = batch.pop("_stats")
            self._count(counters, counted.get(worker, {}))
            counted[worker] = counters
            self._report_skips(batch.pop("_events"))
            if "_error" in batch:
                name, message = batch["_error"]
                raise getattr(errors, name, HsfmError)(message)
            if batch.pop("_end", False):
                continue
            self._delivered[worker] += 1
            if self.epoch_complete:
                # The epoch's last batch: the position moves to the next epoch now, so that a checkpoint taken
                # after this batch resumes at the start of the next epoch rather than at an exhausted one.
                self._start_epoch(self.epoch + 1)
                ended = True
            yield batch
        if not ended and self.worker_batches is None:  # finite mode: the end is known when the stream runs dry
            self._start_epoch(self.epoch + 1)
