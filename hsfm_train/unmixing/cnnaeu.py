"""CNNAEU (Palsson, Sveinsson & Ulfarsson, IEEE TGRS 2021) and its contrastive variant.

``cnnaeu``: the autoencoder of ``models/unmixing_ae.py`` trained with the SAD loss on random patches of the image
(RMSprop); the abundances are the encoder's output on the whole image in eval mode, the endmembers the decoder's
weights averaged over its kernel.

``cnnaeu-contrastive``: the same network (``cnnaeu`` section for its architecture) trained on two augmented views
of each patch with (1 - lambda) contrastive + lambda SAD (Adam): the SAD term reconstructs each view from itself,
the contrastive term compares the views' projections (``ProjectionHead``: the abundance maps averaged over the
patch, then R -> 128 -> 64). ``contrastive.loss``: ``ntxent``, or ``kernel``, whose soft positives are weighted by
an RBF kernel between the samples' abundance vectors; blind: the vectors are the model's own detached estimates
for the same samples, in the batch's order (the mean of the two views' patch-averaged abundances).

Augmentations (``contrastive.augmentations``, applied in the listed order, parameters drawn per sample and per
view): ``blur`` Gaussian, sigma ~ U(blur_sigma); ``crop`` a random square crop of side fraction ~ U(crop_scale)
resized back (bilinear); ``flip`` each axis flipped with probability 1/2; ``jitter`` brightness x U(1 +- b) and
additive Gaussian noise of std ``jitter_noise`` x the sample's RMS. Blur, crop and brightness give images that
still follow the linear mixing model (convex combinations of pixels, a scale).

Both methods are deterministic given the seed on the CPU: the network's initialisation and dropout come from the
global generator seeded inside a forked RNG state, the patches, batch order and augmentation parameters from a
CPU generator of their own. The endmembers are rescaled by one least-squares factor against the pixels (the SAD
loss leaves their scale free), which changes neither the angles nor the abundances.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.nn import functional as F

from hsfm_train.models.unmixing_ae import CNNAEU, ProjectionHead
from hsfm_train.objectives.contrastive import kernel_contrastive, nt_xent, sad_loss
from hsfm_train.unmixing.base import UnmixingInput, UnmixingMethod, seeded_generator
from hsfm_train.engine.run_records import torch_device

AUGMENTATIONS = ("blur", "crop", "flip", "jitter")
CONTRASTIVE_LOSSES = ("ntxent", "kernel")


def _positive(section: str, config: Any, names: tuple[str, ...]) -> list[str]:
    return [f"{section}.{name} must be > 0, got {getattr(config, name)}" for name in names
            if not getattr(config, name) > 0]


def _interval(section: str, name: str, value: Any, high: float = math.inf) -> list[str]:
    if len(value) != 2 or not 0 < value[0] <= value[1] <= high:
        bound = "" if high == math.inf else f" <= {high:g}"
        return [f"{section}.{name} must be [low, high] with 0 < low <= high{bound}, got {list(value)}"]
    return []


@dataclass
class CNNAEUConfig:
    epochs: int = 320
    patches: int = 250  # random patches drawn once per run
    patch_size: int = 40  # the whole image when it is smaller
    batch_size: int = 15
    lr: float = 0.003  # RMSprop
    filters: int = 48
    leaky_slope: float = 0.02
    dropout: float = 0.2  # spatial (channel) dropout
    decoder_kernel: int = 13
    softmax_scale: float = 3.0
    init_std: float = 0.3

    def problems(self) -> list[str]:
        problems = _positive("cnnaeu", self, ("epochs", "patches", "patch_size", "batch_size", "lr", "filters",
                                              "decoder_kernel", "softmax_scale", "init_std"))
        if not 0 <= self.dropout < 1:
            problems.append(f"cnnaeu.dropout must be in [0, 1), got {self.dropout}")
        if self.leaky_slope < 0:
            problems.append(f"cnnaeu.leaky_slope must be >= 0, got {self.leaky_slope}")
        return problems


@dataclass
class ContrastiveConfig:
    """The contrastive variant's training; its network is the ``cnnaeu`` section's."""
    epochs: int = 100
    patches: int = 250  # random patches drawn once per run
    patch_size: int = 32
    batch_size: int = 8
    lr: float = 0.003  # Adam
    weight_decay: float = 1e-6
    temperature: float = 0.1
    sad_weight: float = 0.5  # lambda: loss = (1 - lambda) contrastive + lambda SAD
    projection: list[int] = field(default_factory=lambda: [128, 64])
    loss: str = "ntxent"  # "ntxent" or "kernel" (blind kernel-weighted)
    kernel_bandwidth: float = 1.0  # sigma of the RBF kernel between abundance vectors (loss=kernel)
    augmentations: list[str] = field(default_factory=lambda: ["crop", "blur"])
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.0])  # pixels
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 0.95])  # crop side / patch side
    jitter_brightness: float = 0.1
    jitter_noise: float = 0.01  # x the sample's RMS

    def problems(self) -> list[str]:
        problems = _positive("contrastive", self, ("epochs", "patches", "patch_size", "lr", "temperature",
                                                   "kernel_bandwidth"))
        if self.batch_size < 2:
            problems.append(f"contrastive.batch_size must be >= 2 (negatives come from the batch), got "
                            f"{self.batch_size}")
        if self.weight_decay < 0:
            problems.append(f"contrastive.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.sad_weight <= 1:
            problems.append(f"contrastive.sad_weight must be in [0, 1], got {self.sad_weight}")
        if not self.projection or any(width < 1 for width in self.projection):
            problems.append(f"contrastive.projection must be one or more widths >= 1, got {list(self.projection)}")
        if self.loss not in CONTRASTIVE_LOSSES:
            problems.append(f"contrastive.loss must be one of {', '.join(CONTRASTIVE_LOSSES)}, got {self.loss!r}")
        unknown = [name for name in self.augmentations if name not in AUGMENTATIONS]
        if not self.augmentations or unknown:
            problems.append(f"contrastive.augmentations must be one or more of {', '.join(AUGMENTATIONS)}, got "
                            f"{list(self.augmentations)}")
        problems += _interval("contrastive", "blur_sigma", self.blur_sigma)
        problems += _interval("contrastive", "crop_scale", self.crop_scale, high=1.0)
        if not 0 <= self.jitter_brightness < 1 or self.jitter_noise < 0:
            problems.append(f"contrastive.jitter_brightness must be in [0, 1) and jitter_noise >= 0, got "
                            f"{self.jitter_brightness} and {self.jitter_noise}")
        return problems


# --- augmentations: images [N, B, H, W]; random parameters from a CPU generator, one draw per sample ---

def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of each image with its own sigma [N] (pixels), kernel 2 radius + 1, reflected
    borders (replicated where the image is too small to reflect)."""
    count, bands, height, width = images.shape
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernels = torch.exp(-offsets[None] ** 2 / (2 * sigmas[:, None].double() ** 2))
    kernels = (kernels / kernels.sum(1, keepdim=True)).to(images)  # [N, K]
    kernels = kernels.repeat_interleave(bands, dim=0)  # [N B, K]: one per channel, grouped conv
    mode = "reflect" if radius < min(height, width) else "replicate"
    flat = images.reshape(1, count * bands, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode=mode), kernels[:, None, None, :], groups=count * bands)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode=mode), kernels[:, None, :, None], groups=count * bands)
    return flat.reshape(count, bands, height, width)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's crop ``boxes`` [N, 4] = (top, left, height, width) resized back to the image's size."""
    size = images.shape[-2:]
    crops = [F.interpolate(image[None, :, top:top + h, left:left + w], size=size, mode="bilinear",
                           align_corners=False) for image, (top, left, h, w) in zip(images, boxes.tolist())]
    return torch.cat(crops)


def flip(images: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """Flip image i left-right where ``horizontal[i]`` and upside down where ``vertical[i]`` (bool [N])."""
    horizontal = horizontal.to(images.device)[:, None, None, None]
    vertical = vertical.to(images.device)[:, None, None, None]
    images = torch.where(horizontal, images.flip(-1), images)
    return torch.where(vertical, images.flip(-2), images)


def jitter(images: torch.Tensor, gains: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """images x gains [N] + noise [N, B, H, W]."""
    return images * gains.to(images)[:, None, None, None] + noise.to(images)


def augment(images: torch.Tensor, names: list[str], config: ContrastiveConfig,
            generator: torch.Generator) -> torch.Tensor:
    """One random view of each image: the named augmentations in order, each with parameters of its own."""
    count, _, height, width = images.shape
    for name in names:
        if name == "blur":
            low, high = config.blur_sigma
            images = gaussian_blur(images, _uniform(count, low, high, generator), max(1, math.ceil(3 * high)))
        elif name == "crop":
            fractions = _uniform(count, *config.crop_scale, generator)
            sides = [(max(1, round(f * height)), max(1, round(f * width))) for f in fractions.tolist()]
            boxes = torch.tensor([(int(torch.randint(height - h + 1, (1,), generator=generator)),
                                   int(torch.randint(width - w + 1, (1,), generator=generator)), h, w)
                                  for h, w in sides])
            images = crop_resize(images, boxes)
        elif name == "flip":
            images = flip(images, torch.rand(count, generator=generator) < 0.5,
                          torch.rand(count, generator=generator) < 0.5)
        elif name == "jitter":
            gains = _uniform(count, 1 - config.jitter_brightness, 1 + config.jitter_brightness, generator)
            rms = images.detach().square().mean(dim=(1, 2, 3)).sqrt().cpu()
            noise = torch.randn(images.shape, generator=generator) * (config.jitter_noise * rms)[:, None, None, None]
            images = jitter(images, gains, noise)
        else:
            raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")
    return images


# --- training ---

@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global torch RNG (initialisation, dropout) seeded inside a forked state, restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def image_tensor(inputs: UnmixingInput, device: torch.device) -> torch.Tensor:
    """[1, B, H, W], divided by its maximum: the losses are scale-free, the first layer's initialisation is not."""
    cube = torch.from_numpy(np.ascontiguousarray(inputs.cube, dtype=np.float32)).permute(2, 0, 1)[None]
    peak = float(cube.abs().max())
    return (cube / (peak if peak > 0 else 1.0)).to(device)


