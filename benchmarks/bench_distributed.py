"""Distributed training engines on CPU: per-rank memory of one step, DDP scaling 1 -> 2 processes, and the time from a
preemption signal to a checkpoint on disk.

Every figure comes from torchrun children (world size 2 unless said otherwise, gloo, CPU, OMP_NUM_THREADS=1 per
process) started by this script, which collects their JSON. The engines are measured as the trainer drives them:

* memory: one optimiser step of ``--model`` (default ``large``, 8x8 patches: ~347 M parameters) under each engine
  (``ddp``, ``zero2`` = ``deepspeed=zero2``, ``zero3`` = ``deepspeed=zero3``, ``fsdp2`` =
  ``trainer.strategy=fsdp2``), composed with the same Hydra overrides ``hsfm pretrain`` takes, run by
  ``Trainer.fit()`` for ``trainer.max_steps=1`` on a small in-memory batch (``--batch`` tiles of ``--tile`` px with
  ``--bands`` bands over 400-2500 nm) with the pretraining stage's own step (MAE objective). Two hooks watch the
  loop: one on ``strategy.step`` (after backward, before the optimiser: the gradients held) and one in place of
  ``Trainer.save`` (after the optimiser step: parameters and optimiser state; the checkpoint itself is not written).
  What each rank holds is counted as tensor storage, each storage once (views of one flat buffer count as that
  buffer): "params" the module's parameter tensors as they are on that rank (DDP and ZeRO-2: whole; FSDP2: the
  DTensor local shards ``to_local()``; ZeRO-3: each parameter's partition ``ds_tensor`` plus the parameters kept
  whole below ``stage3_param_persistence_threshold``), "master" the fp32 partitions DeepSpeed's optimiser steps (a
  copy of this rank's slice of the weights, kept even in fp32 training), "grads" the gradients after backward
  (``param.grad``, or local shards, and DeepSpeed's gradient partitions), "optim" the AdamW moments (and step
  counters), "buffers" other tensors the engine keeps: DDP's gradient buckets (a second copy of the gradients in
  C++, sizes from ``_get_ddp_logging_data()``, since Accelerate's default is ``gradient_as_bucket_view=False``) and
  whatever else the DeepSpeed optimiser object holds, and "leftover" parameters the trainer's own parameter groups
  still reference after the engine replaced them (FSDP2). "peak RSS" (``resource.getrusage``, max over the two
  ranks) is the cruder whole-process figure: it includes the model as first built (every engine builds the whole
  fp32 model on every rank before sharding it), the weightless twin the trainer deep-copies on rank 0 for sharded
  engines, activations, communication buffers, memory malloc keeps after a free, and Python itself.
* scaling: ``hsfm pretrain`` (the default demo job, tiny model, demo shards in a temporary directory) under DDP
  with 1 and 2 processes (1 thread each; ``--threads-case``: also 1 process with 2 threads); the loop's own
  ``perf/step_time_s`` of every step (``trainer.log_every=1``, evaluation off) after ``--warmup`` steps, averaged
  over ``--steps``; samples/s = the job's samples per step / step time (the per-process batch stays 16, so 2
  processes do twice the work per step). Rounds interleave the cases; the median over rounds is reported.
* preemption: ``hsfm pretrain`` (tiny model; ``--quick``: the tests' micro model) under torchrun with 2 processes,
  ``trainer.max_steps`` and ``trainer.checkpoint_every`` out of reach. The launcher ignores SIGUSR1 (as
  slurm/launch.sh starts it: a bare torchrun dies of SIGUSR1 and leaves its workers running), and once
  ``metrics.jsonl`` grows SIGUSR1 goes to the launcher and both workers (what ``scancel --signal=USR1`` does). Then the
  seconds until a new ``checkpoints/step_*/manifest.json`` exists, until ``checkpoints/latest`` names it, and until
  the workers and the launcher have exited. ``--check-launcher`` (on by default, off with ``--quick``) also sends
  SIGUSR1 to a bare torchrun's process group and records what happens (the workers, each in a session of its own,
  do not get it).

The machine is noisy: read ratios, not absolute times. Nothing is asserted; the script exits 0 unless a child
fails. Every figure's JSON entry carries the command that produced it.

    python benchmarks/bench_distributed.py                       # everything, large model (~7-10 min on 2 cores)
    python benchmarks/bench_distributed.py --quick --json out.json   # tiny versions of everything (well under 1 min)
    python benchmarks/bench_distributed.py --sections memory --engines ddp,zero3 --model base
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
SECTIONS = ("memory", "scaling", "preemption")
ENGINES = {"ddp": [], "zero2": ["deepspeed=zero2"], "zero3": ["deepspeed=zero3"], "fsdp2": ["trainer.strategy=fsdp2"]}
# the tests' micro model (tests/runs.py), for the quick preemption run
MICRO = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=32",
         "model.decoder_depth=1", "model.decoder_num_heads=2", "model.spectral_channels=8", "model.spectral_basis=8",
         "data.train.batch_size=4"]
# no W&B, progress bar, figures or evaluation (the untrained baseline and the final scores are not measured here)
QUIET = ["trainer.wandb=false", "trainer.progress=false", "trainer.figure_every=0", "data.eval=null"]
DEFAULTS = {"model": "large", "batch": 2, "tile": 32, "bands": 64, "warmup": 10, "steps": 40, "rounds": 3,
            "repeats": 3, "preempt_model": "tiny"}
QUICK = {"model": "tiny", "batch": 2, "tile": 16, "bands": 16, "warmup": 2, "steps": 3, "rounds": 1,
         "repeats": 1, "preempt_model": "micro"}
MB = 2 ** 20
CATEGORIES = ("params", "master", "grads", "optim", "buffers", "leftover")


# ------------------------------------------------------------------------------------------------ shared helpers

def child_env(threads: int = 1) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "ACCELERATE_USE_CPU": "true", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "HSFM_DEBUG": "",
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    # DeepSpeed JIT-compiles its CPU shared-memory op on first use (~25 s); a fixed directory keeps it cached
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    return env


ENV_SHOWN = ("OMP_NUM_THREADS", "ACCELERATE_USE_CPU", "DS_ACCELERATOR", "WANDB_MODE")


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def shown(command: list[str], env: dict[str, str]) -> str:
    """The command as one shell line, with the environment that matters (run from the repository root)."""
    words = [shlex.quote(w) for w in command]
    if words[0] == shlex.quote(sys.executable):
        words[0] = "python"
    words = [w.replace(str(REPO) + "/", "") for w in words]
    return " ".join([f"{key}={env[key]}" for key in ENV_SHOWN] + words)


def run_child(command: list[str], env: dict[str, str], timeout: float, what: str) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise RuntimeError(f"{what} failed (exit {result.returncode}) after {time.perf_counter() - started:.0f} s:\n"
                           f"{tail}")
    return result


def say(message: str) -> None:
    print(message, flush=True)


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def trimmed_rss_bytes() -> int:
    """RSS after glibc hands its free heap pages back (freed tensors otherwise stay resident in malloc's arenas)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


# ------------------------------------------------------------------------------------- memory: the worker side

class InMemoryLoader:
    """The few things the trainer asks of a training loader, over one fixed batch (the same on every rank)."""

    def __init__(self, batch: dict[str, Any], batch_size: int, per_epoch: int = 8):
        from types import SimpleNamespace

        self.config = SimpleNamespace(batch_size=batch_size)
        self.batch, self.per_epoch, self.epoch, self.delivered = batch, per_epoch, 0, 0

    def __iter__(self):
        for _ in range(self.per_epoch):
            self.delivered += 1
            yield self.batch
        self.epoch += 1

    @property
    def stats(self) -> dict[str, int]:
        return {"good": self.delivered * self.config.batch_size}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "delivered_per_worker": [self.delivered]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def synthetic_batch(n: int, bands: int, tile: int, seed: int = 0) -> dict[str, Any]:
    """Smooth positive spectra (4 Gaussian-bump endmembers) mixed by smooth abundances, band-normalised, in the
    layout the loader's collate gives."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lam = torch.linspace(400.0, 2500.0, bands)
    centres = 400 + 2100 * torch.rand(n, 4, 3, 1, generator=g)
    widths = 50 + 300 * torch.rand(n, 4, 3, 1, generator=g)
    spectra = 0.05 + (0.4 * torch.rand(n, 4, 3, 1, generator=g)
                      * torch.exp(-0.5 * ((lam - centres) / widths) ** 2)).sum(dim=2)
    coarse = torch.randn(n, 4, max(2, tile // 8), max(2, tile // 8), generator=g)
    logits = torch.nn.functional.interpolate(coarse, size=(tile, tile), mode="bilinear", align_corners=False)
    hsi = torch.einsum("nmb,nmhw->nbhw", spectra, (2 * logits).softmax(dim=1))
    mean, std = hsi.mean(dim=(0, 2, 3)), hsi.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return {"hsi": (hsi - mean[:, None, None]) / std[:, None, None], "wavelengths": lam.expand(n, -1).clone(),
            "band_mask": torch.ones(n, bands, dtype=torch.bool), "band_mean": mean.expand(n, -1).clone(),
            "band_std": std.expand(n, -1).clone(), "valid": torch.ones(n, tile, tile, dtype=torch.bool),
            "key": [f"synthetic{i}" for i in range(n)], "scene": ["synthetic"] * n, "sensor": ["synthetic"] * n,
            "band_set": ["synthetic"] * n, "origin": torch.zeros(n, 2, dtype=torch.long)}


class Census:
    """Bytes of tensor storage, each storage counted once, in the first category that reaches it."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}
        self.where: dict[str, dict[str, int]] = {}

    def add(self, category: str, tensor: Any, name: str = "") -> None:
        import torch

        if not torch.is_tensor(tensor):
            return
        if hasattr(tensor, "to_local"):  # a DTensor: what this rank holds is its local shard
            tensor = tensor.to_local()
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        self.bytes.setdefault(category, 0)
        if size == 0 or key == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.bytes[category] += size
        if name:
            where = self.where.setdefault(category, {})
            where[name] = where.get(name, 0) + size


def tensors_in(value: Any, name: str, depth: int = 3):
    """(name, tensor) for the tensors in ``value`` and in the lists, tuples and dicts it holds (``depth`` levels)."""
    import torch

    if torch.is_tensor(value):
        yield name, value
    elif depth > 0 and isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from tensors_in(item, f"{name}[{index}]", depth - 1)
    elif depth > 0 and isinstance(value, dict):
        for key, item in value.items():
            yield from tensors_in(item, f"{name}[{key!r}]", depth - 1)


def clean_name(name: str) -> str:
    """An attribute path without its indices and DeepSpeed's name mangling: grouped per attribute."""
    name = re.sub(r"_DeepSpeedZeroOptimizer(_Stage3)?__", "", name)
    return re.sub(r"\[[^\]]*\]", "", name)


def census(strategy: Any, trainer: Any) -> dict[str, Any]:
    """What this rank holds now: params, master (DeepSpeed's fp32 partitions), grads, optim, buffers, leftover."""
    counted = Census()
    module = strategy.module
    for name, parameter in module.named_parameters():
        if hasattr(parameter, "ds_tensor"):  # ZeRO-3: the partition, and the whole tensor where materialised
            counted.add("params", parameter.ds_tensor, "ds_tensor")
            counted.add("params", parameter.data, "whole (persistent or gathered)")
        else:
            counted.add("params", parameter, "parameters")
    optimizer = strategy.optimizer  # DeepSpeed: the base AdamW over the fp32 partitions
    zero = getattr(strategy, "zero_optimizer", None)
    if zero is not None:  # the fp32 partitions the ZeRO optimiser steps (stage 1-2 / stage 3 names)
        for attribute in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            for name, tensor in tensors_in(getattr(zero, attribute, None), attribute):
                counted.add("master", tensor, clean_name(name))
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            counted.add("master", parameter, "optimizer's parameters")
    for name, parameter in module.named_parameters():
        counted.add("grads", parameter.grad, "param.grad")
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            counted.add("grads", parameter.grad, "master.grad")
    if zero is not None:  # gradient partitions: the ZeRO optimiser's attributes that name gradients
        for attribute, value in vars(zero).items():
            if "grad" in attribute.lower():
                for name, tensor in tensors_in(value, attribute):
                    counted.add("grads", tensor, clean_name(name))
    for state in optimizer.state.values():
        for key, value in state.items():
            counted.add("optim", value, key)
    if zero is not None:
        for attribute, value in vars(zero).items():
            if attribute != "optimizer":
                for name, tensor in tensors_in(value, attribute):
                    counted.add("buffers", tensor, clean_name(name))
    logging_data = getattr(strategy.model, "_get_ddp_logging_data", None)
    if logging_data is not None:  # DDP's reducer: gradient buckets in C++, a second copy unless they are the grads
        data = logging_data()
        if not data.get("gradient_as_bucket_view", 0):
            sizes = [int(size) for size in str(data.get("bucket_sizes", "")).split(",") if size.strip()]
            counted.bytes["buffers"] = counted.bytes.get("buffers", 0) + sum(sizes)
            counted.where.setdefault("buffers", {})["DDP reducer buckets"] = sum(sizes)
    # parameters the trainer's own parameter groups still reference, where the engine replaced them (FSDP2 builds
    # new sharded Parameters: the originals stay alive, whole, as long as something holds them)
    for group in getattr(trainer, "_groups", None) or []:
        for parameter in group["params"]:
            counted.add("leftover", parameter, "Trainer._groups")
    for category in CATEGORIES:
        counted.bytes.setdefault(category, 0)
    return {"bytes": counted.bytes, "where": counted.where, "rss": rss_bytes(), "peak_rss": peak_rss_bytes()}


def worker_memory(args: argparse.Namespace) -> None:
    import torch

    for engine, overrides in json.loads(args.overrides).items():  # one engine after the other (--quick: several)
        measure_engine(args, engine, overrides)
        gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def measure_engine(args: argparse.Namespace, engine: str, overrides: list[str]) -> None:
    import torch

    from hsfm_train.engine.logging import RunLogger
    from hsfm_train.engine.trainer import Trainer, make_accelerator
    from hsfm_train.models.registry import build_model
    from hsfm_train.objectives.pretrain import PretrainObjective
    from hsfm_train.stages.pretrain import PretrainStage, load_pretrain_config

    config = load_pretrain_config(overrides)
    accelerator = make_accelerator(config.trainer)
    rank = accelerator.process_index
    out = Path(args.result_dir) / engine
    record: dict[str, Any] = {"rank": rank, "world_size": accelerator.num_processes, "overrides": overrides,
                              "rss_at_start": rss_bytes(), "threads": torch.get_num_threads()}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.arch)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    record["rss_after_build"], record["peak_rss_after_build"] = rss_bytes(), peak_rss_bytes()
    timings["build_s"] = time.perf_counter() - started
    stage = PretrainStage(config)  # the stage's own step: forward, objective, token counts
    stage.accelerator = accelerator
    stage.objective = PretrainObjective(config.objective)
    stage.objective.check_model(model)
    loader = InMemoryLoader(synthetic_batch(args.batch, args.bands, args.tile, seed=rank), args.batch)
    logger = RunLogger(out / "run", {}, enabled=False, is_main_process=accelerator.is_main_process)
    trainer = Trainer(config.trainer, model, stage.step, loader, out / "run", logger, accelerator, seed=config.seed)
    del model
    started = time.perf_counter()
    strategy_model = trainer.model  # the strategy sets up here (wraps, shards, builds the optimiser)
    timings["setup_s"] = time.perf_counter() - started
    del strategy_model
    strategy = trainer.strategy
    record["rss_after_setup"], record["peak_rss_after_setup"] = rss_bytes(), peak_rss_bytes()
    snapshots: dict[str, Any] = {}
    step_function = strategy.step
    marks = {"fit": time.perf_counter()}

    def measured_step(clip: float, agree: Any) -> Any:
        marks["backward_done"] = time.perf_counter()
        snapshots["after_backward"] = census(strategy, trainer)
        marks["optimizer"] = time.perf_counter()
        norm, applied = step_function(clip, agree)
        timings["optimizer_step_s"] = time.perf_counter() - marks["optimizer"]
        record["grad_norm"], record["applied"] = float(norm), bool(applied)
        return norm, applied

    def measured_save() -> None:  # where the loop saves after the last step: measure instead of writing
        snapshots["after_step"] = census(strategy, trainer)
        snapshots["after_step"]["rss_trimmed"] = trimmed_rss_bytes()
        partitioned = [p for p in strategy.module.parameters() if hasattr(p, "ds_tensor")]
        if partitioned:  # ZeRO-3 decides which parameters persist (stay whole) at the first forward
            record["zero3_params_whole"] = sum(1 for p in partitioned if p.data.numel() > 0)
            record["zero3_params_partitioned"] = sum(1 for p in partitioned if p.data.numel() == 0)
            record["zero3_whole_elements"] = sum(p.data.numel() for p in partitioned)

    strategy.step = measured_step
    trainer.save = measured_save
    state = trainer.fit()
    timings["forward_backward_s"] = marks["backward_done"] - marks["fit"]
    record.update(timings=timings, loss=state.last_loss, steps=state.step, snapshots=snapshots,
                  peak_rss=peak_rss_bytes())
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    accelerator.wait_for_everyone()
    logger.finish()


