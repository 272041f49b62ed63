"""What a backbone knows about optical-SAR pairs: cross-modal retrieval, effective rank, reconstruction.

    hsfm eval-pairs backbone=runs/codemae/export \\
        data.pairs=../shared/data/optical_sar/volkov_s1s2_aligned/volkov_s1s2_256.npz data.split=held_out
    hsfm eval-pairs backbone=random random_like=EXPORT data.pairs=...        the same architecture at random init
    hsfm eval-pairs backbone=EXPORT data.pairs=pairs.yaml                     a manifest of {path: opt.png, pair: sar.png}

From Python: ``run_eval_pairs(load_eval_pairs_config([...overrides]))``. Outputs in ``output_dir``: summary.json
and figures/singular_values.png.

Each image (the ``data.crop`` px centre crop when set; with ``data.tile`` each of its non-overlapping tiles, as a
pair of its own: more pairs, a harder and less noisy retrieval at the tile size a backbone was trained on) is
normalised per band with the statistics of the backbone
when it knows the band set, else with those of all the chosen images of its modality, and encoded alone (no
masking); its embedding is the mean of its patch tokens. Retrieval: cosine similarity between every SAR and every
optical embedding, each modality's mean embedding over the evaluated pairs subtracted first (``centre``: without
it, a backbone that was never aligned puts all pairs at one similarity, ~0.96, set by what every image shares); SAR -> optical Recall@k is the fraction of SAR images whose own optical image ranks among the k
most similar (ties count against), and optical -> SAR the converse; chance is k / pairs. Effective rank (RankMe,
Garrido et al. 2023): exp of the entropy of the L1-normalised singular values of a modality's embeddings [pairs, D],
and of its patch tokens (at most ``max_tokens`` of them, evenly spaced); the image-level value is at most the pair
count, so compare it only between runs on the same pairs. Reconstruction (a backbone with its decoder):
PSNR / SSIM of each modality's masked patches, beside copying the nearest visible pixel and the visible mean
(``hsfm eval-recon``'s meters and masking).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from hsfm_train.config import compose, free_mapping_overrides
from hsfm_train.data.pairs import SPLITS, ImagePair, read_pairs, select_split
from hsfm_train.engine.run_records import torch_device
from hsfm_train.errors import ConfigError, DataFormatError
from hsfm_train.io import jsonable
from hsfm_train.metrics import effective_rank
from hsfm_train.stages.base import Stage, register_stage, say
from hsfm_train.stages.probe import backbone_from, backbone_problems, missing_backbone, normalisation_statistics

MODALITIES = ("optical", "sar")


@dataclass
class EvalPairsDataConfig:
    pairs: str = ""  # required: an optical-SAR .npz stack or a YAML manifest
    reader: dict[str, Any] = field(default_factory=dict)  # reader options, applied to every pair
    split: str = "all"  # "all", "held_out" or "train" (by source image; hsfm_train/data/pairs.py)
    held_out_fraction: float = 0.2
    crop: int = 0  # px; 0: whole images
    tile: int = 0  # px; > 0: every image (after the crop) cut into non-overlapping tiles, each tile one pair


@dataclass
class EvalPairsConfig:
    data: EvalPairsDataConfig = field(default_factory=EvalPairsDataConfig)
    backbone: str = "runs/main-mae/export"  # an `hsfm export` directory, or "random"
    random_like: str | None = None  # backbone=random: the architecture (and normalisation) of this export
    random_model: str = "tiny"  # backbone=random without random_like: a preset of configs/model/
    seed: int = 0  # initialisation of a random backbone
    ks: list[int] = field(default_factory=lambda: [1, 5])  # Recall@k
    centre: bool = True  # retrieval on embeddings minus their modality's mean (no labels read; see the docstring)
    batch_size: int = 8
    max_tokens: int = 25000  # patch tokens the token-level effective rank is taken over, per modality
    reconstruction: bool = True  # masked reconstruction of each modality (needs the decoder)
    mask_ratio: float = 0.75
    mask_seed: int = 1234
    device: str = "auto"
    name: str = "eval-pairs"
    output_dir: str = "runs/eval-pairs"


def load_eval_pairs_config(overrides: list[str] | None = None) -> EvalPairsConfig:
    config = compose("eval-pairs", free_mapping_overrides(list(overrides or []), ("data.reader",)), EvalPairsConfig)
    problems = config_problems(config)
    if problems:
        raise ConfigError("eval-pairs config: " + "; ".join(problems + input_problems(config)))
    return config


def input_problems(config: EvalPairsConfig) -> list[str]:
    """Every input that is unset or missing (checked when the stage starts, so that --print-config works)."""
    problems = []
    if config.data.pairs in ("", None):
        problems.append("data.pairs must be set (an optical-SAR .npz stack or a YAML manifest)")
    elif not Path(config.data.pairs).exists():
        problems.append(f"data.pairs {config.data.pairs} does not exist")
    problems += missing_backbone(config.backbone, config.random_like)
    return problems


def config_problems(config: EvalPairsConfig) -> list[str]:
    """Every impossible setting (nothing is read)."""
    problems = []
    if config.data.split not in SPLITS:
        problems.append(f"data.split must be one of {list(SPLITS)}, got {config.data.split!r}")
    if not 0.0 < config.data.held_out_fraction < 1.0:
        problems.append(f"data.held_out_fraction must be in (0, 1), got {config.data.held_out_fraction}")
    for name in ("crop", "tile"):
        if getattr(config.data, name) < 0:
            problems.append(f"data.{name} must be >= 0 px, got {getattr(config.data, name)}")
    if not config.ks or any(k < 1 for k in config.ks):
        problems.append(f"ks must be positive ranks, got {config.ks}")
    for name in ("batch_size", "max_tokens"):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(config, name)}")
    if not 0.0 < config.mask_ratio < 1.0:
        problems.append(f"mask_ratio must be in (0, 1), got {config.mask_ratio}")
    problems += backbone_problems(config.backbone, config.random_like, config.random_model)
    return problems


# ------------------------------------------------------------------------------------------------- measures


def recall_at_k(similarity: np.ndarray, ks: list[int]) -> dict[int, float]:
    """Row i's correct column is i: the fraction of rows whose correct column is among the k most similar, ties
    counted against (a row of equal similarities is a miss at every k < columns)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    own = np.diag(similarity)[:, None]
    rank = (similarity >= own).sum(axis=1) - 1  # columns at least as similar, the correct one left out
    return {k: float(np.mean(rank < k)) for k in ks}


