"""Masked-reconstruction quality of a spectral MAE over a shard set: PSNR, SSIM and spectral angle.

Evaluation masks whole spatial patches across every spectral group (so a masked pixel has no band visible), from
a fixed seed per batch, and scores predictions in the shards' reflectance units (the loader's normalisation
undone). Conventions of each metric: hsfm_train/metrics.py.

Beside the model, the same meters score two trivial baselines (hsfm_train/baselines.py) on exactly the same masked
pixels: copying the nearest visible pixel and filling with the image's visible mean. A model that does not beat
them does no better than copying what it was shown.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from hsfm_train.baselines import nearest_visible_fill, visible_mean_fill
from hsfm_train.data.pipeline import LoaderConfig, StreamingLoader
from hsfm_train.engine.distributed import forward_is_collective, gather_from_all, process_position
from hsfm_train.errors import ConfigError
from hsfm_train.metrics import _reconstruction_per_image
from hsfm_train.models.mae import MAEOutput


@dataclass
class EvalConfig:
    mask_ratio: float = 0.75
    seed: int = 1234
    max_batches: int | None = None  # the loader's settings (batch size, crop, workers) are the data.eval config's

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.mask_ratio < 1.0:  # the scores are over masked pixels, and some must stay visible
            problems.append(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.max_batches is not None and self.max_batches < 1:
            problems.append(f"max_batches must be >= 1 or null, got {self.max_batches}")
        if problems:
            raise ConfigError("eval: " + "; ".join(problems))


def reflectance(values: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    return values.float() * batch["band_std"][:, :, None, None] + batch["band_mean"][:, :, None, None]


def masked_forward(model: torch.nn.Module, batch: dict[str, Any], mask_ratio: float, seed: int) -> MAEOutput:
    generator = torch.Generator().manual_seed(seed)
    return model(batch["hsi"], batch["wavelengths"], batch["band_mask"], mask_ratio=mask_ratio, generator=generator,
                 spatial_masking=True)


# key in results["baselines"] -> (label for people, fill function)
BASELINES: dict[str, tuple[str, Callable[..., torch.Tensor]]] = {
    "nearest_visible": ("nearest visible pixel", nearest_visible_fill),
    "visible_mean": ("visible mean", visible_mean_fill),
}
# metric -> (label, True when higher is better)
METRICS = {"psnr": ("PSNR", True), "ssim": ("SSIM", True), "sam_deg": ("SAM", False)}


class _Scores:
    """Overall and per-band-set scores of one predictor, summed exactly as ``metrics.ReconstructionMeter`` sums them
    (every image weighs the same). The per-image metrics (SSIM is most of evaluation's cost) are computed once per
    batch and added to both totals, rather than once by each of two meters."""

    def __init__(self) -> None:
        self.totals: dict[str | None, dict[str, float]] = {}  # None: overall
        self.counts: dict[str | None, int] = {}

    def update(self, prediction: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor, band_set: str) -> None:
        per_image = _reconstruction_per_image(prediction.detach(), target.detach(), pixel_mask)
        for key in (None, band_set):
            totals = self.totals.setdefault(key, dict.fromkeys(per_image, 0.0))
            for metric, values in per_image.items():
                totals[metric] += float(values.sum())
            self.counts[key] = self.counts.get(key, 0) + len(per_image["psnr"])

    def mean(self, key: str | None) -> dict[str, float]:
        count = self.counts.get(key, 0)
        if count == 0:
            return dict.fromkeys(METRICS, math.nan)
        return {metric: self.totals[key][metric] / count for metric in METRICS}

    def merge_ranks(self) -> None:
        """Replace this rank's sums by the sums over every rank of the job (every image still weighs the same)."""
        parts = gather_from_all((self.totals, self.counts))
        self.totals, self.counts = {}, {}
        for totals, counts in parts:
            for key, sums in totals.items():
                mine = self.totals.setdefault(key, dict.fromkeys(sums, 0.0))
                for metric, value in sums.items():
                    mine[metric] += value
                self.counts[key] = self.counts.get(key, 0) + counts[key]

    def results(self) -> dict[str, Any]:
        results: dict[str, Any] = self.mean(None)
        for band_set in sorted(k for k in self.counts if k is not None):
            for metric, value in self.mean(band_set).items():
                results[f"{band_set}/{metric}"] = value
        return results


@torch.no_grad()
def evaluate_reconstruction(model: torch.nn.Module, loader: Any, config: EvalConfig,
                            device: torch.device | str = "cpu", baselines: bool = True) -> dict[str, Any]:
    """Mean PSNR (dB), SSIM and spectral angle (degrees) of masked reconstructions, per band set and overall.

    Keys: ``psnr``, ``ssim``, ``sam_deg``, ``images`` and ``<band_set>/<metric>`` for the model; with
    ``baselines``, ``results["baselines"][name]`` holds the same metric keys (overall and per band set) for each
    name of :data:`BASELINES`, scored on the same masked pixels of the same images.

    In a job of several processes, call it on every rank with the same one-process ``loader``: rank r scores the
    batches r, r + W, r + 2W ... of the stream (each with the mask of its position), and the sums are merged, so the
    results equal one process's on the same data. Where a forward gathers parameters from every rank (FSDP2,
    ZeRO-3), ranks left with fewer batches run unscored forwards until all ran as many.
    """
    if not getattr(model, "with_decoder", True):  # now, not as a traceback from deep inside forward()
        raise ConfigError("the model is encoder-only (an `hsfm export --encoder-only` export): masked reconstruction "
                          "needs the decoder; export the run without --encoder-only to evaluate it")
    rank, world = process_position()
    collective_forward = forward_is_collective(model)
    was_training = model.training
    model.eval()
    scores = _Scores()
    baseline_scores = {name: _Scores() for name in BASELINES} if baselines else {}
    filler, forwards, total = None, 0, 0
    for number, batch in enumerate(loader):
        if config.max_batches is not None and number >= config.max_batches:
            break
        total += 1
        if number == 0 and collective_forward:
            filler = batch
        if number % world != rank:
            continue
        forwards += 1
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = masked_forward(model, batch, config.mask_ratio, config.seed + number)
        pixel_mask = out.band_mask().any(dim=1)  # spatial masking: the same for every band
        bands = batch["band_mask"]
        prediction = reflectance(out.prediction, batch) * bands[:, :, None, None]
        target = reflectance(batch["hsi"], batch) * bands[:, :, None, None]
        band_set = batch["band_set"][0]
        scores.update(prediction, target, pixel_mask, band_set)
        for name, (_, fill) in BASELINES.items() if baselines else ():
            # filled from the target itself: the visible pixels are exactly what the model was shown
            filled = fill(target, pixel_mask, band_mask=bands, valid=batch.get("valid"))
            baseline_scores[name].update(filled, target, pixel_mask, band_set)
    if collective_forward and filler is not None:
        filler = {k: v.to(device) if torch.is_tensor(v) else v for k, v in filler.items()}
        for _ in range(math.ceil(total / world) - forwards):
            masked_forward(model, filler, config.mask_ratio, config.seed)
    model.train(was_training)
    if world > 1:
        for meters in (scores, *baseline_scores.values()):
            meters.merge_ranks()
    results = scores.results()
    results["images"] = scores.counts.get(None, 0)
    if baselines:
        results["baselines"] = {name: meters.results() for name, meters in baseline_scores.items()}
    return results


def losses_to_baselines(results: dict[str, Any], prefix: str = "") -> dict[str, list[str]]:
    """Baseline name -> the metrics (``psnr``, ``ssim``, ``sam_deg``) on which the model scores strictly worse.

    ``prefix`` (e.g. ``"samson/"``) compares one band set. NaN scores are never counted as a loss.
    """
    lost: dict[str, list[str]] = {}
    for name, baseline in (results.get("baselines") or {}).items():
        worse = []
        for metric, (_, higher_is_better) in METRICS.items():
            ours, theirs = results.get(prefix + metric, math.nan), baseline.get(prefix + metric, math.nan)
            if math.isnan(ours) or math.isnan(theirs):
                continue
            if (ours < theirs) if higher_is_better else (ours > theirs):
                worse.append(metric)
        if worse:
            lost[name] = worse
    return lost


def format_comparison(results: dict[str, Any], indent: str = "  ") -> list[str]:
    """Table lines: the model and each baseline (PSNR dB, SSIM, SAM deg), overall then per band set, and one
    ``note:`` line per baseline the model loses to."""
    rows = [("model", results)] + [(BASELINES[name][0] if name in BASELINES else name, scores)
                                   for name, scores in (results.get("baselines") or {}).items()]
    width = max(len(label) for label, _ in rows)

    def table(prefix: str) -> list[str]:
        lines = [f"{indent}{'':{width}s} {'PSNR dB':>8s} {'SSIM':>7s} {'SAM deg':>8s}"]
        for label, scores in rows:
            psnr, ssim, sam = (scores.get(prefix + metric, math.nan) for metric in METRICS)
            lines.append(f"{indent}{label:{width}s} {psnr:8.2f} {ssim:7.4f} {sam:8.2f}")
        return lines

    def notes(prefix: str, where: str) -> list[str]:
        lines = []
        for name, metrics in losses_to_baselines(results, prefix).items():
            label = (BASELINES[name][0] if name in BASELINES else name).replace(" ", "-")
            names = [METRICS[m][0] for m in metrics]
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            lines.append(f"note: the model loses to the {label} baseline on {listed}{where}")
        return lines

    lines = table("") + notes("", "")
    band_sets = sorted(k[: -len("/psnr")] for k in results if k.endswith("/psnr"))
    if len(band_sets) > 1:  # with one band set the breakdown repeats the overall table
        for band_set in band_sets:
            lines.append(f"{indent}band set {band_set}:")
            lines += table(f"{band_set}/") + notes(f"{band_set}/", f" (band set {band_set})")
    return lines


def eval_loader(shards: str, batch_size: int, num_workers: int = 0) -> StreamingLoader:
    """One pass over every sample, bucketed by band set (bucket batching keeps one band set per batch)."""
    return StreamingLoader(LoaderConfig(shards=shards, batch_size=batch_size, num_workers=num_workers,
                                        resampled=False, shuffle_buffer=0, batching="bucket"))
