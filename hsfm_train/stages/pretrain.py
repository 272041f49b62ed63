"""The pretraining stage: config -> data, model, objective -> trainer -> evaluation, export, figures, summary.

    hsfm pretrain                                  the demo experiment (tiny model, demo shards, plain MAE)
    hsfm pretrain objective=karma trainer.max_steps=1000
    hsfm pretrain data=shards data.train.shards=DIR data.eval.shards=DIR model=base

From Python: ``run_pretrain(load_pretrain_config([...overrides]))``. Outputs in ``output_dir``: checkpoints/,
figures/, metrics.jsonl, summary.json, baseline.json (the untrained model's scores) and export/.
"""
from __future__ import annotations

import hashlib
import json
import random
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsfm_train.config import compose, to_dataclass
from hsfm_train.data.demo import DemoDataConfig, build_demo_shards
from hsfm_train.data.pipeline import LoaderConfig, StreamingLoader
from hsfm_train.data.shards import load_index
from hsfm_train.engine.checkpoint import Checkpointer
from hsfm_train.engine.export import export_model
from hsfm_train.engine.logging import RunLogger, reconstruction_figure
from hsfm_train.engine.run_lock import lock_run_directory
from hsfm_train.engine.trainer import Trainer, TrainerConfig, make_accelerator, resolve_accumulation
from hsfm_train.errors import ConfigError, DataFormatError
from hsfm_train.io import read_json, write_json_atomic
from hsfm_train.kernels import set_backend as set_kernel_backend
from hsfm_train.models.endmembers import library_endmembers, vca
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.objectives.pretrain import ObjectiveConfig, PretrainObjective
from hsfm_train.stages.eval_recon import EvalConfig, eval_loader, evaluate_reconstruction, masked_forward, reflectance


@dataclass
class DataConfig:
    train: LoaderConfig
    eval: LoaderConfig | None = None
    source: str = "shards"  # "demo": build demo_dir from the package's data first
    demo_dir: str = "shards/demo"
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)


@dataclass
class ExportConfig:
    encoder_only: bool = False


@dataclass
class PretrainConfig:
    data: DataConfig
    name: str = "demo"
    output_dir: str = "runs/demo"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def load_pretrain_config(overrides: list[str] | None = None) -> PretrainConfig:
    config = compose("pretrain", overrides or [], PretrainConfig)
    if config.data.source not in ("demo", "shards"):
        raise ConfigError(f"data.source must be 'demo' or 'shards', got {config.data.source!r}")
    return config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def band_set_statistics(index: dict[str, Any], where: str, patch_size: int) -> dict[str, Any]:
    """Normalisation statistics per band set, checked for what the model needs (wavelengths, tile size)."""
    statistics = {}
    for name, info in index["band_sets"].items():
        wavelengths = info.get("wavelengths_nm")
        if wavelengths is None or not np.all(np.isfinite(wavelengths)):
            raise DataFormatError(f"{where}: band set {name!r} has no wavelengths; the wavelength-conditioned "
                                  "backbone needs every band's centre wavelength (rebuild the shards with the reader "
                                  "option wavelengths_nm)")
        statistics[name] = {"bands": info["bands"], "wavelengths_nm": wavelengths,
                            "mean": info.get("mean"), "std": info.get("std")}
    tile = index.get("build", {}).get("tile_size")
    if tile is not None and tile % patch_size:
        raise ConfigError(f"{where}: tiles of {tile} px are not divisible by model.patch_size {patch_size}; set "
                          "data.train.crop_size / data.eval.crop_size to a multiple of it")
    return statistics


def fingerprint(config: PretrainConfig) -> str:
    """What a checkpoint must share with the run that resumes it: architecture, objective, data, batch."""
    payload = {"model": asdict(config.model), "objective": asdict(config.objective),
               "train_shards": str(Path(config.data.train.shards).resolve()), "seed": config.seed,
               "batch": config.data.train.batch_size}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def initialise_endmembers(model: SpectralMAE, loader: StreamingLoader, config: PretrainConfig) -> None:
    """Library or VCA starting spectra for the LSMM head (KARMA's random start needs nothing)."""
    head, lsmm = model.lsmm, config.model.lsmm
    if head is None or lsmm.init == "random":
        return
    if lsmm.init == "library":
        spectra, wavelengths = library_endmembers(lsmm.num_endmembers, lsmm.grid_start_nm, lsmm.grid_stop_nm)
    else:  # vca on the pixels of the first batch, in reflectance (a loader of its own: the training loader's
        # position is part of the run's state)
        batch = next(iter(StreamingLoader(loader.config, loader.rank, loader.world_size)))
        pixels = reflectance(batch["hsi"], batch).permute(0, 2, 3, 1).reshape(-1, batch["hsi"].shape[1])
        spectra = vca(pixels.numpy(), lsmm.num_endmembers, seed=config.seed)
        wavelengths = batch["wavelengths"][0].numpy()
    head.set_endmembers(torch.from_numpy(np.asarray(spectra, dtype=np.float32)),
                        torch.from_numpy(np.asarray(wavelengths, dtype=np.float32)))