class PatchSampler:
    """``count`` random square patches of the image (corners drawn once), served in a new random order each
    epoch; the whole image is the patch when it is smaller than ``size``."""

    def __init__(self, image: torch.Tensor, count: int, size: int, generator: torch.Generator):
        self.image, self.generator = image, generator
        height, width = image.shape[-2:]
        self.size = (min(size, height), min(size, width))
        self.corners = torch.stack([torch.randint(height - self.size[0] + 1, (count,), generator=generator),
                                    torch.randint(width - self.size[1] + 1, (count,), generator=generator)], 1)

    def epoch(self, batch_size: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(self.corners), generator=self.generator)
        (h, w) = self.size
        for start in range(0, len(order), batch_size):
            corners = self.corners[order[start:start + batch_size]].tolist()
            yield torch.cat([self.image[:, :, top:top + h, left:left + w] for top, left in corners])


def build_network(bands: int, count: int, config: CNNAEUConfig) -> CNNAEU:
    return CNNAEU(bands, count, filters=config.filters, leaky_slope=config.leaky_slope, dropout=config.dropout,
                  decoder_kernel=config.decoder_kernel, softmax_scale=config.softmax_scale,
                  init_std=config.init_std)


def cnnaeu_step(model: CNNAEU, patches: torch.Tensor, optimiser: torch.optim.Optimizer) -> float:
    _, reconstruction = model(patches)
    loss = sad_loss(reconstruction, patches)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    model.constrain()
    return float(loss.detach())


