"""The training loop on Accelerate, for every stage that trains: accumulation, clipping, AdamW with warm-up +
cosine per step over the parameter groups the stage gives, a non-finite guard, throughput, periodic validation
with best-metric tracking, checkpoints with exact resume, and clean exit on SIGTERM / SIGUSR1 (Slurm preemption).

The loop knows nothing of models or batches: a stage hands it ``step_fn(model, batch, generator) -> StepResult``
and the parameter groups. Everything a checkpoint holds is the ``state_dict()`` of a named component (model,
optimizer, scheduler, loader, train state, and any stateful extras of the stage).

Nothing here assumes one process: the data loader splits itself by rank, every decision that must agree across
ranks (skip a non-finite step, stop on a signal) is taken on all-reduced values, and how the model and optimiser are
spread over the processes (DDP, FSDP2, DeepSpeed ZeRO-2/3) is the strategy's business (``engine/distributed.py``).
A checkpoint holds the consolidated fp32 weights (world-size independent) plus the engine's optimiser state: full
for DDP, one shard per rank otherwise. Resuming at another world size keeps the weights, the step and the
schedule; DDP keeps the AdamW moments too, sharded engines restart them; the data position moves to the start of
the next epoch (the new ranks' slices of the interrupted one are unknown). Both are warned about and recorded.

Exact resume: a step is a deterministic function of (weights, optimiser, scheduler, data position, step number):
the masking noise of micro-batch m of step s comes from a generator seeded by (seed, s, m, rank), and the loader
restores its position from its state. A run killed at any moment and restarted with the same command continues
from ``latest`` and ends with the same weights as an uninterrupted run (on CPU, where kernels are deterministic).
"""
from __future__ import annotations

import math
import os
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, broadcast_object_list, gather_object

from hsfm_train.engine.checkpoint import Checkpointer, Ranks, set_rng_state
from hsfm_train.engine.distributed import STRATEGIES, ModelTwin, make_strategy, transformer_blocks
from hsfm_train.engine.logging import RunLogger
from hsfm_train.errors import ConfigError, DataQualityError, HsfmError

# dense bf16 tensor-core peaks (FLOP/s) for the MFU estimate; unknown devices report no MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