# ---------------------------------------------------------------------------------- memory: the parent side

def memory_overrides(args: argparse.Namespace, engine: str) -> list[str]:
    overrides = [f"model={args.model}", "experiment=demo", *ENGINES[engine], "trainer.max_steps=1",
                 "trainer.wandb=false", "trainer.progress=false", "trainer.figure_every=0",
                 f"data.train.batch_size={args.batch}"]
    if engine == "zero3" and args.zero3_persistence is not None:
        overrides.append(f"trainer.deepspeed.zero_optimization.stage3_param_persistence_threshold="
                         f"{args.zero3_persistence}")
    return overrides


def run_memory(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    # one launch per engine, so that each has its own processes (peak RSS); --quick runs them all in one launch
    launches = [args.engines] if args.quick else [[engine] for engine in args.engines]
    for engines in launches:
        result_dir = scratch / f"memory-{'-'.join(engines)}"
        result_dir.mkdir(parents=True)
        overrides = {engine: memory_overrides(args, engine) for engine in engines}
        command = torchrun(2, str(SCRIPT), "--worker", "memory", "--overrides", json.dumps(overrides),
                           "--batch", str(args.batch), "--tile", str(args.tile), "--bands", str(args.bands),
                           "--result-dir", str(result_dir))
        env = child_env()
        say(f"memory: {', '.join(engines)} ...")
        started = time.perf_counter()
        run_child(command, env, args.timeout, f"memory {', '.join(engines)}")
        wall = time.perf_counter() - started
        shown_command = shown(command, env).replace(str(result_dir), "RESULTS")
        for engine in engines:
            ranks = [json.loads((result_dir / engine / f"rank{r}.json").read_text()) for r in range(2)]
            rows[engine] = row = summarise_memory(engine, ranks, wall, shown_command)
            say(f"  {engine}: {row['total_mb']:.0f} MB per rank, peak RSS {row['peak_rss_mb']:.0f} MB, "
                f"step {row['timings_s']['forward_backward_s'] + row['timings_s']['optimizer_step_s']:.1f} s")
        say(f"  ({wall:.0f} s)")
    if "ddp" in rows:
        for row in rows.values():
            row["ratio_to_ddp"] = row["total_mb"] / rows["ddp"]["total_mb"]
            row["state_ratio_to_ddp"] = row["state_mb"] / rows["ddp"]["state_mb"]
            row["peak_rss_ratio_to_ddp"] = row["peak_rss_mb"] / rows["ddp"]["peak_rss_mb"]
    return {"settings": {"model": args.model, "world_size": 2, "batch_per_rank": args.batch, "tile": args.tile,
                         "bands": args.bands, "experiment": "demo (8x8 patches, plain MAE)",
                         "zero3_persistence_threshold": args.zero3_persistence,
                         "launches": "one torchrun launch for every engine" if args.quick else
                                     "one torchrun launch per engine",
                         "peak_rss": "getrusage maxrss: with one launch for every engine (--quick) it is the "
                                     "running maximum over the engines measured so far",
                         "what": "bytes of tensor storage per rank; grads after backward, the rest after the "
                                 "optimiser step; MB = 2^20 bytes; per-rank figures are the max over ranks"},
            "engines": rows}


def summarise_memory(engine: str, ranks: list[dict[str, Any]], wall: float, command: str) -> dict[str, Any]:
    def held(r: dict[str, Any], category: str) -> int:  # gradients at their peak (after backward), the rest after
        return r["snapshots"]["after_backward" if category == "grads" else "after_step"]["bytes"][category]

    row: dict[str, Any] = {f"{category}_mb": max(held(r, category) for r in ranks) / MB for category in CATEGORIES}
    row["grads_after_step_mb"] = max(r["snapshots"]["after_step"]["bytes"]["grads"] for r in ranks) / MB
    totals = [sum(held(r, category) for category in CATEGORIES) for r in ranks]
    state = [sum(held(r, category) for category in ("params", "master", "grads", "optim")) for r in ranks]
    row["total_mb"], row["total_mb_per_rank"] = max(totals) / MB, [t / MB for t in totals]
    row["state_mb"], row["state_mb_per_rank"] = max(state) / MB, [t / MB for t in state]
    row["peak_rss_mb"] = max(r["peak_rss"] for r in ranks) / MB
    row["peak_rss_mb_per_rank"] = [r["peak_rss"] / MB for r in ranks]
    row["rss_after_step_mb_per_rank"] = [r["snapshots"]["after_step"]["rss"] / MB for r in ranks]
    row["rss_after_step_trimmed_mb"] = max(r["snapshots"]["after_step"]["rss_trimmed"] for r in ranks) / MB
    row["rss_after_step_trimmed_mb_per_rank"] = [r["snapshots"]["after_step"]["rss_trimmed"] / MB for r in ranks]
    row["rss_after_build_mb_per_rank"] = [r["rss_after_build"] / MB for r in ranks]
    row["peak_rss_mb_by_phase"] = {  # getrusage's maximum so far, at each point: which phase set the peak
        "after_build": max(r["peak_rss_after_build"] for r in ranks) / MB,
        "after_setup": max(r["peak_rss_after_setup"] for r in ranks) / MB,
        "after_backward": max(r["snapshots"]["after_backward"]["peak_rss"] for r in ranks) / MB,
        "after_step": max(r["snapshots"]["after_step"]["peak_rss"] for r in ranks) / MB}
    row["parameters"] = ranks[0]["parameters"]
    row["loss"], row["grad_norm"], row["step_applied"] = ranks[0]["loss"], ranks[0]["grad_norm"], ranks[0]["applied"]
    row["timings_s"] = {key: max(r["timings"][key] for r in ranks) for key in ranks[0]["timings"]}
    row["wall_s"] = wall
    row["where_mb_rank0"] = {snapshot: {category: {name: size / MB for name, size in names.items()}
                                        for category, names in ranks[0]["snapshots"][snapshot]["where"].items()}
                             for snapshot in ("after_backward", "after_step")}
    for key in ("zero3_params_whole", "zero3_params_partitioned", "zero3_whole_elements"):
        if key in ranks[0] and engine == "zero3":
            row[key] = ranks[0][key]
    row["command"] = command
    return row


# ------------------------------------------------------------------------------------------------- demo data

def demo_dir(args: argparse.Namespace) -> Path:
    """The demo shards: --demo-dir, or a folder of the scratch directory; built on first use (a complete build is
    reused)."""
    directory = Path(args.demo_dir) if args.demo_dir else args.demo_root / "demo"
    if not (directory / "demo.json").exists():
        say(f"building the demo shards in {directory} ...")
    from hsfm_train.data.demo import build_demo_shards

    build_demo_shards(str(directory))
    return directory


def shown_in(command: list[str], env: dict[str, str], args: argparse.Namespace, scratch: Path) -> str:
    """``shown`` with this run's temporary paths replaced by placeholders."""
    text = shown(command, env)
    if args.demo_dir:
        text = text.replace(str(Path(args.demo_dir)), "DEMO")
    return text.replace(str(scratch), "SCRATCH").replace(str(args.demo_root), "SCRATCH")


def pretrain_command(nproc: int, overrides: list[str]) -> list[str]:
    return torchrun(nproc, "-m", "hsfm_train.cli", "pretrain", *overrides)


def metrics_of(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return entries


# --------------------------------------------------------------------------------------------------- scaling

def run_scaling(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    demo = demo_dir(args)
    steps = args.warmup + args.steps
    cases = {"1 process": (1, 1), "2 processes": (2, 1)}
    if args.threads_case:
        cases["1 process, 2 threads"] = (1, 2)
    base = [f"data.demo_dir={demo}", f"trainer.max_steps={steps}", "trainer.log_every=1",
            f"trainer.checkpoint_every={steps}", "trainer.optim.warmup_steps=2", *QUIET,
            *(MICRO if args.quick else [])]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    for round_index in range(args.rounds):
        for name, (nproc, threads) in cases.items():
            output = scratch / f"scaling-{round_index}-{nproc}p{threads}t"
            overrides = [*base, f"output_dir={output}"]
            command = pretrain_command(nproc, overrides)
            env = child_env(threads)
            say(f"scaling: round {round_index + 1}/{args.rounds}, {name} ...")
            run_child(command, env, args.timeout, f"scaling {name}")
            entries = [e for e in metrics_of(output) if "perf/step_time_s" in e]
            timed = [e for e in entries if e["step"] > args.warmup]
            times = [e["perf/step_time_s"] for e in timed]
            rates = [e["perf/samples_per_s"] for e in timed]
            runs[name].append({"mean_step_s": statistics.fmean(times), "median_step_s": statistics.median(times),
                               "samples_per_s": statistics.fmean(rates),
                               "samples_per_step": round(rates[0] * times[0]),
                               "command": shown_in(command, env, args, scratch)})
    rows = {}
    for name, measured in runs.items():
        rows[name] = {"mean_step_s": statistics.median(r["mean_step_s"] for r in measured),
                      "samples_per_s": statistics.median(r["samples_per_s"] for r in measured),
                      "samples_per_step": measured[0]["samples_per_step"],
                      "processes": cases[name][0], "threads_per_process": cases[name][1],
                      "rounds": measured, "command": measured[0]["command"]}
    one = rows["1 process"]
    for row in rows.values():
        row["step_time_ratio"] = row["mean_step_s"] / one["mean_step_s"]
        row["throughput_ratio"] = row["samples_per_s"] / one["samples_per_s"]
        # within each round (the cases of one round ran back to back, under about the same load)
        row["throughput_ratio_per_round"] = [r["samples_per_s"] / o["samples_per_s"]
                                             for r, o in zip(row["rounds"], one["rounds"])]
    return {"settings": {"model": "micro (tests/runs.py)" if args.quick else "tiny", "job": "hsfm pretrain (demo)",
                         "strategy": "ddp", "warmup_steps": args.warmup, "timed_steps": args.steps,
                         "rounds": args.rounds, "batch_per_process": "data.train.batch_size of the demo job",
                         "what": "the loop's perf/step_time_s per step (data, forward, backward, all-reduce, "
                                 "optimiser), mean over the timed steps, median over rounds"},
            "cases": rows}


# ------------------------------------------------------------------------------------------------ preemption

def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def installed(checkpoints: Path) -> list[Path]:
    """The checkpoint directories renamed into place (not the step_N.partial-PID ones being written)."""
    if not checkpoints.exists():
        return []
    return [path for path in checkpoints.iterdir() if re.fullmatch(r"step_\d+", path.name)]


def ignore_usr1() -> None:  # in the launcher, before exec: as slurm/launch.sh's `trap "" USR1`
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def run_preemption_once(args: argparse.Namespace, scratch: Path, index: int) -> dict[str, Any]:
    demo = demo_dir(args)
    output = scratch / f"preempt-{index}"
    model = MICRO if args.preempt_model == "micro" else ["model=tiny", "experiment=demo"]
    overrides = [*model, *QUIET, f"data.demo_dir={demo}", f"output_dir={output}", "trainer.max_steps=1000000",
                 "trainer.checkpoint_every=1000000", "trainer.log_every=1", "trainer.optim.warmup_steps=2"]
    command = pretrain_command(2, overrides)
    env = child_env()
    log = open(scratch / f"preempt-{index}.log", "w")
    launcher = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=ignore_usr1)
    checkpoints = output / "checkpoints"
    try:
        deadline = time.monotonic() + args.timeout
        seen_steps = 0
        while time.monotonic() < deadline:  # wait for training steps being logged (the file grows)
            if launcher.poll() is not None:
                raise RuntimeError(f"preemption run exited early ({launcher.returncode}); see {log.name}")
            steps = len(metrics_of(output))
            if seen_steps == 0 and steps > 0:
                seen_steps = steps
            if seen_steps and steps >= seen_steps + args.preempt_after:
                break
            time.sleep(0.05)
        workers = children_of(launcher.pid)
        before = set(installed(checkpoints))
        step_at_signal = max((e["step"] for e in metrics_of(output)), default=0)
        step_times = [e["perf/step_time_s"] for e in metrics_of(output) if "perf/step_time_s" in e]
        signalled = time.monotonic()
        for pid in [launcher.pid, *workers]:
            os.kill(pid, signal.SIGUSR1)
        manifest_s = latest_s = workers_s = None
        new_dir = None
        while time.monotonic() - signalled < args.timeout:
            now = time.monotonic() - signalled
            if manifest_s is None and checkpoints.exists():
                for directory in set(installed(checkpoints)) - before:
                    if (directory / "manifest.json").exists():
                        manifest_s, new_dir = now, directory
            if manifest_s is not None and latest_s is None:
                try:
                    if (checkpoints / "latest").read_text().strip() == new_dir.name:
                        latest_s = now
                except OSError:
                    pass
            if workers_s is None and not any(alive(pid) for pid in workers):
                workers_s = now
            exited = launcher.poll() is not None
            if exited and latest_s is not None:
                break
            if exited and now > 5:  # exited without (seen) a checkpoint
                break
            time.sleep(0.002)
        launcher.wait(timeout=args.timeout)
        exit_s = time.monotonic() - signalled
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    summary = json.loads((output / "summary.json").read_text()) if (output / "summary.json").exists() else {}
    size = sum(f.stat().st_size for f in new_dir.rglob("*") if f.is_file()) if new_dir is not None else 0
    return {"signal_to_manifest_s": manifest_s, "signal_to_latest_s": latest_s,
            "signal_to_workers_exit_s": workers_s, "signal_to_exit_s": exit_s,
            "launcher_exit_code": launcher.returncode, "workers_signalled": len(workers),
            "step_at_signal": step_at_signal, "checkpoint": new_dir.name if new_dir else None,
            "checkpoint_mb": size / MB, "stopped_by": summary.get("stopped_by"),
            "mean_step_s_before_signal": statistics.fmean(step_times[-10:]) if step_times else None,
            "command": shown_in(command, env, args, scratch)}


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def check_bare_launcher(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """What SIGUSR1 does to a torchrun started without ignoring it, sent to its process group (``kill -USR1 -PGID``):
    whether the launcher survives and whether the workers (torchrun starts each in a session of its own) get it."""
    demo = demo_dir(args)
    wait = 1.0 if args.quick else 3.0
    output = scratch / "preempt-bare"
    overrides = [*MICRO, *QUIET, f"data.demo_dir={demo}", f"output_dir={output}", "trainer.max_steps=1000000",
                 "trainer.checkpoint_every=1000000", "trainer.log_every=1"]
    command = pretrain_command(2, overrides)
    env = child_env()
    with open(scratch / "preempt-bare.log", "w") as log:
        launcher = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group, as a job step's shell has
        workers: list[int] = []
        try:
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline and len(metrics_of(output)) < 2 and launcher.poll() is None:
                time.sleep(0.05)
            workers = children_of(launcher.pid)
            os.killpg(launcher.pid, signal.SIGUSR1)
            time.sleep(wait)
            result = {"launcher_exit_code": launcher.poll(), "workers": len(workers),
                      "workers_alive_after_wait": sum(alive(pid) for pid in workers), "wait_s": wait,
                      "checkpoint_written": bool(installed(output / "checkpoints")),
                      "command": shown_in(command, env, args, scratch),
                      "signal": "kill -USR1 -<the launcher's process group>"}
        finally:  # the workers (orphaned if the launcher died): stop them the way the trainer honours, then kill
            for pid in workers:
                if alive(pid):
                    os.kill(pid, signal.SIGUSR1)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and any(alive(pid) for pid in workers):
                time.sleep(0.1)
            for pid in workers:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            if launcher.poll() is None:
                launcher.kill()
            launcher.wait()
    result["checkpoint_after_signalling_workers"] = bool(installed(output / "checkpoints"))
    return result


def run_preemption(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    trials = []
    for index in range(args.repeats):
        say(f"preemption: run {index + 1}/{args.repeats} ...")
        trials.append(run_preemption_once(args, scratch, index))
        t = trials[-1]
        say("  " + ", ".join(f"{key[len('signal_to_'):-2]} {t[key]:.2f} s" if t[key] is not None else f"{key}: never"
                             for key in ("signal_to_manifest_s", "signal_to_latest_s", "signal_to_workers_exit_s",
                                         "signal_to_exit_s")))

    def median(key: str) -> float | None:
        values = [t[key] for t in trials if t[key] is not None]
        return statistics.median(values) if values else None

    return {"settings": {"model": args.preempt_model, "processes": 2, "strategy": "ddp",
                         "signal": "SIGUSR1 to the launcher (which ignores it, as slurm/launch.sh starts torchrun) and "
                                   "to both workers, once metrics.jsonl has grown by "
                                   f"{args.preempt_after} steps",
                         "what": "seconds from the signal until checkpoints/step_*/manifest.json exists, until "
                                 "checkpoints/latest names it, until both workers and the launcher exited; median "
                                 "over runs (polled every 2 ms)"},
            "signal_to_manifest_s": median("signal_to_manifest_s"), "signal_to_latest_s": median("signal_to_latest_s"),
            "signal_to_workers_exit_s": median("signal_to_workers_exit_s"),
            "signal_to_exit_s": median("signal_to_exit_s"), "trials": trials, "command": trials[0]["command"],
            "bare_torchrun": check_bare_launcher(args, scratch) if args.check_launcher else None}


# ------------------------------------------------------------------------------------------------- reporting

def print_tables(results: dict[str, Any]) -> None:
    memory = results.get("memory")
    if memory:
        s = memory["settings"]
        say(f"\nper-rank memory of one training step: model {s['model']}, world size 2, {s['batch_per_rank']} x "
            f"{s['tile']}x{s['tile']} px x {s['bands']} bands per rank (MB = 2^20 bytes, max over ranks)")
        nan = float("nan")
        say(f"{'engine':7} {'params':>7} {'master':>7} {'grads':>7} {'optim':>7} {'state':>7} {'vs DDP':>6} "
            f"{'buffers':>7} {'leftover':>8} {'total':>7} {'vs DDP':>6} {'peak RSS':>8} {'vs DDP':>6} {'step s':>6}")
        for engine, row in memory["engines"].items():
            t = row["timings_s"]
            say(f"{engine:7} {row['params_mb']:7.0f} {row['master_mb']:7.0f} {row['grads_mb']:7.0f} "
                f"{row['optim_mb']:7.0f} {row['state_mb']:7.0f} {row.get('state_ratio_to_ddp', nan):6.2f} "
                f"{row['buffers_mb']:7.0f} {row['leftover_mb']:8.0f} {row['total_mb']:7.0f} "
                f"{row.get('ratio_to_ddp', nan):6.2f} {row['peak_rss_mb']:8.0f} "
                f"{row.get('peak_rss_ratio_to_ddp', nan):6.2f} {t['forward_backward_s'] + t['optimizer_step_s']:6.1f}")
        say("state = params + master + grads + optim; buffers = DDP's gradient buckets, DeepSpeed's other tensors; "
            "leftover = parameters the trainer's groups still hold after the engine replaced them; total = all of "
            "these. step s = forward + backward + optimiser step of the one step (slowest rank)")
    scaling = results.get("scaling")
    if scaling:
        s = scaling["settings"]
        say(f"\nDDP step time, {s['model']} model on the demo job ({s['timed_steps']} steps after {s['warmup_steps']} "
            f"warm-up, median of {s['rounds']} round(s))")
        say(f"{'case':22} {'samples/step':>12} {'step s':>8} {'samples/s':>10} {'step x':>7} {'throughput x':>12}")
        for name, row in scaling["cases"].items():
            say(f"{name:22} {row['samples_per_step']:12d} {row['mean_step_s']:8.3f} {row['samples_per_s']:10.1f} "
                f"{row['step_time_ratio']:7.2f} {row['throughput_ratio']:12.2f}")
    preemption = results.get("preemption")
    if preemption:
        def value(x: float | None) -> str:
            return "never" if x is None else f"{x:.2f} s"

        say(f"\npreemption (SIGUSR1, 2 processes, {preemption['settings']['model']} model, median of "
            f"{len(preemption['trials'])}): checkpoint manifest {value(preemption['signal_to_manifest_s'])}, "
            f"latest {value(preemption['signal_to_latest_s'])}, workers exited "
            f"{value(preemption['signal_to_workers_exit_s'])}, launcher exited {value(preemption['signal_to_exit_s'])}"
            f"; a step took {preemption['trials'][0]['mean_step_s_before_signal'] or float('nan'):.3f} s, the "
            f"checkpoint is {preemption['trials'][0]['checkpoint_mb']:.1f} MB")
        bare = preemption.get("bare_torchrun")
        if bare:
            say(f"a bare torchrun's process group sent SIGUSR1: launcher exit code {bare['launcher_exit_code']}, "
                f"{bare['workers_alive_after_wait']} of {bare['workers']} workers still running {bare['wait_s']:g} s "
                f"later, checkpoint "
                f"written: {bare['checkpoint_written']} (after signalling the workers themselves: "
                f"{bare['checkpoint_after_signalling_workers']})")


# ------------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "small", "base", "large", "huge"),
                        help="preset of the memory section (large)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="memory section engines (ddp,zero2,zero3,fsdp2)")
    parser.add_argument("--batch", type=int, help="memory section: tiles per rank (2)")
    parser.add_argument("--tile", type=int, help="memory section: tile size (32)")
    parser.add_argument("--bands", type=int, help="memory section: bands (64)")
    parser.add_argument("--zero3-persistence", type=int,
                        help="ZeRO-3 stage3_param_persistence_threshold (default: configs/deepspeed/zero3.yaml's; "
                             "--quick: 0, since every parameter of the tiny model is below it)")
    parser.add_argument("--warmup", type=int, help="scaling: untimed steps (10)")
    parser.add_argument("--steps", type=int, help="scaling: timed steps (40)")
    parser.add_argument("--rounds", type=int, help="scaling: interleaved rounds (3)")
    parser.add_argument("--repeats", type=int, help="preemption: runs (3)")
    parser.add_argument("--preempt-after", type=int, default=3, help="preemption: logged steps before the signal")
    parser.add_argument("--check-launcher", action=argparse.BooleanOptionalAction,
                        help="preemption: also send SIGUSR1 to a bare torchrun's process group and see what happens "
                             "(default: on, off with --quick)")
    parser.add_argument("--threads-case", action="store_true",
                        help="scaling: also 1 process with 2 intra-op threads (very slow when the cores are shared)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: memory,scaling,preemption")
    parser.add_argument("--quick", action="store_true", help="tiny versions of everything (seconds)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per child run")
    parser.add_argument("--demo-dir", help="demo shards to use (built there if missing; default: in the scratch "
                                           "directory)")
    parser.add_argument("--scratch", help="working directory (default: a temporary one, removed afterwards)")
    parser.add_argument("--json", help="write every figure and the settings to this file")
    parser.add_argument("--worker", choices=("memory",), help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    values = QUICK if args.quick else DEFAULTS
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.check_launcher is None:
        args.check_launcher = not args.quick
    if args.quick and args.zero3_persistence is None:
        args.zero3_persistence = 0
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(args.engines) - set(ENGINES) or set(args.sections) - set(SECTIONS):
        parser.error(f"--engines: a subset of {','.join(ENGINES)}; --sections: a subset of {','.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "memory":
        worker_memory(args)
        return 0
    from importlib.metadata import PackageNotFoundError, version

    results: dict[str, Any] = {
        "benchmark": "bench_distributed",
        "command": shlex.join(["python", "benchmarks/bench_distributed.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {key: value for key, value in vars(args).items()
                     if key not in ("worker", "overrides", "result_dir", "json", "scratch")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}}
    for package in ("torch", "deepspeed", "accelerate"):
        try:
            results["machine"][package] = version(package)
        except PackageNotFoundError:
            pass
    runners = {"memory": run_memory, "scaling": run_scaling, "preemption": run_preemption}
    with tempfile.TemporaryDirectory(prefix="bench_distributed-") as temporary:
        if args.scratch:  # the demo shards are reused from there; every run gets a fresh directory
            Path(args.scratch).mkdir(parents=True, exist_ok=True)
            args.demo_root = Path(args.scratch).resolve()
            scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.demo_root))
        else:
            scratch = args.demo_root = Path(temporary)
        for section in args.sections:
            started, load = time.perf_counter(), os.getloadavg()[0]
            results[section] = runners[section](args, scratch)
            results[section]["wall_s"] = time.perf_counter() - started
            # the 1-minute load average before and after: other work on the machine shows here
            results[section]["load_average"] = [load, os.getloadavg()[0]]
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        say(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
