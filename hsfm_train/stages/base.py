"""The stage protocol: what an `hsfm <stage>` job is, and the one runner that drives every stage.

A stage is a class registered under a name with :func:`register_stage`. It declares its typed config
(``config_class``, a dataclass composed from ``configs/<name>.yaml`` plus Hydra overrides) and builds only what
is particular to it; the runner does what every stage shares. Configs have ``name``, ``output_dir`` and
``seed``; a training stage's config also has ``trainer`` (:class:`TrainerConfig`).

Two kinds:

* :class:`Stage` runs once and returns a summary (evaluation stages such as ``probe``). Implement ``run()``.
* :class:`TrainingStage` trains a model on the shared engine. Implement

  - ``prepare()``: data, model, objective, evaluation. It only reads: a mistake found here leaves no trace in
    ``output_dir``. Set ``self.model`` and ``self.loader`` (a resumable training loader).
  - ``step(model, batch, generator) -> StepResult``: the loss of one micro-batch.
  - ``evaluate(model) -> {metric: value}``, or leave ``has_evaluation`` False. In a job of several processes it
    runs on every rank (the model may be sharded, its forward collective): score this rank's share of the data
    and merge the sums, so that every rank returns the job's figures (``stages/eval_recon.py`` shows how).
  - ``export(model, summary) -> Path``: what downstream work loads. It runs on the main process, on a plain
    module holding the consolidated weights (whatever engine and world size trained it).

  and, where the defaults do not fit, ``param_groups(model)``, ``figure(model, step)`` (called on every rank;
  write the file on the main one), ``stateful()``,
  ``run_metadata()``, ``fingerprint()``, ``describe()`` and ``format_summary(summary)``.

  The runner (:func:`run_training`) makes the accelerator, selects the kernels, seeds, locks ``output_dir``,
  logs (W&B + metrics.jsonl), scores the untrained model once (``baseline.json``), builds the Trainer, resumes
  from the latest checkpoint (saying so), trains, evaluates, exports and writes ``summary.json``.

A new stage copies the shape of a small one (``stages/probe.py``) and is listed in ``STAGE_MODULES`` below;
``hsfm <name> key=value ...`` and ``hsfm <name> --print-config`` then work.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import random
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate.utils import gather_object

from hsfm_train.config import compose
from hsfm_train.engine.logging import RunLogger
from hsfm_train.engine.run_lock import lock_run_directory
from hsfm_train.engine.trainer import StepResult, Trainer, make_accelerator
from hsfm_train.errors import ConfigError
from hsfm_train.io import read_json, write_json_atomic
from hsfm_train.kernels import set_backend as set_kernel_backend

STAGE_MODULES = ("hsfm_train.stages.pretrain", "hsfm_train.stages.probe", "hsfm_train.stages.unmix",
                 "hsfm_train.stages.fewshot", "hsfm_train.stages.eval_pairs")
_REGISTRY: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make ``hsfm <cls.name>`` run this stage."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ConfigError(f"two stages are named {cls.name!r}: {_REGISTRY[cls.name].__name__} and {cls.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def stages() -> dict[str, type[Stage]]:
    """Every registered stage by name (importing the stage modules registers them)."""
    for module in STAGE_MODULES:
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


def get_stage(name: str) -> type[Stage]:
    known = stages()
    if name not in known:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(known)}")
    return known[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def say(message: str, accelerator: Any = None) -> None:
    """A line for the person at the terminal (on the main process only)."""
    if accelerator is None or accelerator.is_main_process:
        print(f"hsfm: {message}", flush=True)


class Stage:
    """A job that runs once: ``summary = run()``; the runner locks ``output_dir`` and writes the summary."""

    name: ClassVar[str]
    help: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def load_config(cls, overrides: list[str] | None = None) -> Any:
        return compose(cls.name, list(overrides or []), cls.config_class)

    def run(self) -> dict[str, Any]:
        raise NotImplementedError

    def format_summary(self, summary: dict[str, Any]) -> str:
        return json.dumps(summary, indent=1, default=str)

    def execute(self) -> dict[str, Any]:
        """Run under the output_dir lock and write ``summary.json`` (what ``hsfm <stage>`` calls)."""
        output = Path(self.config.output_dir)
        seed_everything(self.config.seed)
        with lock_run_directory(output, _SingleProcess(), purpose=f"{self.name} {self.config.name}"):
            summary = self.run()
            write_json_atomic(output / "summary.json", summary)
        return summary


class TrainingStage(Stage):
    """A stage that trains on the shared engine; see the module docstring for what a subclass provides."""

    has_evaluation: bool = False  # set in prepare() when evaluate() has data to run on
    model: torch.nn.Module
    loader: Any

    def __init__(self, config: Any):
        super().__init__(config)
        self.accelerator: Any = None  # set by the runner before prepare()

    # ---- what a subclass provides
    def prepare(self) -> None:
        raise NotImplementedError

    def step(self, model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepResult:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    def export(self, model: torch.nn.Module, summary: dict[str, Any]) -> Path:
        raise NotImplementedError

    # ---- defaults a subclass may replace
    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]] | None:
        return None  # the trainer's default: every trainable parameter, MAE's weight-decay rule

    def figure(self, model: torch.nn.Module, step: int) -> Path | None:
        return None

    def stateful(self) -> dict[str, Any]:
        """Further components with state_dict()/load_state_dict() that a checkpoint must carry."""
        return {}

    def fingerprint(self) -> str:
        """What a checkpoint must share with the run that resumes it (everything but the trainer settings)."""
        values = {k: v for k, v in asdict(self.config).items() if k not in ("trainer", "output_dir", "name")}
        return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run_metadata(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint()}

    def describe(self) -> dict[str, Any]:
        """Fields for the summary that say what was trained."""
        return {}

    def format_summary(self, summary: dict[str, Any]) -> str:
        return (f"run {summary['name']}: {summary['steps']} steps, {summary['samples']} samples, final loss "
                f"{summary['final_loss']:.4f}, stopped by {summary['stopped_by']}\noutputs: {summary['output_dir']}")

    def execute(self) -> dict[str, Any]:
        return run_training(self)


class _SingleProcess:
    is_main_process, num_processes = True, 1


def run_training(stage: TrainingStage) -> dict[str, Any]:
    """Drive a training stage from its config to its summary (see the module docstring)."""
    config = stage.config
    output = Path(config.output_dir)
    accelerator = make_accelerator(config.trainer)
    stage.accelerator = accelerator
    if config.trainer.kernels is not None:
        set_kernel_backend(config.trainer.kernels)
    with ExitStack() as scope:
        seed_everything(config.seed)
        stage.prepare()
        # everything above only reads output_dir: a mistake found there leaves no trace in it
        scope.enter_context(lock_run_directory(output, accelerator, purpose=f"{stage.name} {config.name}"))
        logger = scope.enter_context(RunLogger(
            output, {"config": asdict(config)}, project=config.trainer.wandb_project,
            run_name=f"{config.name}-{stage.name}", enabled=config.trainer.wandb,
            is_main_process=accelerator.is_main_process,
            run_id=hashlib.sha1(f"{output.resolve()}:{stage.fingerprint()}".encode()).hexdigest()[:16]))
        baseline = _baseline(stage, output, accelerator)
        trainer = Trainer(config.trainer, stage.model, stage.step, stage.loader, output, logger, accelerator,
                          seed=config.seed, param_groups=stage.param_groups(stage.model),
                          evaluate=stage.evaluate if stage.has_evaluation else None,
                          figure_fn=stage.figure, run_metadata=stage.run_metadata(), stateful=stage.stateful())
        resumed_at = trainer.state.step if trainer.resume() else None
        stage.train_state = trainer.state  # read-only for the stage: schedules that depend on the step
        if accelerator.is_main_process:
            logger.rewind(trainer.state.step)  # the steps after the checkpoint are logged again
        _say_start(resumed_at, trainer, config, output, accelerator)
        state = trainer.fit()

        summary: dict[str, Any] = {"name": config.name, "stage": stage.name, **stage.describe(),
                                   "steps": state.step, "samples": state.samples, "stopped_by": state.stopped_by,
                                   "resumed_at_step": resumed_at, "final_loss": state.last_loss,
                                   "skipped_steps": state.skipped_steps, "output_dir": str(output)}
        if state.best_step is not None:
            summary["best"] = {"metric": config.trainer.best_metric, "value": state.best_value,
                               "step": state.best_step}
        if state.stopped_by != "max_steps":  # preempted: the checkpoint is written; evaluation waits for the end
            logger.summary(summary)
            return summary
        if trainer.resume_notes:
            summary["resume_notes"] = trainer.resume_notes
        if stage.has_evaluation:  # every rank evaluates its share; the stage merges the scores
            model = trainer.evaluation_model()
            trained = stage.evaluate(model)
            summary["eval"] = {"untrained": baseline, "trained": trained}
            logger.log({f"eval/{k}": v for k, v in trained.items() if isinstance(v, (int, float))}, step=state.step)
            figure = stage.figure(model, state.step)
            if figure is not None:
                logger.log_image("figure", figure, state.step)
        exported = trainer.export_model()  # collective: the consolidated weights, on the main process
        if accelerator.is_main_process:
            summary["export"] = str(stage.export(exported, summary))
            logger.summary(summary)
        accelerator.wait_for_everyone()
        return summary


def _baseline(stage: TrainingStage, output: Path, accelerator: Any) -> dict[str, Any] | None:
    """The untrained model's scores, computed once per output_dir (a resumed run reads them back)."""
    path = output / "baseline.json"
    exists = path.exists()
    if accelerator.num_processes > 1:  # one answer for every rank, whatever each sees on a shared filesystem
        exists = all(gather_object([exists]))
    if exists:
        return read_json(path, "baseline scores")
    if not stage.has_evaluation:
        return None
    scores = stage.evaluate(stage.model)  # every rank scores its share of the plain, not yet wrapped, model
    if accelerator.is_main_process:
        write_json_atomic(path, scores)
    return scores


def _say_start(resumed_at: int | None, trainer: Trainer, config: Any, output: Path, accelerator: Any) -> None:
    steps = config.trainer.max_steps
    if resumed_at is None:
        say(f"starting a new run in {output} ({steps} steps)", accelerator)
    elif resumed_at >= steps:
        say(f"{output} already finished at step {resumed_at} ({trainer.resumed_from.name}); evaluating and "
            f"exporting it again (raise trainer.max_steps to train further)", accelerator)
    else:
        say(f"resuming {output} from {trainer.resumed_from.name} (step {resumed_at} of {steps})", accelerator)
