"""The pretraining stage: a wavelength-conditioned masked autoencoder (plain MAE or KARMA's composite objective)
on streaming shards, evaluated by masked reconstruction of held-out tiles, exported for downstream stages.

    hsfm pretrain                                  the demo experiment (tiny model, demo shards, plain MAE)
    hsfm pretrain objective=karma trainer.max_steps=1000
    hsfm pretrain data=shards data.train.shards=DIR data.eval.shards=DIR model=base

From Python: ``run_pretrain(load_pretrain_config([...overrides]))``. Outputs in ``output_dir``: checkpoints/,
figures/, metrics.jsonl, summary.json, baseline.json (the untrained model's scores) and export/. Seeding, the lock,
logging, the trainer, resume and the summary come from the shared runner (``stages/base.py``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsfm_train.config import free_mapping_overrides
from hsfm_train.data.demo import DemoDataConfig, build_demo_shards
from hsfm_train.data.pairs import PairShardsConfig, build_pair_shards
from hsfm_train.data.pipeline import LoaderConfig, StreamingLoader
from hsfm_train.data.shards import load_index
from hsfm_train.engine.export import export_model
from hsfm_train.figures import reconstruction_figure
from hsfm_train.engine.trainer import StepResult, TrainerConfig, resolve_accumulation
from hsfm_train.errors import ConfigError, DataFormatError
from hsfm_train.spectra import library_endmembers, vca
from hsfm_train.models.mae import ModelConfig
from hsfm_train.models.registry import DEFAULT_ARCHITECTURE, build_model
from hsfm_train.objectives.pretrain import ObjectiveConfig, PretrainObjective
from hsfm_train.stages.base import TrainingStage, register_stage
from hsfm_train.stages.eval_recon import (BASELINES, METRICS, EvalConfig, evaluate_reconstruction,
                                         losses_to_baselines, masked_forward, reflectance)


@dataclass
class DataConfig:
    train: LoaderConfig
    eval: LoaderConfig | None = None
    source: str = "shards"  # "demo": build demo_dir from the package's data first; "pairs": build pairs.output_dir
    demo_dir: str = "shards/demo"
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    pairs: PairShardsConfig = field(default_factory=PairShardsConfig)  # source=pairs: optical-SAR shards


@dataclass
class ExportConfig:
    encoder_only: bool = False


@dataclass
class PretrainConfig:
    data: DataConfig
    name: str = "demo"
    output_dir: str = "runs/demo"
    seed: int = 0
    arch: str = DEFAULT_ARCHITECTURE
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def load_pretrain_config(overrides: list[str] | None = None) -> PretrainConfig:
    return PretrainStage.load_config(overrides)


def band_set_statistics(index: dict[str, Any], where: str, patch_size: int, crop_size: int | None = None
                        ) -> dict[str, Any]:
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
    tile = crop_size or index.get("build", {}).get("tile_size")
    if tile is not None and tile % patch_size:
        raise ConfigError(f"{where}: tiles of {tile} px are not divisible by model.patch_size {patch_size}; set "
                          "data.train.crop_size / data.eval.crop_size to a multiple of it")
    return statistics


def _changed_from_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` (nested dicts included) that differ from ``defaults``."""
    changed = {}
    for key, value in values.items():
        default = defaults.get(key, object())
        if isinstance(value, dict) and isinstance(default, dict):
            nested = _changed_from_default(value, default)
            if nested:
                changed[key] = nested
        elif value != default:
            changed[key] = value
    return changed


def fingerprint(config: PretrainConfig) -> str:
    """What a checkpoint must share with the run that resumes it: architecture, objective, data, batch. Model
    and objective settings count where they differ from their defaults, so an option added by an upgrade (at a
    default that keeps the old behaviour) does not stop a run from resuming."""
    model = _changed_from_default(asdict(config.model), asdict(ModelConfig()))
    model.pop("activation_checkpointing", None)  # recomputes the same values: a run resumes across it
    objective = _changed_from_default(asdict(config.objective), asdict(ObjectiveConfig()))
    payload = {"model": model, "objective": objective,
               "train_shards": str(Path(config.data.train.shards).resolve()), "seed": config.seed,
               "batch": config.data.train.batch_size}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def initialise_endmembers(model: torch.nn.Module, loader: StreamingLoader, config: PretrainConfig) -> None:
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