class TrainingDiverged(HsfmError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # MAE: lr = base_lr x effective batch / 256
    lr: float | None = None  # an absolute peak lr overrides the scaling rule
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 20
    clip_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still computed for the finite check)

    def __post_init__(self) -> None:
        def positive(value: float) -> bool:
            return math.isfinite(value) and value > 0

        problems = []
        if not positive(self.base_lr):
            problems.append(f"base_lr must be a finite number > 0, got {self.base_lr}")
        if self.lr is not None and not positive(self.lr):
            problems.append(f"lr must be a finite number > 0 (or null for the base_lr rule), got {self.lr}")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            problems.append(f"min_lr must be a finite number >= 0, got {self.min_lr}")
        if self.lr is not None and positive(self.lr) and self.min_lr > self.lr:
            problems.append(f"min_lr {self.min_lr} is above the peak lr {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            problems.append(f"betas must be two values in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if math.isnan(self.clip_grad_norm):
            problems.append("clip_grad_norm must be a number (<= 0 turns clipping off), got nan")
        if problems:
            raise ConfigError("trainer.optim: " + "; ".join(problems))


@dataclass
class TrainerConfig:
    max_steps: int = 200  # optimiser steps
    grad_accumulation: int = 1
    global_batch: int | None = None  # if set: grad_accumulation = global_batch / (batch size x processes)
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or fp32 / bf16
    kernels: str | None = None  # None: $HSFM_KERNELS or auto (Triton on GPU); "reference" forces PyTorch
    log_every: int = 10
    checkpoint_every: int = 100
    keep_last: int = 3
    figure_every: int = 100  # 0: no figures
    max_nonfinite_steps: int = 10  # consecutive skipped steps before the run stops
    eval_every: int = 0  # steps between validations during training (0: only at the end)
    best_metric: str | None = None  # a key of the validation results to track, e.g. "psnr"
    best_mode: str = "max"  # "max" or "min": which direction of best_metric is better
    resume: bool = True  # continue from output_dir's latest checkpoint when there is one
    progress: bool = True
    wandb: bool = True  # offline unless an API key is configured
    wandb_project: str = "hsfm-train"
    strategy: str = "ddp"  # ddp (also one process) | fsdp2 | deepspeed (with trainer.deepspeed: deepspeed=zero2)
    deepspeed: dict[str, Any] | None = None  # the DeepSpeed config (configs/deepspeed/), without what trainer.* sets
    compile: bool = False  # torch.compile each transformer block before the strategy wraps the model
    timeout_s: float = 600.0  # a collective that waits longer (a dead or hung rank) fails the job
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        problems = []
        if self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.grad_accumulation < 1:
            problems.append(f"grad_accumulation must be >= 1, got {self.grad_accumulation}")
        if self.kernels not in (None, "auto", "reference", "triton"):
            problems.append(f"kernels must be auto, reference or triton, got {self.kernels!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            problems.append(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            problems.append("checkpoint_every and log_every must be >= 1")
        if self.eval_every < 0:
            problems.append(f"eval_every must be >= 0, got {self.eval_every}")
        if self.best_mode not in ("max", "min"):
            problems.append(f"best_mode must be max or min, got {self.best_mode!r}")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        elif (self.strategy == "deepspeed") != (self.deepspeed is not None):
            problems.append("trainer.strategy=deepspeed goes with a DeepSpeed config: choose one with deepspeed=zero2 "
                            "or deepspeed=zero3 (configs/deepspeed/), which sets both" if self.deepspeed is None else
                            f"trainer.deepspeed is set but trainer.strategy is {self.strategy!r}")
        if not self.timeout_s > 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if problems:
            raise ConfigError("trainer: " + "; ".join(problems))


def resolve_accumulation(config: TrainerConfig, batch_size: int, processes: int) -> int:
    """Micro-batches per optimiser step; a global batch that the per-process batch cannot tile is an error."""
    if config.global_batch is None:
        return config.grad_accumulation
    per_step = batch_size * processes
    if config.global_batch % per_step:
        raise ConfigError(f"trainer.global_batch {config.global_batch} is not divisible by batch_size {batch_size} "
                          f"x {processes} process(es) = {per_step}")
    accumulation = config.global_batch // per_step
    if config.grad_accumulation not in (1, accumulation):
        raise ConfigError(f"trainer.grad_accumulation {config.grad_accumulation} contradicts global_batch "
                          f"{config.global_batch} = {accumulation} x {per_step}; set only one of them")
    return accumulation


def make_accelerator(config: TrainerConfig) -> Accelerator:
    """The job's processes (a torchrun / accelerate launch world, or one process) and device; the process group
    uses gloo on CPU and fails any collective that waits longer than ``timeout_s``."""
    cuda = torch.cuda.is_available()
    if not cuda:  # tell DeepSpeed (imported by Accelerate) instead of letting it warn that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    precision = config.precision if config.precision != "auto" else ("bf16" if cuda else "fp32")
    if precision == "bf16" and not cuda:
        raise ConfigError("trainer.precision=bf16 needs a GPU; CPU training runs in fp32 (precision=auto)")
    # gloo for CPU process groups (NCCL needs GPUs); accumulation is handled by the loop, not by Accelerate
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    timeout = timedelta(seconds=config.timeout_s)
    handlers: list = [InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timeout)] if distributed else []
    # a batch uses the patch projection and decoder head of its own spectral grouping only
    # gradients as views of DDP's buckets: no second copy of every gradient
    handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True, gradient_as_bucket_view=True))
    return Accelerator(cpu=not cuda, mixed_precision="no" if precision == "fp32" else precision,
                       kwargs_handlers=handlers)


