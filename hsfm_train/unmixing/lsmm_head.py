"""``lsmm-head``: an exported backbone + KARMA's linear-spectral-mixing abundance head, fitted to one scene.

    features z = the backbone's per-pixel features (patch tokens upsampled to pixels; optionally + the pixel's
                 own normalised spectrum)
    a          = softmax(MLP_{F -> F/2 -> R}(z))           abundances: non-negative, sum to one
    x_hat      = a E,   E [R, B] >= 0                     the mixture, in the scene's own bands

E starts from VCA or N-FINDR, from uniform random reflectances (KARMA's choice), or (``endmembers=labelled``) from K labelled
pixels by non-negative least squares. The loss is KARMA's: Huber on the mixture (reflectance) + spectral angle +
the physics term, the mixture's squared error in the backbone's band-normalised units (what the pretraining
objective's physics term measures; it weights low-variance bands up). The backbone is frozen (its features are
computed once per run) or its last ``unfreeze_blocks`` transformer blocks train with the head (the whole image
goes through the backbone at every step).

``backbone=random`` is the control: the same architecture (``random_like`` an export, or a ``random_model``
preset) at random initialisation, seeded by the run's seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hsfm_train.errors import ConfigError, DataFormatError
from hsfm_train.kernels import spectral_angle_loss
from hsfm_train.spectra import labelled_endmembers, nfindr, vca
from hsfm_train.unmixing.base import UnmixingInput, UnmixingMethod
from hsfm_train.engine.run_records import torch_device

ENDMEMBER_STARTS = ("vca", "nfindr", "random", "labelled")
READOUTS = ("encoder", "decoder")


@dataclass
class LSMMHeadConfig:
    backbone: str = "runs/main-mae/export"  # an `hsfm export` directory, or "random"
    random_like: str | None = None  # backbone=random: this export's architecture, freshly initialised
    random_model: str = "tiny"  # backbone=random without random_like: a preset of configs/model/
    readout: str = "encoder"  # "encoder" tokens, or "decoder" tokens (an export with its decoder, nothing masked)
    with_spectrum: bool = True  # append the pixel's own normalised spectrum to its backbone features
    endmembers: str = "vca"  # the start of E: vca, nfindr, random, labelled
    labelled: int = 0  # endmembers=labelled: K ground-truth pixels for the least-squares start
    unfreeze_blocks: int = 0  # the last N transformer blocks train with the head (0: frozen backbone)
    backbone_lr: float = 1e-5  # unfrozen blocks
    epochs: int = 300  # passes over all pixels
    batch_size: int = 2048  # pixels per step (frozen backbone); an unfrozen backbone steps on the whole image
    lr: float = 1e-3  # Adam: head
    endmember_lr: float = 1e-4  # Adam: E
    huber_weight: float = 1.0
    sam_weight: float = 1.0
    physics_weight: float = 0.1
    huber_delta: float = 0.01  # reflectance units

    def problems(self) -> list[str]:
        problems = []
        if self.endmembers not in ENDMEMBER_STARTS:
            problems.append(f"lsmm.endmembers must be one of {', '.join(ENDMEMBER_STARTS)}, got {self.endmembers!r}")
        if self.endmembers == "labelled" and self.labelled < 1:
            problems.append("lsmm.endmembers=labelled needs lsmm.labelled >= 1 ground-truth pixels")
        if self.endmembers != "labelled" and self.labelled:
            problems.append(f"lsmm.labelled={self.labelled} is only used with lsmm.endmembers=labelled")
        if self.readout not in READOUTS:
            problems.append(f"lsmm.readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"lsmm.{name} must be >= 1, got {getattr(self, name)}")
        if self.unfreeze_blocks < 0:
            problems.append(f"lsmm.unfreeze_blocks must be >= 0, got {self.unfreeze_blocks}")
        return problems


class AbundanceHead(nn.Module):
    """KARMA's abundance MLP F -> F/2 -> R with a softmax, and the endmember matrix E [R, B] it mixes."""

    def __init__(self, features: int, count: int, start: np.ndarray):
        super().__init__()
        hidden = max(features // 2, count)
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, count))
        self.endmembers = nn.Parameter(torch.as_tensor(start, dtype=torch.float32).clone())

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abundances = self.mlp(features).softmax(dim=-1)
        return abundances, abundances @ self.endmembers


