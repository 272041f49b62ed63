"""Semi-supervised dual-branch spatial-spectral Mamba unmixing (``mamba-semi``).

Image-level: every training step sees the whole image (batch 1). The network (``models/mamba.py``) maps the cube
to softmax abundances A [P, R]; the decoder is the linear mixing model A E with a learned E >= 0 [R, B] (clamped
after each step), each pixel scaled by its least-squares brightness factor c_p (``mamba.brightness``): real
scenes' illumination varies from pixel to pixel while abundances sum to one. With K = ``mamba.labelled``
labelled pixels, E starts from the constrained least-squares fit to them, min ||Y_K - diag(c) A_K E|| over E >= 0
and c > 0 (``mamba.scaled_start``; plain NNLS per band without c), and

    loss = mean_P ||(y_p - c_p a_p E) / s||^2                (reconstruction, s = the scene's peak value)
         + supervised_weight * mean_K sum_r |a_kr - a*_kr|    (L1 on the labelled pixels only)
         + sparsity_weight * mean_P sum_r sqrt(a_pr + eps)    (L1/2: softmax abundances make L1 constant)

K = 0 is the blind baseline: E starts from VCA and the supervised term is absent. K < R labelled pixels cannot
determine E and are refused (a ConfigError naming the problem), as is a draw whose abundances span fewer than R
dimensions. Adam (``lr`` for the network, ``endmember_lr`` for E, in units of s); the network's gradient norm is
clipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from hsfm_train.spectra import anchored_als, labelled_endmembers, vca
from hsfm_train.unmixing.base import UnmixingInput, UnmixingMethod
from hsfm_train.engine.run_records import torch_device

SPARSITY_EPS = 1e-6


@dataclass
class MambaSemiConfig:
    labelled: int = 10  # K pixels with ground-truth abundances; 0 = the blind baseline
    epochs: int = 400  # full-image steps; on Samson the scores settle by 300-400
    lr: float = 0.003  # Adam
    features: int = 64  # C, the shared convolutional features and the Mamba model width
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    pooled_size: int = 16  # S: the spatial branch scans an S x S average-pooled grid
    supervised_weight: float = 1.0
    sparsity_weight: float = 1e-4
    # E's own Adam rate, in units of the scene's peak value: on Samson 1e-4 left E at its start; 1e-3 refines it
    endmember_lr: float = 1e-3
    # the least-squares start gives each labelled pixel its own brightness factor (Y_k ~ c_k a_k E): real scenes'
    # illumination varies from pixel to pixel while their ground-truth abundances sum to one
    scaled_start: bool = True
    # the reconstruction gives each pixel its least-squares brightness factor c_p (X_hat_p = c_p a_p E), the same
    # scaled model: without it a pixel darker than the mixture its abundances describe cannot be reconstructed
    brightness: bool = True
    grad_clip: float = 1.0  # the network's gradient norm is clipped to this (0: off); a spike can kill a softmax class
    # E's start with labelled pixels: "labelled" (their least-squares fit) or "als" (that fit refined by the
    # labelled-als baseline on all pixels, its default settings), so the network starts where the baseline ends
    start: str = "labelled"

    def problems(self) -> list[str]:
        problems = [] if self.labelled >= 0 else [f"mamba.labelled must be >= 0, got {self.labelled}"]
        for name in ("epochs", "features", "d_state", "d_conv", "expand", "pooled_size"):
            if getattr(self, name) < 1:
                problems.append(f"mamba.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "endmember_lr", "supervised_weight", "sparsity_weight", "grad_clip"):
            if getattr(self, name) < 0:
                problems.append(f"mamba.{name} must be >= 0, got {getattr(self, name)}")
        if self.start not in ("labelled", "als"):
            problems.append(f"mamba.start must be labelled or als, got {self.start!r}")
        return problems


def initial_endmembers(inputs: UnmixingInput, seed: int, scaled: bool = True, start: str = "labelled") -> np.ndarray:
    """The constrained least-squares fit to the labelled pixels (``start="als"``: refined by the anchored ALS on
    all pixels), or VCA without them."""
    if inputs.labelled is not None and len(inputs.labelled.indices) and start == "als":
        return anchored_als(inputs.pixels, inputs.count, inputs.labelled.indices, inputs.labelled.abundances,
                            setting="mamba.labelled")[0]
    if inputs.labelled is not None and len(inputs.labelled.indices):
        return labelled_endmembers(inputs.pixels[inputs.labelled.indices], inputs.labelled.abundances, scaled,
                                   setting="mamba.labelled")
    return vca(inputs.pixels, inputs.count, seed=seed)


def brightness_factors(mixtures: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """[P] the least-squares c_p >= 0 minimising ||pixels_p - c_p mixtures_p||."""
    power = mixtures.pow(2).sum(1)
    return ((mixtures * pixels).sum(1) / power.clamp_min(1e-12)).clamp_min(0.0)


def unmixing_loss(abundances: torch.Tensor, reconstruction: torch.Tensor, target: torch.Tensor,
                  labelled: tuple[torch.Tensor, torch.Tensor] | None, config: MambaSemiConfig,
                  scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The loss terms (and their weighted ``total``) of abundances [P, R], reconstruction and target [P, B];
    ``labelled`` = (indices [K], abundances [K, R]) or None; ``scale`` the scene's peak value (the squared error
    is measured on the cube divided by it, so that the weights mean the same on every scene)."""
    terms = {"reconstruction": ((reconstruction - target) / scale).pow(2).sum(1).mean(),
             "sparsity": (abundances + SPARSITY_EPS).sqrt().sum(1).mean()}
    total = terms["reconstruction"] + config.sparsity_weight * terms["sparsity"]
    if labelled is not None and len(labelled[0]):
        indices, given = labelled
        terms["supervised"] = (abundances[indices] - given).abs().sum(1).mean()
        total = total + config.supervised_weight * terms["supervised"]
    terms["total"] = total
    return terms