def singular_values(embeddings: np.ndarray) -> np.ndarray:
    values = np.linalg.svd(np.asarray(embeddings, dtype=np.float64), compute_uv=False)
    return values / values.sum() if values.sum() > 0 else values


# ---------------------------------------------------------------------------------------------------- inputs


def _centre_crop(image: np.ndarray, crop: int) -> np.ndarray:
    if not crop:
        return image
    height, width = image.shape[:2]
    if crop > min(height, width):
        raise DataFormatError(f"data.crop={crop} exceeds an image of {height}x{width}")
    top, left = (height - crop) // 2, (width - crop) // 2
    return image[top:top + crop, left:left + crop]


def tile_pairs(pairs: list[ImagePair], tile: int) -> list[ImagePair]:
    """Each pair cut into its non-overlapping ``tile`` px tiles (row-major; a remainder at the right or bottom edge
    is dropped), each tile a pair named ``<pair>/r<row>c<col>`` of the same source."""
    tiles = []
    for pair in pairs:
        height, width = pair.optical.shape[:2]
        if pair.sar.shape[:2] != (height, width):
            raise DataFormatError(f"pair {pair.name}: optical {height}x{width} and SAR {pair.sar.shape[:2]} differ "
                                  "in size; data.tile needs co-registered images of one size")
        if tile > min(height, width):
            raise DataFormatError(f"data.tile={tile} exceeds pair {pair.name}'s {height}x{width} images")
        for top in range(0, height - tile + 1, tile):
            for left in range(0, width - tile + 1, tile):
                window = np.s_[top:top + tile, left:left + tile]
                tiles.append(replace(pair, name=f"{pair.name}/r{top // tile}c{left // tile}",
                                     optical=pair.optical[window], sar=pair.sar[window]))
    return tiles


@dataclass
class ModalityImages:
    name: str
    images: np.ndarray  # [N, C, H, W] float32, normalised for the model
    wavelengths: np.ndarray  # [C]
    normalisation: str
    mean: np.ndarray  # [C] the statistics used (for reflectance-space reconstruction scores)
    std: np.ndarray


def prepare_modality(model: torch.nn.Module, pairs: list[ImagePair], modality: str, crop: int,
                     statistics: dict[str, Any] | None) -> ModalityImages:
    """One modality of every pair, cropped, normalised as the backbone expects (see the module docstring)."""
    images = [_centre_crop(getattr(pair, modality), crop) for pair in pairs]
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise DataFormatError(f"{modality} images differ in shape ({sorted(shapes)}); set data.crop to compare them")
    wavelengths = getattr(pairs[0], f"{modality}_wavelengths")
    if any(not np.allclose(getattr(p, f"{modality}_wavelengths"), wavelengths) for p in pairs):
        raise DataFormatError(f"{modality} images have different band centres; evaluate one sensor pair at a time")
    stack = np.stack(images)  # [N, H, W, C]
    count, height, width, bands = stack.shape
    raw = stack.reshape(count * height, width, bands)
    mean, std, source = normalisation_statistics(model, raw, wavelengths, statistics)
    normalised = ((raw - mean) / std).astype(np.float32)
    images_nchw = np.ascontiguousarray(normalised.reshape(count, height, width, bands).transpose(0, 3, 1, 2))
    return ModalityImages(modality, images_nchw.astype(np.float32), np.asarray(wavelengths, dtype=np.float32),
                          source, mean.astype(np.float32), std.astype(np.float32))


