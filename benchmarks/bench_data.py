"""Data loader throughput against its in-memory decode bound.

What is measured (all in one run, so the ratios are robust on a noisy machine):

* in-memory decode bound: every shard is read into memory and split into samples (``iter_raw_samples`` over an
  ``io.BytesIO``) before timing; the timed part is, single-threaded, exactly the loader's own per-sample CPU work
  to turn bytes into ready batches: ``ShardStream._decoded`` (``decode_sample`` + band-set checks),
  ``ShardStream._grouped`` (batching) and ``ShardStream._collate`` (float32, normalisation, ``collate``).
  It leaves out tar parsing, file reads, the shuffle buffer and worker IPC.
* loader: ``StreamingLoader`` over the shards on disk, finite mode (``resampled=False``), default shuffle buffer,
  for each worker count, after warming the page cache. "end-to-end" is one whole epoch including DataLoader
  worker start-up and shutdown. "steady" subtracts that fixed cost, measured in the same run as a whole epoch of a
  no-op dataset with the same worker count. (Timing from the first batch would not work: with a shuffle buffer as
  large as a worker's share, the first batch only appears after the worker has decoded all of its samples.)

Rounds interleave all measurements and each is repeated ``--repeats`` times; best and median are reported.
The benchmark process runs torch with ``--torch-threads`` (default 1, as in DataLoader workers): with 2 threads on a
busy 2-core machine, the per-sample tensor copies in ``collate`` stall on the thread barrier.
Samples/s counts delivered samples; MB/s is 1e6 bytes of sample payload (the tar members' contents) per second.
The script always exits 0: it is a measurement, not a test.

    python benchmarks/bench_data.py                       # synthetic corpus in a temp dir
    python benchmarks/bench_data.py --shards DIR --json out.json --augment
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from hsfm_train.data.augment import AugmentConfig
from hsfm_train.data.pipeline import LoaderConfig, ShardStream, StreamingLoader
from hsfm_train.data.shards import ShardBuildConfig, build_shards, iter_raw_samples, load_index, shard_urls
from hsfm_train.data.synthetic import SENSOR_GRIDS, SyntheticSceneConfig, generate_scenes
from hsfm_train.data.tiling import TilingConfig

REQUIRED_RATIO = 0.5
# Augmentation measured with --augment: flips and rotation at their default probabilities, plus spectral noise.
AUGMENTATION = AugmentConfig(enabled=True, hflip=0.5, vflip=0.5, rotate90=0.5, spectral_noise=0.5)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="existing shard directory (with index.json); default: build a synthetic one")
    parser.add_argument("--scenes", type=int, default=60, help="synthetic scenes to build (default 60)")
    parser.add_argument("--size", type=int, default=64, help="synthetic scene height and width (default 64)")
    parser.add_argument("--tile", type=int, default=32, help="tile size (default 32)")
    parser.add_argument("--grid", default="aviris224", choices=sorted(SENSOR_GRIDS), help="band grid (default aviris224)")
    parser.add_argument("--samples-per-shard", type=int, default=64, help="synthetic build: samples per shard (64)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic shard directory and print its path")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated num_workers to measure (default 0,1,2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of every measurement (default 3)")
    parser.add_argument("--augment", action="store_true",
                        help="add rows with augmentation on (flip/rotate/spectral noise), at the largest worker count")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads in this process (default 1: the bound is single-threaded, and "
                             "DataLoader workers run with 1 thread too)")
    parser.add_argument("--json", help="write all numbers to this JSON file")
    return parser.parse_args()


def build_synthetic_corpus(directory: Path, args: argparse.Namespace) -> None:
    scene_config = SyntheticSceneConfig(height=args.size, width=args.size, target_wavelengths_nm=args.grid)
    build_config = ShardBuildConfig(str(directory), tiling=TilingConfig(tile_size=args.tile), dtype="float16",
                                    max_samples_per_shard=args.samples_per_shard)
    build_shards(generate_scenes(scene_config, args.scenes, seed=0), build_config)


def read_samples_into_memory(index: dict[str, Any]) -> list[tuple[str, str, dict[str, bytes]]]:
    """Every sample as (url, key, {member: bytes}), the form the loader's decoding stage consumes."""
    samples = []
    for url in shard_urls(index):
        contents = Path(url).read_bytes()
        samples.extend((url, key, raw) for key, raw in iter_raw_samples(io.BytesIO(contents), url, {}))
    return samples