def contrastive_terms(model: CNNAEU, head: ProjectionHead, view1: torch.Tensor, view2: torch.Tensor,
                      config: ContrastiveConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(contrastive loss, SAD loss, the kernel loss's labels or None) for two views of one batch. The labels are
    the model's own detached estimates of each sample (row i: sample i of the views), never ground truth."""
    abundances1, reconstruction1 = model(view1)
    abundances2, reconstruction2 = model(view2)
    sad = 0.5 * (sad_loss(reconstruction1, view1) + sad_loss(reconstruction2, view2))
    z1, z2 = head(abundances1), head(abundances2)
    if config.loss == "kernel":
        labels = (0.5 * (abundances1.mean(dim=(2, 3)) + abundances2.mean(dim=(2, 3)))).detach()
        return kernel_contrastive(z1, z2, labels, config.temperature, config.kernel_bandwidth), sad, labels
    return nt_xent(z1, z2, config.temperature), sad, None


def finish(model: CNNAEU, image: torch.Tensor, inputs: UnmixingInput) -> tuple[np.ndarray, np.ndarray]:
    """Endmembers [R, B] (least-squares scaled to the pixels) and the whole image's abundances [P, R]."""
    model.eval()
    with torch.no_grad():
        abundances = model.abundances(image)[0].flatten(1).t().double().cpu().numpy()  # [P, R]
        endmembers = model.endmembers().double().cpu().numpy()
    reconstruction = abundances @ endmembers
    energy = float(np.sum(reconstruction ** 2))
    scale = float(np.sum(reconstruction * inputs.pixels)) / energy if energy > 0 else 1.0
    return (endmembers * scale).astype(np.float32), abundances.astype(np.float32)


def fit_cnnaeu(inputs: UnmixingInput, seed: int, config: Any) -> tuple[np.ndarray, np.ndarray]:
    section: CNNAEUConfig = config.cnnaeu
    device = torch_device(config.device)
    image = image_tensor(inputs, device)
    with seeded(seed, device):
        model = build_network(image.shape[1], inputs.count, section).to(device)
        sampler = PatchSampler(image, section.patches, section.patch_size, seeded_generator(seed, torch.device("cpu")))
        # Keras' RMSprop defaults (rho 0.9, epsilon 1e-7), which the published training used
        optimiser = torch.optim.RMSprop(model.parameters(), lr=section.lr, alpha=0.9, eps=1e-7)
        model.train()
        for _ in range(section.epochs):
            for patches in sampler.epoch(section.batch_size):
                cnnaeu_step(model, patches, optimiser)
        return finish(model, image, inputs)


def fit_contrastive(inputs: UnmixingInput, seed: int, config: Any) -> tuple[np.ndarray, np.ndarray]:
    section: ContrastiveConfig = config.contrastive
    device = torch_device(config.device)
    image = image_tensor(inputs, device)
    with seeded(seed, device):
        model = build_network(image.shape[1], inputs.count, config.cnnaeu).to(device)
        head = ProjectionHead(inputs.count, section.projection).to(device)
        generator = seeded_generator(seed, torch.device("cpu"))
        sampler = PatchSampler(image, section.patches, section.patch_size, generator)
        optimiser = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=section.lr,
                                     weight_decay=section.weight_decay)
        model.train()
        head.train()
        for _ in range(section.epochs):
            for patches in sampler.epoch(section.batch_size):
                view1 = augment(patches, section.augmentations, section, generator)
                view2 = augment(patches, section.augmentations, section, generator)
                contrastive, sad, _ = contrastive_terms(model, head, view1, view2, section)
                loss = (1 - section.sad_weight) * contrastive + section.sad_weight * sad
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                model.constrain()
        return finish(model, image, inputs)


CNNAEU_METHODS: dict[str, UnmixingMethod] = {
    "cnnaeu": UnmixingMethod(fit_cnnaeu, description="CNNAEU convolutional autoencoder (SAD loss, RMSprop)"),
    "cnnaeu-contrastive": UnmixingMethod(
        fit_contrastive, description="CNNAEU + contrastive views (NT-Xent or blind kernel-weighted) + SAD"),
}