class MambaUnmixing:
    """One run's model, data and optimiser on a device; ``step()`` is one full-image training step."""

    def __init__(self, inputs: UnmixingInput, seed: int, config: MambaSemiConfig, device: torch.device):
        from hsfm_train.models.mamba import DualBranchUnmixer

        self.config, self.device = config, device
        height, width = inputs.shape
        pixels = np.ascontiguousarray(inputs.pixels, dtype=np.float32)
        start = initial_endmembers(inputs, seed, config.scaled_start, config.start)
        scale = float(np.abs(pixels).max()) or 1.0
        with torch.random.fork_rng(devices=[]):  # parameters are drawn on the CPU, then moved
            torch.manual_seed(seed)
            self.model = DualBranchUnmixer(pixels.shape[1], inputs.count, config.features, config.pooled_size,
                                           config.d_state, config.d_conv, config.expand,
                                           torch.from_numpy(start), scale).to(device)
        self.target = torch.from_numpy(pixels).to(device)  # [P, B]
        self.image = self.target.t().reshape(1, -1, height, width).contiguous()
        self.scale = scale
        self.labelled = None
        if inputs.labelled is not None and len(inputs.labelled.indices):
            self.labelled = (torch.as_tensor(inputs.labelled.indices, dtype=torch.long, device=device),
                             torch.as_tensor(inputs.labelled.abundances, dtype=torch.float32, device=device))
        self.network = [p for name, p in self.model.named_parameters() if name != "endmembers"]
        self.optimizer = torch.optim.Adam([{"params": self.network, "lr": config.lr},
                                           {"params": [self.model.endmembers], "lr": config.endmember_lr}])

    def losses(self) -> dict[str, torch.Tensor]:
        abundances = self.model(self.image)
        reconstruction = self.model.reconstruct(abundances)
        if self.config.brightness:
            reconstruction = reconstruction * brightness_factors(reconstruction, self.target)[:, None]
        return unmixing_loss(abundances, reconstruction, self.target, self.labelled, self.config, self.scale)

    def step(self) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.losses()
        terms["total"].backward()
        if self.config.grad_clip > 0:
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.network, self.config.grad_clip)
        self.optimizer.step()
        self.model.project_endmembers()
        return {name: float(value.detach()) for name, value in terms.items()}

    @torch.no_grad()
    def result(self) -> tuple[np.ndarray, np.ndarray]:
        abundances = self.model(self.image)
        return (self.model.endmember_matrix().float().cpu().numpy().astype(np.float32),
                abundances.float().cpu().numpy().astype(np.float32))


def fit(inputs: UnmixingInput, seed: int, config: Any,
        callback: Callable[[int, dict[str, float], MambaUnmixing], None] | None = None
        ) -> tuple[np.ndarray, np.ndarray]:
    run = MambaUnmixing(inputs, seed, config.mamba, torch_device(config.device))
    for epoch in range(config.mamba.epochs):
        terms = run.step()
        if callback is not None:
            callback(epoch, terms, run)
    return run.result()


MAMBA_METHODS: dict[str, UnmixingMethod] = {
    "mamba-semi": UnmixingMethod(
        fit, labelled_pixels=lambda config: config.mamba.labelled,
        description="dual-branch spatial-spectral Mamba, E from K labelled pixels (mamba.labelled; 0: VCA)"),
}

__all__ = ["MAMBA_METHODS", "MambaSemiConfig", "MambaUnmixing", "fit", "initial_endmembers",
           "unmixing_loss"]
