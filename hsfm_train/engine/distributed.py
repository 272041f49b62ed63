"""How a model and its optimiser are spread over the processes of a job: one place for every training engine.

``trainer.strategy`` picks one:

* ``ddp``: PyTorch DistributedDataParallel through Accelerate (also the single-process case). Every rank holds
  the whole model and optimiser.
* ``fsdp2``: PyTorch FSDP2 (``fully_shard`` on every transformer block, then the root): parameters, gradients
  and optimiser states are sharded over the ranks; forward and backward passes gather what they need.
* ``deepspeed``: a DeepSpeed engine with ``trainer.deepspeed`` as its config (``configs/deepspeed/zero2.yaml``:
  ZeRO stage 2 shards gradients and optimiser states; ``zero3.yaml``: stage 3 shards the parameters too).

The trainer's loop calls only the methods of :class:`Strategy`, so the loop (accumulation, the non-finite guard,
the schedule, checkpoints) is the same for every engine. What a checkpoint holds, per engine:

* always: the consolidated fp32 weights (``full_state``, gathered on the main process), so an export or a
  resume at another world size never depends on how the run was sharded;
* ``ddp``: the full optimiser state (resuming at any world size keeps the AdamW moments);
* ``fsdp2`` / ``deepspeed``: each rank's shard of the optimiser state (``rank_state``). A resume at the same
  world size and engine is exact; at another, the weights come from the consolidated file and the optimiser
  moments start again from zero (the trainer warns and records it).

Nothing here is pickled: shards are plain tensors and JSON-able values, written by the checkpointer.
"""
from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from hsfm_train.errors import ConfigError

STRATEGIES = ("ddp", "fsdp2", "deepspeed")
# DeepSpeed settings the trainer owns: set them with trainer.* options, not inside trainer.deepspeed
_TRAINER_OWNED = {"train_batch_size": "data.train.batch_size x processes x trainer.grad_accumulation",
                  "train_micro_batch_size_per_gpu": "data.train.batch_size",
                  "gradient_accumulation_steps": "trainer.grad_accumulation / trainer.global_batch",
                  "gradient_clipping": "trainer.optim.clip_grad_norm", "optimizer": "trainer.optim",
                  "scheduler": "trainer.optim (warm-up + cosine)", "bf16": "trainer.precision",
                  "fp16": "trainer.precision (bf16 or fp32)"}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks that FSDP2 shards one by one (each gathered only while it runs)."""
    from hsfm_train.models.vit import Block

    return [module for module in model.modules() if isinstance(module, Block)]


def groups_by_name(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Parameter groups with parameter names in place of the parameters: engines that replace a model's
    parameters (FSDP2's DTensors) get their groups rebuilt from the names afterwards."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [{**group, "params": [names[id(parameter)] for parameter in group["params"]]} for group in groups]


def groups_of(model: nn.Module, named_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    parameters = dict(model.named_parameters())
    return [{**group, "params": [parameters[name] for name in group["params"]]} for group in named_groups]


def require_every_gradient(model: nn.Module) -> None:
    """Engines that reduce a fixed gradient layout (FSDP2, ZeRO) need a gradient for every parameter on every
    rank, also for the modules of spectral groups a rank's batch does not hold (they get zeros)."""
    for module in model.modules():
        if hasattr(module, "every_parameter_in_graph"):
            module.every_parameter_in_graph = True