def _loss_fn(objective: PretrainObjective, unwrap):
    def loss_fn(model, batch, generator):
        out = model(batch["hsi"], batch["wavelengths"], batch["band_mask"], generator=generator)
        loss, parts = objective(unwrap(model), out, batch)
        return loss, parts, out.token_mask.shape[1] * out.token_mask.shape[2]
    return loss_fn


def _figure_fn(batch: dict[str, Any], config: PretrainConfig, directory: Path):
    """A PNG of one fixed held-out tile: input, masked input, reconstruction, spectra of a few masked pixels."""
    def make(model: SpectralMAE, step: int) -> Path:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            out = masked_forward(model, on_device, config.eval.mask_ratio, config.eval.seed)
        model.train(was_training)
        image = reflectance(on_device["hsi"], on_device)[0].cpu()
        masked = out.band_mask()[0].any(dim=0).cpu()
        # MAE's convention: visible patches pasted from the input (the loss never scores them)
        reconstruction = torch.where(masked, reflectance(out.prediction, on_device)[0].cpu(), image)
        return reconstruction_figure(directory / f"reconstruction_step{step:07d}.png", image, masked, reconstruction,
                                     on_device["wavelengths"][0].cpu(), title=f"{batch['scene'][0]} step {step}")
    return make


def run_pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) a pretraining job; ``output_dir`` is locked for the run's life, so a second job on it is
    refused instead of interleaving with this one."""
    accelerator = make_accelerator(config.trainer)
    with ExitStack() as run_scope:  # holds the output_dir lock from the first write into it to the end
        return _run_pretrain(config, accelerator, run_scope)


def _say(accelerator: Any, message: str) -> None:
    """A line for the person at the terminal (the main process only)."""
    if accelerator.is_main_process:
        print(f"hsfm: {message}", flush=True)


def _run_pretrain(config: PretrainConfig, accelerator: Any, run_scope: ExitStack) -> dict[str, Any]:
    output = Path(config.output_dir)
    if config.trainer.kernels is not None:
        set_kernel_backend(config.trainer.kernels)
    if config.data.source == "demo":
        with accelerator.main_process_first():  # one rank builds (or reuses) the demo shards, the others read
            build_demo_shards(config.data.demo_dir, config.data.demo)
    seed_everything(config.seed)
    train_config = config.data.train
    config.trainer.grad_accumulation = resolve_accumulation(config.trainer, train_config.batch_size,
                                                            accelerator.num_processes)
    normalization = band_set_statistics(load_index(train_config.shards), train_config.shards, config.model.patch_size)
    loader = StreamingLoader(train_config, accelerator.process_index, accelerator.num_processes)
    # a finite loader remembers how far it was read, so every evaluation pass gets a fresh one
    evaluation = (lambda: eval_loader(config.data.eval.shards, config.eval.batch_size, config.data.eval.num_workers)
                  ) if config.data.eval is not None else None
    if evaluation is not None:
        band_set_statistics(load_index(config.data.eval.shards), config.data.eval.shards, config.model.patch_size)

    model = SpectralMAE(config.model)
    objective = PretrainObjective(config.objective)
    objective.check_model(model)
    initialise_endmembers(model, loader, config)

    # everything above only reads: a mistake found there leaves no trace in output_dir
    run_scope.enter_context(lock_run_directory(output, accelerator, purpose=f"pretrain {config.name}"))
    logger = RunLogger(output, {"config": asdict(config)}, project=config.trainer.wandb_project,
                       run_name=f"{config.name}-{config.objective.name}", enabled=config.trainer.wandb,
                       is_main_process=accelerator.is_main_process,
                       run_id=hashlib.sha1(f"{output.resolve()}:{fingerprint(config)}".encode()).hexdigest()[:16])
    baseline_path = output / "baseline.json"
    baseline = read_json(baseline_path, "baseline scores") if baseline_path.exists() else None
    if baseline is None and evaluation is not None and accelerator.is_main_process:
        baseline = evaluate_reconstruction(model, evaluation(), config.eval, accelerator.device)  # untrained
        write_json_atomic(baseline_path, baseline)

    figure_fn = None
    if evaluation is not None and config.trainer.figure_every:
        figure_fn = _figure_fn(next(iter(evaluation())), config, output / "figures")
    trainer = Trainer(config.trainer, model, _loss_fn(objective, accelerator.unwrap_model), loader, output, logger,
                      accelerator, seed=config.seed, figure_fn=figure_fn,
                      run_metadata={"fingerprint": fingerprint(config), "model": asdict(config.model),
                                    "objective": asdict(config.objective), "normalization": normalization,
                                    "train_shards": str(Path(train_config.shards).resolve())})
    resumed_from = trainer.state.step if trainer.resume() else None
    if accelerator.is_main_process:
        logger.rewind(trainer.state.step)  # the steps after the checkpoint are logged again
    if resumed_from is None:
        _say(accelerator, f"starting a new run in {output} ({config.trainer.max_steps} steps)")
    elif resumed_from >= config.trainer.max_steps:
        _say(accelerator, f"{output} already finished at step {resumed_from} ({trainer.resumed_from.name}); "
                          f"evaluating and exporting it again (raise trainer.max_steps to train further)")
    else:
        _say(accelerator, f"resuming {output} from {trainer.resumed_from.name} (step {resumed_from} of "
                          f"{config.trainer.max_steps})")
    state = trainer.fit()

    summary: dict[str, Any] = {"name": config.name, "objective": config.objective.name, "model": config.model.name,
                               "steps": state.step, "samples": state.samples, "stopped_by": state.stopped_by,
                               "resumed_at_step": resumed_from,
                               "final_loss": state.last_loss, "skipped_steps": state.skipped_steps,
                               "output_dir": str(output)}
    if state.stopped_by != "max_steps":  # preempted: the checkpoint is written; evaluation waits for the end
        logger.summary(summary)
        logger.finish()
        return summary
    unwrapped = accelerator.unwrap_model(trainer.model)
    if accelerator.is_main_process:
        if evaluation is not None:
            trained = evaluate_reconstruction(unwrapped, evaluation(), config.eval, accelerator.device)
            summary["eval"] = {"untrained": baseline, "trained": trained}
            logger.log({f"eval/{k}": v for k, v in trained.items() if isinstance(v, (int, float))}, step=state.step)
            if figure_fn is not None:
                logger.log_image("reconstruction", figure_fn(unwrapped, state.step), state.step)
        export_dir = export_model(unwrapped, output / "export", encoder_only=config.export.encoder_only,
                                  normalization=normalization,
                                  provenance={"step": state.step, "samples": state.samples,
                                              "objective": asdict(config.objective), "name": config.name,
                                              "train_shards": str(Path(train_config.shards).resolve()),
                                              "final_loss": state.last_loss})
        summary["export"] = str(export_dir)
        logger.summary(summary)
    accelerator.wait_for_everyone()
    logger.finish()
    return summary


def model_from_checkpoint(source: str | Path) -> tuple[SpectralMAE, dict[str, Any]]:
    """The model of a run directory's latest checkpoint (or of one checkpoint directory), with its metadata."""
    source = Path(source)
    if (source / "checkpoints").is_dir():
        source = source / "checkpoints"
    if (source / "manifest.json").exists():
        loaded = Checkpointer(source.parent).load(source)
    else:
        loaded = Checkpointer(source).load()
    metadata = (loaded.extra or {}).get("run_metadata", {})
    if "model" not in metadata:
        raise DataFormatError(f"{loaded.path}: the checkpoint does not record its model config (not an hsfm "
                              "pretrain checkpoint?)")
    model = SpectralMAE(to_dataclass(ModelConfig, metadata["model"], f"{loaded.path} model config"))
    model.load_state_dict(loaded.model_state)
    trainer_state = (loaded.extra or {}).get("trainer", {})
    provenance = {"checkpoint": str(loaded.path), "step": trainer_state.get("step"),
                  "samples": trainer_state.get("samples"), "objective": metadata.get("objective"),
                  "train_shards": metadata.get("train_shards")}
    return model.eval(), {**metadata, "provenance": provenance, "checkpoint": str(loaded.path)}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"run {summary['name']} ({summary['model']}, objective {summary['objective']}): {summary['steps']} steps, "
             f"{summary['samples']} samples, final loss {summary['final_loss']:.4f}, stopped by {summary['stopped_by']}"]
    evaluation = summary.get("eval")
    if evaluation:
        lines.append(f"masked reconstruction on held-out tiles ({evaluation['trained'].get('images')} tiles):")
        lines.append(f"  {'':10s} {'PSNR dB':>8s} {'SSIM':>7s} {'SAM deg':>8s}")
        for label in ("untrained", "trained"):
            scores = evaluation.get(label) or {}
            lines.append(f"  {label:10s} {scores.get('psnr', float('nan')):8.2f} {scores.get('ssim', float('nan')):7.3f}"
                         f" {scores.get('sam_deg', float('nan')):8.2f}")
    if "export" in summary:
        lines.append(f"export: {summary['export']}   (hsfm_train.load_pretrained(path))")
    lines.append(f"outputs: {summary['output_dir']}")
    return "\n".join(lines)