def warm_page_cache(index: dict[str, Any]) -> int:
    return sum(len(Path(url).read_bytes()) for url in shard_urls(index))


def loader_config(args: argparse.Namespace, shards: str, num_workers: int, augmented: bool) -> LoaderConfig:
    return LoaderConfig(shards=shards, batch_size=args.batch_size, num_workers=num_workers, resampled=False,
                        augment=AUGMENTATION if augmented else AugmentConfig())


def time_in_memory_decode(index: dict[str, Any], config: LoaderConfig, raw_samples: list) -> tuple[float, list[str]]:
    """Seconds for the loader's decode + batch + collate stages over in-memory samples, single-threaded."""
    stream = ShardStream(index, config, rank=0, world_size=1, epoch=0, skip_per_worker=[0], worker_batches=None)
    keys: list[str] = []
    start = time.perf_counter()
    decoded = stream._decoded(iter(raw_samples), counters={})
    for number, group in enumerate(stream._grouped(decoded)):
        batch = stream._collate(group, np.random.default_rng(np.random.SeedSequence([config.seed, 0, 0, 0, number])))
        keys.extend(batch["key"])
    return time.perf_counter() - start, keys


def time_loader_epoch(config: LoaderConfig) -> tuple[float, float, list[str]]:
    """(seconds for one whole epoch, seconds to the first batch, delivered keys)."""
    loader = StreamingLoader(config, rank=0, world_size=1)
    keys: list[str] = []
    first_batch = None
    start = time.perf_counter()
    for batch in loader:
        if first_batch is None:
            first_batch = time.perf_counter() - start
        keys.extend(batch["key"])
    return time.perf_counter() - start, first_batch or 0.0, keys


class _OneItemPerWorker(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1)


def time_worker_overhead(num_workers: int) -> float:
    """Seconds for a whole epoch of a no-op dataset: DataLoader worker start-up, IPC and shutdown."""
    loader = DataLoader(_OneItemPerWorker(), batch_size=None, num_workers=num_workers,
                        prefetch_factor=2 if num_workers else None)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def summarise(seconds: list[float], samples: int, payload_bytes: int) -> dict[str, Any]:
    best, median = min(seconds), statistics.median(seconds)
    return {"seconds": seconds, "samples": samples, "payload_bytes": payload_bytes,
            "best_samples_per_s": samples / best, "median_samples_per_s": samples / median,
            "best_MB_per_s": payload_bytes / best / 1e6, "median_MB_per_s": payload_bytes / median / 1e6}


def run(args: argparse.Namespace, shards: str) -> dict[str, Any]:
    index = load_index(shards)
    worker_counts = [int(w) for w in args.workers.split(",")]
    raw_samples = read_samples_into_memory(index)
    payload = {key: sum(len(member) for member in raw.values()) for _, key, raw in raw_samples}
    corpus_bytes = warm_page_cache(index)
    print(f"corpus: {shards}: {len(index['shards'])} shards, {len(raw_samples)} samples, "
          f"{sum(payload.values()) / 1e6:.1f} MB payload ({corpus_bytes / 1e6:.1f} MB of tar files), "
          f"{len(index['band_sets'])} band set(s)")
    print(f"page cache warmed by reading every shard once; in-memory samples read before timing; "
          f"batch size {args.batch_size}, shuffle buffer {LoaderConfig(shards=shards).shuffle_buffer}, "
          f"{args.repeats} repeats, torch threads {torch.get_num_threads()}")

    # (name, augmented, num_workers or None for the in-memory bound)
    cases = [("in-memory decode bound", False, None)] + [(f"loader w={w}", False, w) for w in worker_counts]
    if args.augment:
        cases += [("in-memory bound +aug", True, None), (f"loader w={max(worker_counts)} +aug", True, max(worker_counts))]
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    first_batch: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    overhead: dict[int, list[float]] = {w: [] for w in worker_counts}
    delivered: dict[str, list[str]] = {}
    for _ in range(args.repeats):  # rounds interleave the cases, so a slow spell of the machine hits all of them
        for w in worker_counts:
            overhead[w].append(time_worker_overhead(w))
        for name, augmented, workers in cases:
            config = loader_config(args, shards, workers or 0, augmented)
            if workers is None:
                elapsed, keys = time_in_memory_decode(index, config, raw_samples)
            else:
                elapsed, to_first, keys = time_loader_epoch(config)
                first_batch[name].append(to_first)
            seconds[name].append(elapsed)
            delivered[name] = keys

    results: dict[str, Any] = {"corpus": {"shards": shards, "shard_files": len(index["shards"]),
                                          "samples": len(raw_samples), "payload_bytes": sum(payload.values()),
                                          "tar_bytes": corpus_bytes},
                               "batch_size": args.batch_size, "repeats": args.repeats,
                               "worker_overhead_seconds": {str(w): v for w, v in overhead.items()}, "rows": {}}
    for name, augmented, workers in cases:
        samples, payload_bytes = len(delivered[name]), sum(payload[k] for k in delivered[name])
        row = {"augmented": augmented, "num_workers": workers}
        if workers is None:
            row.update(summarise(seconds[name], samples, payload_bytes))
        else:
            fixed = statistics.median(overhead[workers])
            steady = [max(s - fixed, 1e-9) for s in seconds[name]]
            row.update(summarise(steady, samples, payload_bytes), worker_overhead_s=fixed,
                       first_batch_seconds=first_batch[name],
                       end_to_end=summarise(seconds[name], samples, payload_bytes))
            bound = results["rows"]["in-memory bound +aug" if augmented else "in-memory decode bound"]
            row["ratio_to_bound"] = row["best_samples_per_s"] / bound["best_samples_per_s"]
            row["end_to_end_ratio_to_bound"] = row["end_to_end"]["best_samples_per_s"] / bound["best_samples_per_s"]
        results["rows"][name] = row
    return results