def build_joint(config: PretrainConfig, device: torch.device):
    """(the joint optical-SAR model, its objective with the frozen teacher when distilling)."""
    from hsfm_train.engine.export import load_pretrained
    from hsfm_train.models.codemae import JointHeadsConfig, JointOpticalSAR
    from hsfm_train.objectives.pretrain import JointObjective

    if config.arch != DEFAULT_ARCHITECTURE:
        raise ConfigError(f"objective.joint trains a shared {DEFAULT_ARCHITECTURE} backbone, not arch={config.arch}")
    if config.model.lsmm.num_endmembers:
        raise ConfigError("objective.joint: optical-SAR pretraining has no LSMM head (set model.lsmm.num_endmembers=0)")
    teacher = None
    if config.objective.distillation > 0:
        if not Path(config.objective.teacher).exists():
            raise ConfigError(f"objective.teacher {config.objective.teacher} does not exist (an `hsfm export` "
                              "directory: the main job writes runs/main-mae/export)")
        teacher = load_pretrained(config.objective.teacher).eval().requires_grad_(False).to(device)
        if teacher.config.patch_size != config.model.patch_size:
            raise ConfigError(f"objective.teacher has {teacher.config.patch_size} px patches, the model "
                              f"{config.model.patch_size}: distillation compares token by token")
    objective = config.objective
    heads = JointHeadsConfig(teacher_dim=teacher.config.embed_dim if teacher is not None else 0,
                             conditioned_scoring=objective.conditioned_scoring
                             if objective.conditioned_contrastive > 0 else None,
                             conditioned_negatives=objective.conditioned_negatives)
    return JointOpticalSAR(config.model, heads), JointObjective(config.objective, teacher)


