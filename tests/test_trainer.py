"""The training loop's rules: the lr schedule and scaling, accumulation arithmetic, the non-finite guard."""
from __future__ import annotations

import math

import pytest
import torch

from hsfm_train.data.demo import build_demo_shards
from hsfm_train.data.pipeline import LoaderConfig, StreamingLoader
from hsfm_train.engine.logging import RunLogger
from hsfm_train.engine.trainer import (OptimConfig, StepResult, Trainer, TrainerConfig, TrainingDiverged, lr_factor,
                                       make_accelerator, parameter_groups, peak_lr, resolve_accumulation)
from hsfm_train.errors import ConfigError
from hsfm_train.models.mae import ModelConfig, SpectralMAE


def test_warmup_then_cosine_per_step():
    assert lr_factor(0, warmup=10, total=100, floor=0.0) == pytest.approx(0.1)
    assert lr_factor(9, warmup=10, total=100, floor=0.0) == pytest.approx(1.0)
    assert lr_factor(10, warmup=10, total=100, floor=0.0) == pytest.approx(1.0)
    assert lr_factor(55, warmup=10, total=100, floor=0.0) == pytest.approx(0.5)  # half way down the cosine
    assert lr_factor(100, warmup=10, total=100, floor=0.1) == pytest.approx(0.1)
    factors = [lr_factor(s, 10, 100, 0.0) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_lr_scales_with_the_effective_batch():
    assert peak_lr(OptimConfig(base_lr=1.5e-4), 4096) == pytest.approx(1.5e-4 * 16)  # MAE: 2.4e-3 at 4096
    assert peak_lr(OptimConfig(base_lr=1.5e-4, lr=1e-3), 4096) == 1e-3


def test_global_batch_sets_accumulation_or_fails_naming_the_numbers():
    assert resolve_accumulation(TrainerConfig(global_batch=4096), 64, 8) == 8
    assert resolve_accumulation(TrainerConfig(grad_accumulation=3), 64, 8) == 3
    with pytest.raises(ConfigError, match="global_batch 4000 is not divisible by batch_size 64 x 8"):
        resolve_accumulation(TrainerConfig(global_batch=4000), 64, 8)
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_accumulation(TrainerConfig(global_batch=4096, grad_accumulation=2), 64, 8)


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    train, _ = build_demo_shards(tmp_path_factory.mktemp("demo"))
    return train


def _trainer(train_shards, tmp_path, loss_fn, **trainer_options):
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                                    decoder_num_heads=2, spectral_channels=8, spectral_basis=8))
    config = TrainerConfig(progress=False, wandb=False, log_every=1, checkpoint_every=100, figure_every=0,
                           **trainer_options)
    loader = StreamingLoader(LoaderConfig(shards=str(train_shards), batch_size=2, num_workers=0))
    logger = RunLogger(tmp_path, {}, enabled=False)
    return Trainer(config, model, loss_fn, loader, tmp_path, logger, make_accelerator(config))


def _mae_loss(nan_steps: set[int], calls: list[int]):
    def loss_fn(model, batch, generator):
        step = len(calls)
        calls.append(step)
        out = model(batch["hsi"], batch["wavelengths"], batch["band_mask"], generator=generator)
        loss = ((out.prediction - batch["hsi"]) ** 2).mean()
        if step in nan_steps:
            loss = loss * float("nan")
        return StepResult(loss, samples=batch["hsi"].shape[0], tokens=1)
    return loss_fn


def test_nonfinite_steps_are_skipped_and_counted(train_shards, tmp_path):
    calls: list[int] = []
    trainer = _trainer(train_shards, tmp_path, _mae_loss({1, 2}, calls), max_steps=4)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    snapshots = []
    original_step = trainer.optimizer.step

    def step(*args, **kwargs):
        snapshots.append(len(calls) - 1)
        return original_step(*args, **kwargs)

    trainer.optimizer.step = step
    state = trainer.fit()
    assert state.step == 4 and state.skipped_steps == 2 and state.consecutive_skipped == 0
    assert snapshots == [0, 3]  # the optimiser stepped only on the finite steps
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.scheduler.last_epoch == 4  # the schedule stays aligned with the step count


def test_too_many_consecutive_nonfinite_steps_stop_the_run(train_shards, tmp_path):
    trainer = _trainer(train_shards, tmp_path, _mae_loss(set(range(1, 100)), []), max_steps=50,
                       max_nonfinite_steps=3)
    with pytest.raises(TrainingDiverged, match="4 consecutive steps had a non-finite loss"):
        trainer.fit()
    assert trainer.state.step == 4 and trainer.state.skipped_steps == 4  # steps 1-3 skipped, the 4th raises