def print_table(results: dict[str, Any]) -> None:
    header = (f"{'':24} {'samples':>7} {'best/s':>8} {'median/s':>8} {'best MB/s':>9} {'ratio':>6} | "
              f"{'e2e best/s':>10} {'e2e med/s':>9} {'e2e ratio':>9} {'start-up s':>10} {'1st batch s':>11}")
    print(header)
    print("-" * len(header))
    for name, row in results["rows"].items():
        line = (f"{name:24} {row['samples']:7d} {row['best_samples_per_s']:8.0f} {row['median_samples_per_s']:8.0f} "
                f"{row['best_MB_per_s']:9.1f} ")
        if row["num_workers"] is None:
            line += f"{'1.00x':>6} |"
        else:
            e2e = row["end_to_end"]
            line += (f"{row['ratio_to_bound']:5.2f}x | {e2e['best_samples_per_s']:10.0f} {e2e['median_samples_per_s']:9.0f} "
                     f"{row['end_to_end_ratio_to_bound']:8.2f}x {row['worker_overhead_s']:10.3f} "
                     f"{statistics.median(row['first_batch_seconds']):11.3f}")
        print(line)
    print("best/median: steady state (end-to-end minus the worker start-up/shutdown cost of a no-op dataset); "
          "e2e: whole epoch incl. start-up; ratio: best loader / best in-memory bound; 1st batch: median")


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.torch_threads)
    temporary = None
    shards = args.shards
    try:
        if shards is None:
            temporary = Path(tempfile.mkdtemp(prefix="bench_data_"))
            start = time.perf_counter()
            build_synthetic_corpus(temporary, args)
            print(f"built {args.scenes} synthetic {args.size}x{args.size} scenes ({args.grid}, tiles {args.tile}, "
                  f"float16) into {temporary} in {time.perf_counter() - start:.1f}s")
            shards = str(temporary)
        results = run(args, shards)
        print_table(results)
        plain = [row for row in results["rows"].values() if row["num_workers"] is not None and not row["augmented"]]
        if plain:
            best = max(plain, key=lambda row: row["best_samples_per_s"])
            results["best_loader_ratio"] = best["ratio_to_bound"]
            print(f"best loader / in-memory decode bound = {best['ratio_to_bound']:.2f}x (>= {REQUIRED_RATIO} required)"
                  f" [steady state, num_workers={best['num_workers']}; end-to-end incl. start-up: "
                  f"{best['end_to_end_ratio_to_bound']:.2f}x]")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
            print(f"wrote {args.json}")
    except Exception as error:  # a measurement: report, never fail the caller
        print(f"benchmark failed: {type(error).__name__}: {error}")
    finally:
        if temporary is not None:
            if args.keep:
                print(f"kept shards in {temporary}")
            else:
                shutil.rmtree(temporary, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