def _start(inputs: UnmixingInput, settings: LSMMHeadConfig, seed: int) -> np.ndarray:
    if settings.endmembers == "vca":
        return vca(inputs.pixels, inputs.count, seed=seed)
    if settings.endmembers == "nfindr":
        return nfindr(inputs.pixels, inputs.count, seed=seed)
    if settings.endmembers == "random":
        return np.random.default_rng(seed).uniform(0.05, 0.6, (inputs.count, inputs.pixels.shape[1])).astype(
            np.float32) * float(inputs.pixels.max())
    if inputs.labelled is None:
        raise ConfigError("lsmm.endmembers=labelled, but no labelled pixels were given")
    return labelled_endmembers(inputs.pixels[inputs.labelled.indices], inputs.labelled.abundances,
                               setting="lsmm.labelled")


def _backbone(settings: LSMMHeadConfig, seed: int) -> tuple[nn.Module, dict[str, Any] | None]:
    from hsfm_train.stages.probe import ProbeConfig, load_backbone

    model, statistics, _ = load_backbone(ProbeConfig(backbone=settings.backbone, random_like=settings.random_like,
                                                     random_model=settings.random_model, readout=settings.readout,
                                                     seed=seed))
    return model, statistics


def _blocks(model: nn.Module, readout: str) -> list[nn.Module]:
    """The transformer blocks the readout's features come out of, in order."""
    blocks = getattr(model, "decoder_blocks" if readout == "decoder" else "blocks", None)
    if blocks is None:
        raise ConfigError(f"lsmm.unfreeze_blocks: this backbone has no {readout} blocks to unfreeze")
    return list(blocks)


def _token_grid(model: nn.Module, hsi: torch.Tensor, wavelengths: torch.Tensor, readout: str) -> torch.Tensor:
    """Differentiable per-pixel backbone features [F, H', W'] of a padded image [1, B, H', W']."""
    p = model.config.patch_size
    rows, cols = hsi.shape[2] // p, hsi.shape[3] // p
    tokens = model.decoder_features(hsi, wavelengths)[0] if readout == "decoder" else model.encode(hsi, wavelengths)[0, 1:]
    groups = tokens.shape[0] // (rows * cols)
    grid = tokens.float().view(groups, rows, cols, -1).permute(0, 3, 1, 2).reshape(1, -1, rows, cols)
    return F.interpolate(grid, size=(rows * p, cols * p), mode="bilinear", align_corners=False)[0]