def peak_lr(optim: OptimConfig, effective_batch: int) -> float:
    return optim.lr if optim.lr is not None else optim.base_lr * effective_batch / 256


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine down to ``floor`` (a fraction of the peak)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    """What one micro-batch step gives the loop."""
    loss: torch.Tensor  # scalar; the loop backpropagates it (divided by the accumulation count)
    parts: dict[str, float] = field(default_factory=dict)  # named loss terms, logged as train/<name>
    samples: int = 0  # samples in the micro-batch on this process
    tokens: int = 0  # tokens processed, for throughput and MFU


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None
                     ) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters (frozen ones are left out). No weight decay on biases, norms,
    tokens and embeddings (MAE's rule), nor on names the model lists in ``no_weight_decay()``. A parameter whose
    name starts with a prefix of ``lr_scales`` trains at that multiple of the peak lr (heads, adapters)."""
    scales = dict(lr_scales or {})
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = next((value for prefix, value in scales.items() if name.startswith(prefix)), 1.0)
        decay = not (parameter.ndim <= 1 or name.endswith(("_token", "_embed")) or name in skip)
        groups.setdefault((scale, decay), []).append(parameter)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale,
             "name": f"{'decay' if decay else 'no_decay'}@{scale:g}"}
            for (scale, decay), params in groups.items() if params]


@dataclass
class TrainState:
    step: int = 0
    samples: int = 0
    skipped_steps: int = 0
    consecutive_skipped: int = 0
    stopped_by: str | None = None  # "max_steps", "signal SIGTERM" ...
    last_loss: float = float("nan")
    best_value: float | None = None  # of config.best_metric, at best_step
    best_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in TrainState.__dataclass_fields__:
                setattr(self, key, value)
        self.stopped_by = None


class PreemptionFlag:
    """SIGTERM / SIGUSR1 set a flag that the loop checks between steps; the handlers are restored afterwards."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *_exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class AcceleratorRanks(Ranks):
    """The checkpointer's view of the job's processes, on Accelerate's collectives."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.is_main_process = accelerator.is_main_process
        self.process_index, self.num_processes = accelerator.process_index, accelerator.num_processes

    def broadcast(self, value: Any) -> Any:
        if self.num_processes == 1:
            return value
        return broadcast_object_list([value], from_process=0)[0]

    def gather(self, value: Any) -> list[Any]:
        if self.num_processes == 1:
            return [value]
        return gather_object([value])


class Trainer:
    """Runs ``step_fn(model, batch, generator) -> StepResult`` for ``config.max_steps`` optimiser steps over an
    endless stream of batches from ``loader`` (a StreamingLoader).

    ``param_groups``: AdamW groups (default: :func:`parameter_groups` of the whole model); each group's
    ``lr_scale`` multiplies the peak lr. ``evaluate(model) -> {metric: value}`` runs every ``eval_every`` steps
    (logged as eval/<metric>; ``best_metric`` tracked in the train state). ``stateful``: further named components
    (with ``state_dict``/``load_state_dict``) the checkpoint must carry for exact resume."""

    def __init__(self, config: TrainerConfig, model: torch.nn.Module, step_fn: Callable[..., StepResult],
                 loader: Any, output_dir: str | Path, logger: RunLogger, accelerator: Accelerator, seed: int = 0,
                 param_groups: list[dict[str, Any]] | None = None,
                 evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 figure_fn: Callable[[torch.nn.Module, int], Path | None] | None = None,
                 run_metadata: dict[str, Any] | None = None, stateful: dict[str, Any] | None = None):
        self.config = config
        self.accelerator = accelerator
        self.loader = loader
        self.step_fn = step_fn
        self._agreed_part_names: list[str] = []  # loss-part names every rank knows (_job_means)
        self.logger = logger
        self.seed = seed
        self.evaluate = evaluate
        self.figure_fn = figure_fn
        self.run_metadata = run_metadata or {}
        self.stateful = dict(stateful or {})
        self.output_dir = Path(output_dir)
        self.ranks = AcceleratorRanks(accelerator)
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", keep_last=config.keep_last,
                                         ranks=self.ranks)
        batch = loader.config.batch_size
        self.effective_batch = batch * config.grad_accumulation * accelerator.num_processes
        optim = config.optim
        self.lr = peak_lr(optim, self.effective_batch)
        groups = param_groups if param_groups is not None else parameter_groups(model, optim.weight_decay)
        if not any(group["params"] for group in groups):
            raise ConfigError("nothing to train: the stage's parameter groups hold no trainable parameter")
        for group in groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)
        self.strategy = make_strategy(accelerator, config, batch)
        self._plain, self._groups = model, [group for group in groups if group["params"]]
        # engines that shard or re-type the live parameters export from a weightless twin of the plain model
        self._twin = ModelTwin(model) if config.strategy != "ddp" and accelerator.is_main_process else None
        self._pending: dict[str, Any] | None = None  # optimiser / scheduler state to apply once set up
        self.state = TrainState()
        self.resumed_from: Path | None = None  # the checkpoint resume() loaded
        self.resume_notes: list[str] = []  # what a resume at another world size or engine could not restore

    # --------------------------------------------------------------------------------------------- the engine

    def _setup(self) -> None:
        """Wrap the model with the strategy (once), then apply the optimiser state a resume left pending."""
        if self.strategy.model is not None:
            return
        optim, config = self.config.optim, self.config
        floor = optim.min_lr / self.lr if self.lr > 0 else 0.0
        if config.compile:  # block by block, in place: parameter names and state-dict keys stay as they are
            for block in transformer_blocks(self._plain):
                block.compile()
        self.strategy.setup(self._plain, self._groups, tuple(optim.betas),
                            lambda step: lr_factor(step, optim.warmup_steps, config.max_steps, floor))
        self._groups = None  # FSDP2 replaced these parameters by shards: holding them would keep a whole copy
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if pending.get("optimizer") is not None:
                self.strategy.load_optimizer_state(pending["optimizer"])
            self.strategy.scheduler.load_state_dict(pending["scheduler"])

    @property
    def model(self) -> Any:
        self._setup()
        return self.strategy.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        self._setup()
        return self.strategy.optimizer

    @property
    def scheduler(self) -> Any:
        self._setup()
        return self.strategy.scheduler

    def evaluation_model(self) -> torch.nn.Module:
        """The model evaluation and figures run on; with FSDP2 / ZeRO-3 every rank must call it together."""
        self._setup()
        return self.strategy.evaluation_model()

    def export_model(self) -> torch.nn.Module | None:
        """On the main process: a plain module with the consolidated fp32 weights (None on the others).
        Collective: every rank must call it."""
        self._setup()
        full = self.strategy.full_state()
        if not self.accelerator.is_main_process:
            return None
        if self._twin is None:
            return self.strategy.module
        return self._twin.materialise(full)

    # ------------------------------------------------------------------------------------------- checkpoints

    def resume(self) -> bool:
        """Load the latest checkpoint of this output directory, if any; returns whether one was loaded."""
        if not self.config.resume:
            return False
        loaded = self.checkpointer.load_newest_intact(rank=self.accelerator.process_index)
        if loaded is None:
            return False
        found, extra = loaded.path, loaded.extra
        recorded = extra.get("run_metadata", {}).get("fingerprint")
        current = self.run_metadata.get("fingerprint")
        if recorded is not None and current is not None and recorded != current:
            raise ConfigError(f"{self.output_dir} holds a run with another model/objective/data configuration "
                              f"({recorded} != {current}); use another output_dir or trainer.resume=false")
        # The optimiser and schedule come back from the checkpoint, so other settings would be silently ignored.
        recorded_optim, current_optim = extra.get("optimisation"), self._optimisation()
        if recorded_optim is not None:
            differing = ", ".join(f"{key}: checkpoint {recorded_optim.get(key)!r}, now {value!r}"
                                  for key, value in sorted(current_optim.items())
                                  if key in recorded_optim and recorded_optim[key] != value)
            if differing:
                raise ConfigError(f"{found} was trained with other optimisation settings ({differing}); resuming "
                                  "would ignore yours. Use the checkpoint's settings, another output_dir, or "
                                  "trainer.resume=false to start over (across world sizes, trainer.global_batch "
                                  "keeps the effective batch)")
        for name, component in self.stateful.items():
            if name not in extra.get("stateful", {}):
                raise ConfigError(f"{found} holds no state for {name!r}; it was written by another stage")
        # weights first, into the plain model, before any engine wraps (and perhaps shards or re-types) it
        self._plain.load_state_dict(loaded.model_state)
        self._pending = {"scheduler": loaded.scheduler_state, "optimizer": self._restorable_optimizer(loaded)}
        for name, component in self.stateful.items():
            component.load_state_dict(extra["stateful"][name])
        self._restore_data_position(extra["loader"], found)
        self.state.load_state_dict(extra.get("train_state", extra.get("trainer", {})))  # "trainer": before 0.2
        self.resumed_from = found
        if loaded.rng is not None:
            set_rng_state(*loaded.rng)
        for note in self.resume_notes:
            warnings.warn(f"resuming from {found}: {note}", stacklevel=2)
        self._setup()
        return True

    def _restorable_optimizer(self, loaded: Any) -> dict[str, Any] | None:
        """The optimiser state this run can take from the checkpoint: the full state of an unsharded engine at any
        world size, or this rank's shard from a run of the same engine and world size; else None (moments reset)."""
        extra, world = loaded.extra, self.accelerator.num_processes
        engine = extra.get("engine", {"strategy": "ddp", "sharded_optimizer": False})
        same_engine = engine.get("strategy") == self.config.strategy and \
            engine.get("zero_stage") == self._engine_record().get("zero_stage")
        if same_engine and not self.strategy.sharded_optimizer:
            return loaded.optimizer_state
        if same_engine and loaded.world_size == world and loaded.rank_state is not None:
            return loaded.rank_state.get("optimizer")
        reason = (f"it was written by {loaded.world_size} processes, this run has {world}" if same_engine else
                  f"it was written by strategy {engine.get('strategy')!r}, this run uses {self.config.strategy!r}")
        self.resume_notes.append(f"the AdamW moments start again from zero ({reason}); the weights, step and "
                                 "learning-rate schedule are restored")
        return None

    def _restore_data_position(self, loader_states: list[dict[str, Any]], found: Path) -> None:
        world = self.accelerator.num_processes
        if len(loader_states) == world:
            self.loader.load_state_dict(loader_states[self.accelerator.process_index])
            return
        # another world size: the new ranks' slices of the interrupted epoch are unknown, so the stream goes on
        # at the start of the next one (the rest of the interrupted epoch is not seen)
        epoch = max(int(state["epoch"]) for state in loader_states) + 1
        self.loader.set_epoch(epoch)
        self.resume_notes.append(f"the checkpoint was written by {len(loader_states)} processes, this run has "
                                 f"{world}: the data stream continues at the start of epoch {epoch}")

    def _engine_record(self) -> dict[str, Any]:
        record = {"strategy": self.config.strategy, "sharded_optimizer": self.strategy.sharded_optimizer,
                  "world_size": self.accelerator.num_processes}
        if self.config.deepspeed is not None:
            record["zero_stage"] = int(self.config.deepspeed.get("zero_optimization", {}).get("stage", 0))
        return record

    def save(self) -> Path:
        self._setup()
        loader_states = gather_object([self.loader.state_dict()])
        model_state = self.strategy.full_state()  # collective; the main process gets the whole model
        optimizer_state = self.strategy.optimizer_state()
        sharded = self.strategy.sharded_optimizer
        extra = {"train_state": self.state.state_dict(), "loader": loader_states,
                 "stateful": {name: component.state_dict() for name, component in self.stateful.items()},
                 "run_metadata": self.run_metadata, "optimisation": self._optimisation(),
                 "engine": self._engine_record()}
        path = self.checkpointer.save(self.state.step, model_state=model_state,
                                      optimizer_state=None if sharded else optimizer_state,
                                      scheduler_state=self.strategy.scheduler.state_dict(), extra=extra,
                                      rank_state={"optimizer": optimizer_state if sharded else None}
                                      if sharded or self.accelerator.num_processes > 1 else None)
        self.accelerator.wait_for_everyone()
        return path

    def _optimisation(self) -> dict[str, Any]:
        """What a resumed run must share with its checkpoint for the restored optimiser and schedule to be the
        ones asked for (max_steps may change: that extends or shortens the run; the accumulation may change with
        the world size as long as the effective batch stays)."""
        return {**{f"optim.{key}": value for key, value in asdict(self.config.optim).items()},
                "effective_batch": self.effective_batch}

    # -------------------------------------------------------------------------------------------------- loop

    def _batches(self) -> Iterator[dict[str, Any]]:
        device = self.accelerator.device
        while True:
            delivered = 0
            for batch in self.loader:
                delivered += 1
                yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            if delivered == 0:
                raise DataQualityError(f"the training loader delivered no batch in epoch {self.loader.epoch - 1} "
                                       f"(sample counts {self.loader.stats})")

    def _generator(self, step: int, micro: int) -> torch.Generator:
        """The masking noise of (step, micro-batch, rank): a function of the step, not of the RNG's history."""
        # numbered across the job: micro-batch m of rank r is the (r x accumulation + m)-th slice of the global batch,
        # so W ranks draw the masks one process with W times the accumulation would
        index = self.accelerator.process_index * self.config.grad_accumulation + micro
        entropy = np.random.SeedSequence([self.seed, step, index, 0])
        return torch.Generator().manual_seed(int(entropy.generate_state(1, np.uint64)[0] >> np.uint64(1)))

    def _agree(self, flag: bool) -> bool:
        """True on every rank when any rank says True."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _job_means(self, loss: torch.Tensor, parts: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss averaged over the ranks, and each loss part over the ranks that computed it: ranks may differ
        in their parts (an unpaired optical-SAR batch has no SAR reconstruction). The part names agreed so far
        ride along with the one reduce; only a step on which some rank has a name not yet agreed gathers the
        names (the first step, and rarely after)."""
        import torch.distributed as dist

        while True:
            names = self._agreed_part_names
            unknown = 1.0 if set(parts) - set(names) else 0.0
            values = [float(loss)] + [parts.get(name, 0.0) for name in names]
            present = [1.0] + [1.0 if name in parts else 0.0 for name in names]
            sums = self.accelerator.reduce(torch.tensor(values + present + [unknown], device=self.accelerator.device),
                                           reduction="sum").cpu()
            if sums[-1] == 0:
                break
            gathered: list[list[str] | None] = [None] * self.accelerator.num_processes
            dist.all_gather_object(gathered, sorted(parts))
            self._agreed_part_names = sorted(set(names) | {name for rank in gathered for name in rank or []})
        counts = sums[len(values):-1]
        means = sums[:len(values)] / counts.clamp(min=1.0)
        return means[0], {name: float(means[1 + k]) for k, name in enumerate(names) if counts[1 + k] > 0}

    def fit(self) -> TrainState:
        config, accelerator, state = self.config, self.accelerator, self.state
        self._setup()
        strategy = self.strategy
        batches = self._batches()
        bar = self.logger.progress(total=config.max_steps, initial=state.step, desc="pretrain",
                                   enabled=config.progress)
        window = {"time": 0.0, "samples": 0, "tokens": 0, "steps": 0}
        with PreemptionFlag() as preemption:
            while state.step < config.max_steps:
                started = time.perf_counter()
                strategy.model.train()
                losses, parts_sum, samples, tokens = [], {}, 0, 0
                for micro in range(config.grad_accumulation):
                    batch = next(batches)
                    last = micro == config.grad_accumulation - 1
                    with strategy.sync_gradients(last):
                        with accelerator.autocast():  # the forward only: backward runs outside autocast
                            result = self.step_fn(strategy.model, batch, self._generator(state.step, micro))
                        strategy.backward(result.loss, config.grad_accumulation, last)
                    losses.append(result.loss.detach().float())
                    for name, value in result.parts.items():
                        parts_sum[name] = parts_sum.get(name, 0.0) + float(value) / config.grad_accumulation
                    samples += result.samples
                    tokens += result.tokens
                clip = config.optim.clip_grad_norm if config.optim.clip_grad_norm > 0 else float("inf")
                loss_value = torch.stack(losses).mean()
                loss_finite = bool(torch.isfinite(loss_value))
                if accelerator.num_processes > 1:  # what is logged is the job's loss, not the main rank's share
                    loss_value, parts_sum = self._job_means(loss_value, parts_sum)
                # skipped: the weights and the optimiser moments stay as they were; the schedule moves on so a
                # resumed run stays step-aligned
                grad_norm, applied = strategy.step(clip, lambda bad: self._agree(bad or not loss_finite))
                if not applied:
                    state.skipped_steps += 1
                    state.consecutive_skipped += 1
                    if state.consecutive_skipped > config.max_nonfinite_steps:
                        raise TrainingDiverged(
                            f"{state.consecutive_skipped} consecutive steps had a non-finite loss or gradient "
                            f"(step {state.step}, loss {float(loss_value)}); the last good checkpoint is in "
                            f"{self.checkpointer.directory}: lower the lr or check the data")
                else:
                    state.consecutive_skipped = 0
                strategy.scheduler.step()
                state.step += 1
                state.samples += samples * accelerator.num_processes
                state.last_loss = float(loss_value)
                window["time"] += time.perf_counter() - started
                window["samples"] += samples * accelerator.num_processes
                window["tokens"] += tokens * accelerator.num_processes
                window["steps"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{state.last_loss:.4f}")

                if state.step % config.log_every == 0 or state.step == config.max_steps:
                    self._log(loss_value, parts_sum, grad_norm, window)
                    window = {"time": 0.0, "samples": 0, "tokens": 0, "steps": 0}
                if self.evaluate is not None and config.eval_every and state.step % config.eval_every == 0:
                    self.validate()
                if self.figure_fn is not None and config.figure_every and state.step % config.figure_every == 0:
                    # every rank draws (a sharded model's forward is collective); the stage writes on the main one
                    figure = self.figure_fn(self.evaluation_model(), state.step)
                    if figure is not None and accelerator.is_main_process:
                        self.logger.log_image("reconstruction", figure, state.step)
                    accelerator.wait_for_everyone()
                stop_signal = self._agree(preemption.received is not None)
                if state.step % config.checkpoint_every == 0 or state.step == config.max_steps or stop_signal:
                    self.save()
                if stop_signal:
                    state.stopped_by = f"signal {preemption.received or 'on another rank'}"
                    break
        bar.close()
        if state.stopped_by is None:
            state.stopped_by = "max_steps"
        return state

    def validate(self) -> dict[str, float]:
        """Run the stage's evaluation now, log it as eval/<metric> and track the best value of best_metric."""
        config, state = self.config, self.state
        results = self.evaluate(self.evaluation_model())  # every rank: the stage reduces the metrics
        scalars = {key: float(value) for key, value in results.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if config.best_metric is not None:
            if config.best_metric not in scalars:
                raise ConfigError(f"trainer.best_metric {config.best_metric!r} is not among the evaluation's "
                                  f"results {sorted(scalars)}")
            value = scalars[config.best_metric]
            better = (state.best_value is None or (value > state.best_value if config.best_mode == "max"
                                                   else value < state.best_value))
            if better and math.isfinite(value):
                state.best_value, state.best_step = value, state.step
            scalars["best_" + config.best_metric] = state.best_value
        self.logger.log({f"eval/{key}": value for key, value in scalars.items()}, step=state.step)
        return results

    def _log(self, loss: torch.Tensor, parts: dict[str, float], grad_norm: torch.Tensor,
             window: dict[str, float]) -> None:
        state, seconds = self.state, max(window["time"], 1e-9)
        metrics = {"train/loss": float(loss), "train/lr": self.scheduler.get_last_lr()[0],
                   "train/grad_norm": float(grad_norm), "train/skipped_steps": state.skipped_steps,
                   "perf/samples_per_s": window["samples"] / seconds, "perf/tokens_per_s": window["tokens"] / seconds,
                   "perf/step_time_s": seconds / max(1, window["steps"])}
        metrics.update({f"train/{name}": value for name, value in parts.items()})
        mfu = self._mfu(window["tokens"] / seconds)
        if mfu is not None:
            metrics["perf/mfu"] = mfu
        for name, value in self.loader.stats.items():
            metrics[f"data/{name}"] = value
        self.logger.log(metrics, step=state.step)

    def _mfu(self, tokens_per_second: float) -> float | None:
        """Model FLOPs utilisation: 6 x parameters x tokens per second against the device's bf16 peak (an
        upper-bound estimate: MAE's encoder sees only the visible quarter of the tokens)."""
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
        peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
        if peak is None:
            return None
        parameters = sum(p.numel() for p in self._plain.parameters())
        return 6 * parameters * tokens_per_second / (peak * self.accelerator.num_processes)
