"""Masked-reconstruction quality of a spectral MAE over a shard set: PSNR, SSIM and spectral angle.

Evaluation masks whole spatial patches across every spectral group (so a masked pixel has no band visible), from
a fixed seed per batch, and scores predictions in the shards' reflectance units (the loader's normalisation
undone). Conventions of each metric: hsfm_train/metrics.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hsfm_train.data.pipeline import LoaderConfig, StreamingLoader
from hsfm_train.errors import ConfigError
from hsfm_train.metrics import ReconstructionMeter
from hsfm_train.models.mae import MAEOutput, SpectralMAE


@dataclass
class EvalConfig:
    mask_ratio: float = 0.75
    seed: int = 1234
    max_batches: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.mask_ratio < 1.0:  # the scores are over masked pixels, and some must stay visible
            problems.append(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_batches is not None and self.max_batches < 1:
            problems.append(f"max_batches must be >= 1 or null, got {self.max_batches}")
        if problems:
            raise ConfigError("eval: " + "; ".join(problems))


def reflectance(values: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    return values.float() * batch["band_std"][:, :, None, None] + batch["band_mean"][:, :, None, None]


def masked_forward(model: SpectralMAE, batch: dict[str, Any], mask_ratio: float, seed: int) -> MAEOutput:
    generator = torch.Generator().manual_seed(seed)
    return model(batch["hsi"], batch["wavelengths"], batch["band_mask"], mask_ratio=mask_ratio, generator=generator,
                 spatial_masking=True)


@torch.no_grad()
def evaluate_reconstruction(model: SpectralMAE, loader: Any, config: EvalConfig,
                            device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean PSNR (dB), SSIM and spectral angle (degrees) of masked reconstructions, per band set and overall."""
    if not getattr(model, "with_decoder", True):  # now, not as a traceback from deep inside forward()
        raise ConfigError("the model is encoder-only (an `hsfm export --encoder-only` export): masked reconstruction "
                          "needs the decoder; export the run without --encoder-only to evaluate it")
    was_training = model.training
    model.eval()
    meters: dict[str, ReconstructionMeter] = {}
    overall = ReconstructionMeter()
    for number, batch in enumerate(loader):
        if config.max_batches is not None and number >= config.max_batches:
            break
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = masked_forward(model, batch, config.mask_ratio, config.seed + number)
        pixel_mask = out.band_mask().any(dim=1)  # spatial masking: the same for every band
        bands = batch["band_mask"]
        prediction = reflectance(out.prediction, batch) * bands[:, :, None, None]
        target = reflectance(batch["hsi"], batch) * bands[:, :, None, None]
        overall.update(prediction, target, pixel_mask)
        meters.setdefault(batch["band_set"][0], ReconstructionMeter()).update(prediction, target, pixel_mask)
    model.train(was_training)
    results = {f"{key}": value for key, value in overall.compute().items()}
    results["images"] = overall.count
    for band_set, meter in sorted(meters.items()):
        for key, value in meter.compute().items():
            results[f"{band_set}/{key}"] = value
    return results


def eval_loader(shards: str, batch_size: int, num_workers: int = 0) -> StreamingLoader:
    """One pass over every sample, bucketed by band set (bucket batching keeps one band set per batch)."""
    return StreamingLoader(LoaderConfig(shards=shards, batch_size=batch_size, num_workers=num_workers,
                                        resampled=False, shuffle_buffer=0, batching="bucket"))