@register_stage
class PretrainStage(TrainingStage):
    name = "pretrain"
    help = "pretrain a backbone by masked reconstruction (no arguments: the demo job)"
    config_class = PretrainConfig

    @classmethod
    def load_config(cls, overrides: list[str] | None = None) -> PretrainConfig:
        config = super().load_config(free_mapping_overrides(list(overrides or []), ("data.pairs.reader",)))
        if config.data.source not in ("demo", "shards", "pairs"):
            raise ConfigError(f"data.source must be 'demo', 'shards' or 'pairs', got {config.data.source!r}")
        return config

    def prepare(self) -> None:
        config, accelerator = self.config, self.accelerator
        if config.data.source == "demo":
            with accelerator.main_process_first():  # one rank builds (or reuses) the demo shards, the others read
                build_demo_shards(config.data.demo_dir, config.data.demo)
        elif config.data.source == "pairs":
            with accelerator.main_process_first():
                build_pair_shards(config.data.pairs)
        train = config.data.train
        config.trainer.grad_accumulation = resolve_accumulation(config.trainer, train.batch_size,
                                                                accelerator.num_processes)
        self.normalization = band_set_statistics(load_index(train.shards), train.shards, config.model.patch_size,
                                                 train.crop_size)
        self.loader = StreamingLoader(train, accelerator.process_index, accelerator.num_processes)
        self.has_evaluation = config.data.eval is not None
        if self.has_evaluation:
            evaluation = config.data.eval
            if evaluation.resampled or evaluation.augment.enabled:
                raise ConfigError("data.eval must be one pass over every held-out sample: set data.eval.resampled=false "
                                  "and data.eval.augment.enabled=false")
            band_set_statistics(load_index(evaluation.shards), evaluation.shards, config.model.patch_size,
                                evaluation.crop_size)
        self.objective = PretrainObjective(config.objective)
        if config.objective.joint:
            self.model, self.joint_objective = build_joint(config, self.accelerator.device)
            self.objective.check_model(self.model.backbone)
        else:
            self.model = build_model(config.model, config.arch)
            self.objective.check_model(self.model)
            initialise_endmembers(self.model, self.loader, config)
        # the figure shows one fixed held-out tile (the first evaluation batch)
        self.figure_batch = (next(iter(self._evaluation_loader()))
                             if self.has_evaluation and config.trainer.figure_every else None)

    def _evaluation_loader(self) -> StreamingLoader:
        # a finite loader remembers how far it was read, so every evaluation pass gets a fresh one; every rank
        # reads the whole stream and scores its share of the batches (evaluate_reconstruction)
        return StreamingLoader(self.config.data.eval, rank=0, world_size=1)

    def step(self, model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepResult:
        if self.config.objective.joint:
            return self._joint_step(model, batch, generator)
        out = model(batch["hsi"], batch["wavelengths"], batch["band_mask"], generator=generator)
        state = getattr(self, "train_state", None)
        loss, parts = self.objective(self.accelerator.unwrap_model(model), out, batch,
                                     step=state.step if state is not None else None)
        samples = batch["hsi"].shape[0]
        return StepResult(loss, parts, samples=samples, tokens=samples * out.token_mask.shape[1] * out.token_mask.shape[2])

    def _joint_step(self, model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepResult:
        samples = batch["hsi"].shape[0]
        pair = batch.get("pair")
        out = model(batch["hsi"], batch["wavelengths"], batch["band_mask"], pair, batch.get("pair_wavelengths"),
                    generator=generator)
        paired = torch.full((samples,), pair is not None, dtype=torch.bool, device=batch["hsi"].device)
        loss, parts = self.joint_objective(self.accelerator.unwrap_model(model), out, batch, paired)
        tokens = sum(out[m].token_mask[0].numel() for m in ("optical", "sar") if m in out) * samples
        parts["paired_fraction"] = paired.float().mean()
        return StepResult(loss, parts, samples=samples, tokens=tokens)

    def _backbone(self, model: torch.nn.Module) -> torch.nn.Module:
        """What reconstructs a batch's ``hsi``: the model, or a joint model's shared backbone."""
        return self.accelerator.unwrap_model(model).backbone if self.config.objective.joint else model

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        # the baselines depend only on the held-out tiles and the fixed masks, not on the weights: score them once
        cached = getattr(self, "_baseline_scores", None)
        results = evaluate_reconstruction(self._backbone(model), self._evaluation_loader(), self.config.eval,
                                          self.accelerator.device, baselines=cached is None)
        if cached is None:
            self._baseline_scores = results["baselines"]
        else:
            results["baselines"] = cached
        return results

    def figure(self, model: torch.nn.Module, step: int) -> Path | None:
        """A PNG of one fixed held-out tile: input, masked input, reconstruction, spectra of a few masked pixels."""
        if self.figure_batch is None:
            return None
        config, batch = self.config, self.figure_batch
        model = self._backbone(model)
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
        path = Path(config.output_dir) / "figures" / f"reconstruction_step{step:07d}.png"
        if not self.accelerator.is_main_process:  # the forward above ran on every rank (it may be collective)
            return None
        return reconstruction_figure(path, image, masked, reconstruction, on_device["wavelengths"][0].cpu(),
                                     title=f"{batch['scene'][0]} step {step}")

    def fingerprint(self) -> str:
        return fingerprint(self.config)

    def run_metadata(self) -> dict[str, Any]:
        config = self.config
        return {"fingerprint": self.fingerprint(), "arch": config.arch, "model": asdict(config.model),
                "objective": asdict(config.objective), "normalization": self.normalization,
                "train_shards": str(Path(config.data.train.shards).resolve())}

    def describe(self) -> dict[str, Any]:
        return {"objective": self.config.objective.name, "model": self.config.model.name}

    def export(self, model: torch.nn.Module, summary: dict[str, Any]) -> Path:
        config = self.config
        if config.objective.joint:  # downstream work loads the shared backbone, as it loads any other
            model = model.backbone
        return export_model(model, Path(config.output_dir) / "export", encoder_only=config.export.encoder_only,
                            normalization=self.normalization,
                            provenance={"step": summary["steps"], "samples": summary["samples"],
                                        "objective": asdict(config.objective), "name": config.name,
                                        "train_shards": str(Path(config.data.train.shards).resolve()),
                                        "final_loss": summary["final_loss"]})

    def format_summary(self, summary: dict[str, Any]) -> str:
        return format_summary(summary)


def run_pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) a pretraining job; ``output_dir`` is locked for the run's life."""
    return PretrainStage(config).execute()


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"run {summary['name']} ({summary['model']}, objective {summary['objective']}): {summary['steps']} steps, "
             f"{summary['samples']} samples, final loss {summary['final_loss']:.4f}, stopped by {summary['stopped_by']}"]
    evaluation = summary.get("eval")
    if evaluation:
        lines.append(f"masked reconstruction on held-out tiles ({evaluation['trained'].get('images')} tiles):")
        lines.append(f"  {'':22s} {'PSNR dB':>8s} {'SSIM':>7s} {'SAM deg':>8s}")
        trained = evaluation.get("trained") or {}
        rows = [("untrained", evaluation.get("untrained") or {}), ("trained", trained)]
        rows += [(BASELINES[name][0], scores) for name, scores in trained.get("baselines", {}).items()]
        for label, scores in rows:
            lines.append(f"  {label:22s} {scores.get('psnr', float('nan')):8.2f} {scores.get('ssim', float('nan')):7.3f}"
                         f" {scores.get('sam_deg', float('nan')):8.2f}")
        for name, metrics in losses_to_baselines(trained).items():
            lines.append(f"  note: the trained model loses to the {BASELINES[name][0]} baseline on "
                         f"{', '.join(METRICS[m][0] for m in metrics)}")
    if "export" in summary:
        lines.append(f"export: {summary['export']}   (hsfm_train.load_pretrained(path))")
    lines.append(f"outputs: {summary['output_dir']}")
    return "\n".join(lines)