class Strategy:
    """One training engine. After :meth:`setup`: ``model`` (what the step function calls), ``module`` (the
    underlying nn.Module), ``optimizer`` (whose param groups carry the lr the schedule sets) and ``scheduler``."""

    name: str
    shards_parameters = False  # forward passes are collective: every rank must run as many as the others
    sharded_optimizer = False  # the optimiser state lives in per-rank shards

    def __init__(self, accelerator: Any, config: Any, micro_batch: int):
        self.accelerator = accelerator
        self.config = config
        self.micro_batch = micro_batch
        self.model: Any = None
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None

    # ---- what every engine provides
    def setup(self, model: nn.Module, groups: list[dict[str, Any]], betas: tuple[float, float],
              lr_lambda: Callable[[int], float]) -> None:
        raise NotImplementedError

    def sync_gradients(self, last_micro_batch: bool) -> ContextManager:
        """Where gradients of a micro-batch are (not) reduced across ranks."""
        return nullcontext()

    def backward(self, loss: torch.Tensor, accumulation: int, last_micro_batch: bool) -> None:
        raise NotImplementedError

    def step(self, clip: float, agree: Callable[[bool], bool]) -> tuple[torch.Tensor, bool]:
        """Clip, then apply the optimiser step unless the gradient is not finite on some rank; returns (gradient
        norm before clipping, whether the step was applied). Gradients are cleared either way."""
        raise NotImplementedError

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's fp32 state dict on the main process ({} on the others). Collective."""
        raise NotImplementedError

    def optimizer_state(self) -> dict[str, Any]:
        """The full optimiser state (unsharded engines, written once) or this rank's shard (sharded ones)."""
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def evaluation_model(self) -> nn.Module:
        """The model evaluation runs on (collective on every rank for engines that shard parameters)."""
        return self.module

    # ---- shared
    def _schedule(self, optimizer: torch.optim.Optimizer, lr_lambda: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    def _clip_and_step(self, parameters: list[torch.Tensor], clip: float,
                       agree: Callable[[bool], bool]) -> tuple[torch.Tensor, bool]:
        norm = torch.nn.utils.clip_grad_norm_(parameters, clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        finite = bool(torch.isfinite(norm))
        applied = not agree(not finite)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach(), applied


class DDPStrategy(Strategy):
    name = "ddp"

    def setup(self, model, groups, betas, lr_lambda):
        self._schedule(torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=betas), lr_lambda)
        self.model = self.accelerator.prepare_model(model)
        self.module = self.accelerator.unwrap_model(self.model)
        self._parameters = [p for p in self.module.parameters() if p.requires_grad]

    def sync_gradients(self, last_micro_batch):
        return nullcontext() if last_micro_batch else self.accelerator.no_sync(self.model)

    def backward(self, loss, accumulation, last_micro_batch):
        self.accelerator.backward(loss / accumulation)

    def step(self, clip, agree):
        return self._clip_and_step(self._parameters, clip, agree)

    def full_state(self):
        if not self.accelerator.is_main_process:
            return {}
        return {name: tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype)
                for name, tensor in self.module.state_dict().items()}


class FSDP2Strategy(Strategy):
    name = "fsdp2"
    shards_parameters = True
    sharded_optimizer = True

    def setup(self, model, groups, betas, lr_lambda):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not torch.distributed.is_initialized():
            raise ConfigError("trainer.strategy=fsdp2 needs a process group: launch with torchrun or accelerate "
                              "launch (one process works too: torchrun --nproc_per_node 1)")
        named = groups_by_name(model, groups)
        require_every_gradient(model)
        device = self.accelerator.device
        model.to(device)
        mesh = init_device_mesh(device.type, (self.accelerator.num_processes,))
        bf16 = self.accelerator.mixed_precision == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.model = self.module = model
        groups = groups_of(model, named)
        self._schedule(torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=betas), lr_lambda)
        self._parameters = [p for group in groups for p in group["params"]]

    def sync_gradients(self, last_micro_batch):
        self.model.set_requires_gradient_sync(last_micro_batch)
        return nullcontext()

    def backward(self, loss, accumulation, last_micro_batch):
        (loss / accumulation).backward()

    def step(self, clip, agree):
        return self._clip_and_step(self._parameters, clip, agree)

    def full_state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.accelerator.is_main_process:
            return {}
        return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state.items()}

    def optimizer_state(self):
        state = self.optimizer.state_dict()
        local = {index: {key: value.to_local() if hasattr(value, "to_local") else value
                         for key, value in entry.items()} for index, entry in state["state"].items()}
        return {"state": local, "param_groups": state["param_groups"]}

    def load_optimizer_state(self, state):
        from torch.distributed.tensor import DTensor

        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        restored = {}
        for index, entry in state["state"].items():
            parameter = parameters[int(index)]
            restored[int(index)] = {
                key: DTensor.from_local(value, parameter.device_mesh, parameter.placements, run_check=False,
                                        shape=parameter.shape, stride=parameter.stride())
                if key != "step" and torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in entry.items()}
        self.optimizer.load_state_dict({"state": restored, "param_groups": state["param_groups"]})


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    sharded_optimizer = True

    def engine_config(self, clip: float) -> dict[str, Any]:
        user = dict(self.config.deepspeed or {})
        owned = sorted(set(user) & set(_TRAINER_OWNED))
        if owned:
            raise ConfigError("trainer.deepspeed sets " + ", ".join(f"{key} (set {_TRAINER_OWNED[key]} instead)"
                                                                     for key in owned))
        zero = dict(user.get("zero_optimization") or {})
        if zero.get("stage", 0) not in (1, 2, 3):
            raise ConfigError(f"trainer.deepspeed.zero_optimization.stage must be 1, 2 or 3, got "
                              f"{zero.get('stage')!r} (configs/deepspeed/zero2.yaml, zero3.yaml)")
        return {"steps_per_print": 10 ** 9, "wall_clock_breakdown": False, **user,
                "train_micro_batch_size_per_gpu": self.micro_batch,
                "gradient_accumulation_steps": self.config.grad_accumulation,
                "gradient_clipping": clip if clip > 0 and clip != float("inf") else 0.0,
                "bf16": {"enabled": self.accelerator.mixed_precision == "bf16"}}

    @property
    def stage(self) -> int:
        return int((self.config.deepspeed.get("zero_optimization") or {}).get("stage", 0))

    def __init__(self, accelerator: Any, config: Any, micro_batch: int):
        super().__init__(accelerator, config, micro_batch)
        self.shards_parameters = self.stage == 3

    def setup(self, model, groups, betas, lr_lambda):
        import deepspeed

        clip = self.config.optim.clip_grad_norm
        require_every_gradient(model)
        optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=betas)
        os.environ.setdefault("LOCAL_RANK", str(self.accelerator.local_process_index))
        engine, zero_optimizer, _, _ = deepspeed.initialize(
            model=model.to(self.accelerator.device), optimizer=optimizer, config=self.engine_config(clip),
            dist_init_required=False)
        self.model, self.module, self.engine = engine, engine.module, engine
        self.zero_optimizer = zero_optimizer
        self._schedule(zero_optimizer.optimizer, lr_lambda)  # the base AdamW, whose groups the engine steps

    def backward(self, loss, accumulation, last_micro_batch):
        self.engine.backward(loss)  # the engine divides by its gradient_accumulation_steps
        if not last_micro_batch:
            self.engine.step()  # counts the micro-batch; the optimiser steps only at the boundary

    def step(self, clip, agree):
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        # in fp32 and bf16 the engine skips a step whose gradient norm is not finite (on every rank)
        return norm, bool(self.engine.was_step_applied())

    def evaluation_model(self):
        return self.engine.module

    def full_state(self):
        from deepspeed.utils import safe_get_full_fp32_param
        import deepspeed

        module = self.engine.module
        main = self.accelerator.is_main_process
        state: dict[str, torch.Tensor] = {}
        for name, parameter in module.named_parameters():
            full = safe_get_full_fp32_param(parameter) if parameter.requires_grad else None
            if full is None:  # a frozen parameter: not in the optimiser, gathered from the module
                with deepspeed.zero.GatheredParameters([parameter], enabled=self.stage == 3):
                    full = parameter.detach().clone()
            if main:
                state[name] = full.detach().to("cpu", torch.float32)
        if not main:
            return {}
        parameter_names = set(state)
        for name, tensor in module.state_dict().items():  # buffers (ZeRO never partitions them)
            if name not in parameter_names:
                state[name] = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype)
        return state

    def optimizer_state(self):
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        state = self.zero_optimizer.state_dict()
        kept = {key: value for key, value in state.items()
                if key not in ("loss_scaler", "param_slice_mappings", "zero_stage")}
        kept["loss_scale"] = float(getattr(self.zero_optimizer.loss_scaler, "cur_scale", 1.0))
        kept["stage3"] = isinstance(self.zero_optimizer, DeepSpeedZeroOptimizer_Stage3)
        return kept

    def load_optimizer_state(self, state):
        state = dict(state)
        scaler = self.zero_optimizer.loss_scaler
        if hasattr(scaler, "cur_scale"):
            scaler.cur_scale = state.pop("loss_scale", scaler.cur_scale)
        state.pop("stage3", None)
        state["loss_scaler"] = scaler
        world = self.accelerator.num_processes
        self.zero_optimizer.load_state_dict([state] * world, load_optimizer_states=True, load_from_fp32_weights=True)