@torch.no_grad()
def embed_modality(model: torch.nn.Module, data: ModalityImages, batch_size: int, device: torch.device,
                   max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(image embeddings [N, D]: the mean patch token, patch tokens [<= max_tokens, D] evenly spaced)."""
    wavelengths = torch.as_tensor(data.wavelengths, device=device)
    pooled, tokens = [], []
    for start in range(0, len(data.images), batch_size):
        batch = torch.from_numpy(data.images[start:start + batch_size]).to(device)
        encoded = model.encode(batch, wavelengths).float()[:, 1:]  # [n, G*P, D], cls dropped
        pooled.append(encoded.mean(dim=1).cpu())
        tokens.append(encoded.reshape(-1, encoded.shape[-1]).cpu())
    all_tokens = torch.cat(tokens)
    step = max(1, len(all_tokens) // max_tokens)
    return torch.cat(pooled).numpy(), all_tokens[::step][:max_tokens].numpy()


def _reconstruction(model: torch.nn.Module, data: ModalityImages, config: EvalPairsConfig, device: torch.device
                    ) -> dict[str, Any]:
    from hsfm_train.stages.eval_recon import EvalConfig, evaluate_reconstruction

    count, bands = data.images.shape[:2]

    def batches():
        for start in range(0, count, config.batch_size):
            n = min(config.batch_size, count - start)
            yield {"hsi": torch.from_numpy(data.images[start:start + n]),
                   "wavelengths": torch.as_tensor(data.wavelengths).expand(n, -1).clone(),
                   "band_mask": torch.ones(n, bands, dtype=torch.bool),
                   "band_mean": torch.as_tensor(data.mean).expand(n, -1).clone(),
                   "band_std": torch.as_tensor(data.std).expand(n, -1).clone(),
                   "band_set": [data.name] * n}

    results = evaluate_reconstruction(model, batches(), EvalConfig(config.mask_ratio, config.mask_seed), device)
    keep = ("psnr", "ssim")  # the spectral angle of a one-band (SAR) pixel is always 0
    return {"model": {k: results[k] for k in keep},
            "baselines": {name: {k: scores[k] for k in keep} for name, scores in results["baselines"].items()},
            "images": results["images"]}


# ------------------------------------------------------------------------------------------------------- run


def eval_pairs_summary(config: EvalPairsConfig) -> dict[str, Any]:
    started = time.perf_counter()
    problems = config_problems(config) + input_problems(config)
    if problems:
        raise ConfigError("eval-pairs config: " + "; ".join(problems))
    device = torch_device(config.device)
    model, statistics, description = backbone_from(config.backbone, config.random_like, config.random_model,
                                                   config.seed, with_decoder=config.reconstruction)
    model = model.to(device).eval()
    pairs = select_split(read_pairs(config.data.pairs, config.data.reader), config.data.split,
                         config.data.held_out_fraction)
    if len(pairs) < 2:
        raise DataFormatError(f"data.pairs {config.data.pairs} (split {config.data.split}): {len(pairs)} pairs; "
                              "retrieval needs at least 2")
    say(f"eval-pairs: {len(pairs)} pairs ({config.data.split}), backbone {description}")
    images = len(pairs)
    if config.data.tile:
        pairs = tile_pairs([replace(p, optical=_centre_crop(p.optical, config.data.crop),
                                    sar=_centre_crop(p.sar, config.data.crop)) for p in pairs], config.data.tile)
        say(f"eval-pairs: data.tile={config.data.tile}: {len(pairs)} tile pairs from {images} image pairs")
    data = {m: prepare_modality(model, pairs, m, 0 if config.data.tile else config.data.crop, statistics)
            for m in MODALITIES}
    embedded = {m: embed_modality(model, data[m], config.batch_size, device, config.max_tokens) for m in MODALITIES}
    optical, sar = (torch.from_numpy(embedded[m][0]) for m in MODALITIES)
    if config.centre:  # each modality's mean embedding out: what is common to every image is no evidence
        optical, sar = optical - optical.mean(dim=0), sar - sar.mean(dim=0)
    optical, sar = F.normalize(optical, dim=1), F.normalize(sar, dim=1)
    similarity = (sar @ optical.T).numpy()  # [SAR i, optical j]
    sar_to_optical = recall_at_k(similarity, config.ks)
    optical_to_sar = recall_at_k(similarity.T, config.ks)
    summary: dict[str, Any] = {"pairs": len(pairs), "images": images, "tile": config.data.tile,
                               "split": config.data.split, "backbone": description, "data": str(config.data.pairs)}
    for k in config.ks:
        summary[f"sar_to_optical_r{k}"] = sar_to_optical[k]
        summary[f"optical_to_sar_r{k}"] = optical_to_sar[k]
        summary[f"chance_r{k}"] = min(1.0, k / len(pairs))
    spectra = {}
    for modality in MODALITIES:
        images, tokens = embedded[modality]
        summary[f"effective_rank_{modality}"] = effective_rank(images, max_rows=None, centre=False)  # RankMe
        summary[f"effective_rank_tokens_{modality}"] = effective_rank(tokens, max_rows=None, centre=False)
        summary[f"embedding_dim_{modality}"] = int(images.shape[1])
        summary[f"normalisation_{modality}"] = data[modality].normalisation
        spectra[f"{modality} images"] = singular_values(images)
        spectra[f"{modality} tokens"] = singular_values(tokens)
    summary["positive_similarity_mean"] = float(np.mean(np.diag(similarity)))
    summary["negative_similarity_mean"] = float((similarity.sum() - np.trace(similarity))
                                                / max(1, similarity.size - len(similarity)))
    if config.reconstruction:
        if getattr(model, "with_decoder", False):
            summary["reconstruction"] = {m: _reconstruction(model, data[m], config, device) for m in MODALITIES}
        else:
            summary["reconstruction"] = None
            summary.setdefault("notes", []).append("reconstruction skipped: the backbone is encoder-only")
    output = Path(config.output_dir)
    from hsfm_train.figures import singular_value_figure

    summary["figures"] = {"singular_values": str(singular_value_figure(
        output / "figures" / "singular_values.png", spectra, f"{description}: {len(pairs)} pairs"))}
    summary["seconds"] = time.perf_counter() - started
    summary["config"] = jsonable(asdict(config))
    return summary


def run_eval_pairs(config: EvalPairsConfig) -> dict[str, Any]:
    return EvalPairsStage(config).execute()


@register_stage
class EvalPairsStage(Stage):
    """``hsfm eval-pairs``: the runner locks output_dir, calls :func:`eval_pairs_summary`, writes summary.json."""

    name = "eval-pairs"
    help = "optical-SAR cross-modal retrieval, effective rank and reconstruction of a backbone"
    config_class = EvalPairsConfig

    @classmethod
    def load_config(cls, overrides: list[str] | None = None) -> EvalPairsConfig:
        return load_eval_pairs_config(overrides)

    def run(self) -> dict[str, Any]:
        return eval_pairs_summary(self.config)

    def format_summary(self, summary: dict[str, Any]) -> str:
        return format_eval_pairs_summary(summary)


def format_eval_pairs_summary(summary: dict[str, Any]) -> str:
    ks = summary["config"]["ks"]
    tiles = f" ({summary['tile']} px tiles of {summary['images']} image pairs)" if summary.get("tile") else ""
    lines = [f"{summary['pairs']} optical-SAR pairs{tiles} ({summary['split']}); backbone {summary['backbone']}"]
    for direction, label in (("sar_to_optical", "SAR -> optical"), ("optical_to_sar", "optical -> SAR")):
        cells = ", ".join(f"R@{k} {100 * summary[f'{direction}_r{k}']:.1f} % (chance {100 * summary[f'chance_r{k}']:.1f})"
                          for k in ks)
        lines.append(f"  {label}: {cells}")
    lines.append(f"  effective rank: optical {summary['effective_rank_optical']:.1f} (tokens "
                 f"{summary['effective_rank_tokens_optical']:.1f}), SAR {summary['effective_rank_sar']:.1f} (tokens "
                 f"{summary['effective_rank_tokens_sar']:.1f}) of {summary['embedding_dim_optical']} dims")
    for modality, entry in (summary.get("reconstruction") or {}).items():
        model = entry["model"]
        base = ", ".join(f"{name.replace('_', ' ')} {b['psnr']:.2f} dB" for name, b in entry["baselines"].items())
        lines.append(f"  {modality} reconstruction: PSNR {model['psnr']:.2f} dB, SSIM {model['ssim']:.3f} ({base})")
    return "\n".join(lines)