def fit_lsmm_head(inputs: UnmixingInput, seed: int, config: Any) -> tuple[np.ndarray, np.ndarray]:
    from hsfm_train.stages.probe import normalise_for_model, pixel_features

    settings: LSMMHeadConfig = config.lsmm
    if inputs.wavelengths_nm is None:
        raise ConfigError("lsmm-head: the scene has no band centres for the backbone's wavelength-aware tokenizer; "
                          "give them under data.reader (sensor_preset=..., e.g. aviris or hydice_urban162, or "
                          "wavelengths_nm=[...])")
    device = torch_device(config.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model, statistics = _backbone(settings, seed)
        model = model.to(device).eval()
        height, width = inputs.shape
        cube = inputs.cube.astype(np.float32)
        normalised, _ = normalise_for_model(model, cube, inputs.wavelengths_nm, statistics)
        # the band-normalisation as an affine map reflectance -> normalised (per band), for the physics term
        flat, flat_n = cube.reshape(-1, cube.shape[2]).astype(np.float64), normalised.reshape(-1, cube.shape[2])
        scale = flat.std(0) / np.maximum(flat_n.std(0), 1e-12)
        offset = flat.mean(0) - scale * flat_n.mean(0)
        scale_t = torch.as_tensor(np.maximum(scale, 1e-12), dtype=torch.float32, device=device)
        offset_t = torch.as_tensor(offset, dtype=torch.float32, device=device)
        pixels = torch.as_tensor(inputs.pixels, dtype=torch.float32, device=device)
        spectra_n = torch.as_tensor(flat_n, dtype=torch.float32, device=device)

        blocks = _blocks(model, settings.readout) if settings.unfreeze_blocks else []
        if settings.unfreeze_blocks > len(blocks):
            raise ConfigError(f"lsmm.unfreeze_blocks={settings.unfreeze_blocks}, but the backbone has {len(blocks)} "
                              "transformer blocks")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        trainable = [p for block in blocks[len(blocks) - settings.unfreeze_blocks:] for p in block.parameters()] \
            if settings.unfreeze_blocks else []
        for parameter in trainable:
            parameter.requires_grad_(True)

        if trainable:
            p = model.config.patch_size
            padded = np.pad(normalised, ((0, -height % p), (0, -width % p), (0, 0)), mode="reflect")
            hsi = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None].to(device)
            lam = torch.as_tensor(np.asarray(inputs.wavelengths_nm, dtype=np.float32), device=device)

            def features_of(index: torch.Tensor | None) -> torch.Tensor:
                grid = _token_grid(model, hsi, lam, settings.readout)[:, :height, :width]
                features = grid.reshape(grid.shape[0], -1).T
                if settings.with_spectrum:
                    features = torch.cat([features, spectra_n], dim=1)
                return features if index is None else features[index]
            feature_count = features_of(None).shape[1]
        else:
            frozen = torch.as_tensor(pixel_features(model, normalised, inputs.wavelengths_nm,
                                                    with_spectrum=settings.with_spectrum, readout=settings.readout),
                                     device=device)

            def features_of(index: torch.Tensor | None) -> torch.Tensor:
                return frozen if index is None else frozen[index]
            feature_count = frozen.shape[1]
        if not torch.isfinite(features_of(None)).all():
            raise DataFormatError("lsmm-head: the backbone's features of this scene are not finite")

        head = AbundanceHead(feature_count, inputs.count, _start(inputs, settings, seed)).to(device)
        groups = [{"params": head.mlp.parameters(), "lr": settings.lr},
                  {"params": [head.endmembers], "lr": settings.endmember_lr}]
        if trainable:
            groups.append({"params": trainable, "lr": settings.backbone_lr})
        optimiser = torch.optim.Adam(groups)
        count = len(pixels)
        batch = count if trainable else min(settings.batch_size, count)
        steps = math.ceil(count / batch)
        model.train(bool(trainable))
        head.train()
        for _ in range(settings.epochs):
            order = torch.randperm(count, device=device)
            for step in range(steps):
                index = order[step * batch:(step + 1) * batch]
                _, mixture = head(features_of(index))
                target = pixels[index]
                loss = (settings.huber_weight * F.huber_loss(mixture, target, delta=settings.huber_delta)
                        + settings.sam_weight * spectral_angle_loss(mixture, target)
                        + settings.physics_weight * F.mse_loss((mixture - offset_t) / scale_t, spectra_n[index]))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    head.endmembers.clamp_(min=0.0)
        model.eval()
        head.eval()
        with torch.no_grad():
            abundances, _ = head(features_of(None))
    return head.endmembers.detach().cpu().numpy().astype(np.float32), abundances.cpu().numpy().astype(np.float32)


LSMM_METHODS = {
    "lsmm-head": UnmixingMethod(
        fit_lsmm_head, labelled_pixels=lambda config: config.lsmm.labelled if config.lsmm.endmembers == "labelled"
        else 0, description="exported backbone + LSMM abundance head (KARMA)"),
}