def process_position() -> tuple[int, int]:
    """(rank, world size) of this process in the job's process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def forward_is_collective(model: nn.Module) -> bool:
    """Whether a forward pass of ``model`` gathers parameters from the other ranks (FSDP2, ZeRO-3), so that every
    rank must run as many forwards as the others."""
    from torch.distributed.fsdp import FSDPModule

    if process_position()[1] == 1:
        return False
    return isinstance(model, FSDPModule) or any(hasattr(p, "ds_id") for p in model.parameters())


def gather_from_all(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (evaluation meters are merged from these)."""
    rank, world = process_position()
    if world == 1:
        return [value]
    values: list[Any] = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def make_strategy(accelerator: Any, config: Any, micro_batch: int) -> Strategy:
    kinds = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy, "deepspeed": DeepSpeedStrategy}
    return kinds[config.strategy](accelerator, config, micro_batch)


class ModelTwin:
    """A weightless copy of the model, kept on the main process for engines that shard or re-type the live
    parameters: the export and the final evaluation get a plain module with the consolidated fp32 weights."""

    def __init__(self, model: nn.Module):
        persistent = set(model.state_dict())
        self.constants = {name: buffer.detach().clone() for name, buffer in model.named_buffers()
                          if name not in persistent}  # non-persistent buffers are not in a state dict
        self.twin = copy.deepcopy(model).to("meta")

    def materialise(self, full_state: dict[str, torch.Tensor]) -> nn.Module:
        model = self.twin.to_empty(device="cpu")
        model.load_state_dict(full_state, strict=True)
        for name, value in self.constants.items():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, value.clone(), persistent=False)
        return model