def test_gradient_accumulation_consumes_micro_batches_and_scales_the_loss(train_shards, tmp_path):
    calls: list[int] = []
    trainer = _trainer(train_shards, tmp_path, _mae_loss(set(), calls), max_steps=3, grad_accumulation=2)
    state = trainer.fit()
    assert len(calls) == 6 and state.samples == 3 * 2 * 2
    assert math.isfinite(state.last_loss)


def test_parameter_groups_leave_out_frozen_parameters_and_scale_heads():
    model = SpectralMAE(ModelConfig(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                                    decoder_num_heads=2, spectral_channels=8, spectral_basis=8))
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith(("decoder", "blocks"))  # a frozen patch embedding
    groups = parameter_groups(model, weight_decay=0.05, lr_scales={"decoder": 10.0})
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(trainable) and len(grouped) == len(set(grouped))
    by_name = {group["name"]: group for group in groups}
    assert set(by_name) == {"decay@1", "no_decay@1", "decay@10", "no_decay@10"}
    assert by_name["decay@10"]["lr_scale"] == 10.0 and by_name["no_decay@1"]["weight_decay"] == 0.0
    decoder_ids = {id(p) for n, p in model.named_parameters() if n.startswith("decoder")}
    assert {id(p) for p in by_name["decay@10"]["params"] + by_name["no_decay@10"]["params"]} == decoder_ids


def test_group_lr_scale_multiplies_the_scheduled_lr(train_shards, tmp_path):
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                                    decoder_num_heads=2, spectral_channels=8, spectral_basis=8))
    config = TrainerConfig(progress=False, wandb=False, checkpoint_every=100, figure_every=0, max_steps=3,
                           optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0))
    loader = StreamingLoader(LoaderConfig(shards=str(train_shards), batch_size=2, num_workers=0))
    groups = parameter_groups(model, 0.05, {"decoder": 0.1})
    trainer = Trainer(config, model, _mae_loss(set(), []), loader, tmp_path, RunLogger(tmp_path, {}, enabled=False),
                      make_accelerator(config), param_groups=groups)
    trainer.fit()
    lrs = {group["name"]: group["lr"] for group in trainer.optimizer.param_groups}
    assert lrs["decay@0.1"] == pytest.approx(0.1 * lrs["decay@1"]) and lrs["decay@1"] > 0


def test_validation_every_n_steps_tracks_the_best_metric(train_shards, tmp_path):
    scores = iter([0.5, 0.9, 0.7])
    trainer = _trainer(train_shards, tmp_path, _mae_loss(set(), []), max_steps=6, eval_every=2,
                       best_metric="score", best_mode="max")
    trainer.evaluate = lambda model: {"score": next(scores)}
    state = trainer.fit()
    assert state.best_value == 0.9 and state.best_step == 4
    logged = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval/score" in line]
    assert len(logged) == 3


def test_stateful_components_travel_in_the_checkpoint(train_shards, tmp_path):
    class Counter:
        def __init__(self):
            self.value = 0

        def state_dict(self):
            return {"value": self.value}

        def load_state_dict(self, state):
            self.value = state["value"]

    counter = Counter()
    trainer = _trainer(train_shards, tmp_path, _mae_loss(set(), []), max_steps=2)
    trainer.stateful = {"counter": counter}
    counter.value = 7
    trainer.fit()
    again = _trainer(train_shards, tmp_path, _mae_loss(set(), []), max_steps=2)
    restored = Counter()
    again.stateful = {"counter": restored}
    assert again.resume() and restored.value == 7 and again.state.step == 2


def test_compiled_blocks_train_like_eager_ones_and_keep_their_names(demo_dir, tmp_path):
    """trainer.compile compiles each transformer block in place: the same losses, the same state-dict keys."""
    from tests.runs import losses, overrides, run, weights

    results = {}
    for compiled in (False, True):
        output = tmp_path / f"compiled-{compiled}"
        result = run(["pretrain", *overrides(demo_dir, output, "trainer.max_steps=2", f"trainer.compile={compiled}")],
                     tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        results[compiled] = output
    assert losses(results[True]) == pytest.approx(losses(results[False]), rel=1e-4)
    assert weights(results[True] / "export").keys() == weights(results[False] / "export").keys()
