"""A training job for tests/test_distributed.py, run under torchrun (or alone): the real Trainer and engines on
fixed global batches read once from the demo shards, each rank taking its slices of every global batch, so that
runs at different world sizes see exactly the same samples per optimiser step.

    python tests/distributed_worker.py '{"demo_dir": ..., "out": ..., "accumulation": 2, "strategy": "ddp"}'
    python tests/distributed_worker.py '{"demo_dir": ..., "runs": [{"out": ..., "accumulation": 1}, ...]}'

With ``runs``, the same processes train each run in turn (a fresh model, accelerator, engine and trainer each;
one launch instead of one per run: a launch costs far more than a micro run).

Micro-batch m of rank r is slice r x accumulation + m of the global batch (the trainer numbers its masking noise
the same way). Rank 0 writes ``out/result.json`` (the logged losses, the untrained model's evaluation) and
``out/weights.safetensors`` (the consolidated weights after training).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from hsfm_train.data.pipeline import LoaderConfig, StreamingLoader
from hsfm_train.engine.logging import RunLogger
from hsfm_train.engine.trainer import StepResult, Trainer, TrainerConfig, make_accelerator
from hsfm_train.models.mae import ModelConfig
from hsfm_train.models.registry import build_model
from hsfm_train.objectives.pretrain import ObjectiveConfig, PretrainObjective
from hsfm_train.stages.eval_recon import EvalConfig, evaluate_reconstruction

MICRO_MODEL = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                   spectral_channels=8, spectral_basis=8)


class SlicedBatches:
    """This rank's micro-batches of fixed global batches: the trainer's loader protocol, one epoch = all steps."""

    def __init__(self, global_batches: list[dict], rank: int, world: int, accumulation: int):
        self.global_batches, self.rank, self.world, self.accumulation = global_batches, rank, world, accumulation
        size = global_batches[0]["hsi"].shape[0]
        self.micro = size // (world * accumulation)
        self.config = LoaderConfig(shards="", batch_size=self.micro)
        self.epoch, self.position, self.stats = 0, 0, {}

    def __iter__(self):
        while self.position < len(self.global_batches) * self.accumulation:
            step, micro = divmod(self.position, self.accumulation)
            start = (self.rank * self.accumulation + micro) * self.micro
            self.position += 1
            yield {key: value[start:start + self.micro] for key, value in self.global_batches[step].items()}
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0


def main(settings: dict) -> None:
    runs = settings.get("runs") or [settings]
    for run in runs:
        train({"demo_dir": settings["demo_dir"], **run})
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def train(settings: dict) -> None:
    demo, out = Path(settings["demo_dir"]), Path(settings["out"])
    global_batch, steps = settings.get("global_batch", 8), settings.get("steps", 4)
    reader = StreamingLoader(LoaderConfig(shards=str(demo / "train"), batch_size=global_batch, resampled=False,
                                          shuffle_buffer=0, num_workers=0, crop_size=16), rank=0, world_size=1)
    batches = []
    for batch in reader:  # one band set per batch: every slice of it has the same bands
        if batch["hsi"].shape[1] < 200:
            # VNIR + SWIR scenes only: a module a step does not use gets no gradient under DDP but a zero one under
            # the sharded engines (AdamW then moves it at its next use differently); not what is compared here
            continue
        batches.append({k: v for k, v in batch.items() if torch.is_tensor(v)})
        if len(batches) == steps:
            break
    config = TrainerConfig(max_steps=steps, grad_accumulation=settings["accumulation"], log_every=1,
                           checkpoint_every=10 ** 6, figure_every=0, wandb=False, progress=False,
                           strategy=settings.get("strategy", "ddp"), deepspeed=settings.get("deepspeed"),
                           optim={"lr": 1e-3, "warmup_steps": 1})
    accelerator = make_accelerator(config)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**MICRO_MODEL))
    objective = PretrainObjective(ObjectiveConfig())
    loader = SlicedBatches(batches, accelerator.process_index, accelerator.num_processes, config.grad_accumulation)
    evaluation = evaluate_reconstruction(model, StreamingLoader(
        LoaderConfig(shards=str(demo / "eval"), batch_size=4, resampled=False, shuffle_buffer=0, num_workers=0,
                     crop_size=16), rank=0, world_size=1), EvalConfig(max_batches=5))

    def step(wrapped, batch, generator):
        output = wrapped(batch["hsi"], batch["wavelengths"], batch["band_mask"], generator=generator)
        loss, parts = objective(model, output, batch)
        return StepResult(loss, parts, samples=batch["hsi"].shape[0])

    with RunLogger(out, {}, enabled=False, is_main_process=accelerator.is_main_process) as logger:
        trainer = Trainer(config, model, step, loader, out, logger, accelerator, seed=0)
        trainer.fit()
        exported = trainer.export_model()
        if accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in exported.state_dict().items()}, str(out / "weights.safetensors"))
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            result = {"losses": [m["train/loss"] for m in metrics if "train/loss" in m], "eval": evaluation,
                      "world_size": accelerator.num_processes}
            (out / "result.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
