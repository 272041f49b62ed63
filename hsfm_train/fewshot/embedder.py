"""Pixel embeddings for few-shot classification: an adapted frozen backbone, a readout and a trainable head.

Three ways to give a pixel spatial context:

* a window readout (``centre`` / ``mean``): the backbone encodes the ``window`` x ``window`` patch around each
  pixel on its own, and the pixel is read from that patch's tokens;
* the ``tile`` readout: the backbone encodes the whole scene (or, for a source episode, a crop of it) at once, in
  patch-aligned tiles of ``tile_size`` px overlapping by ``tile_overlap`` px whose tokens are averaged where they
  overlap, as ``hsfm probe`` reads its features; each spectral group's tokens form a grid over the scene, the
  groups are averaged, and a pixel's feature is the grid sampled bilinearly at the pixel's centre
  (align_corners=False, border-clamped: the probe's upsampling evaluated at chosen pixels only). The forward is
  differentiable, so the adapter trains with the context the probe has;
* ``tile+centre``: both, side by side: the pixel's tile feature and its window's centre token, concatenated
  (the head reads 2 D features). The tile carries the scene context (what Indian Pines needs), the window the
  pixel's own fine spectrum (what pure fields such as Salinas-A's need).

:class:`EmbeddingRunner` moves inputs to the device and, for the tile readout, encodes a scene once per training
step however many pixel sets are read from it (call :meth:`EmbeddingRunner.forget` after each optimiser step).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hsfm_train.fewshot.adapters import AdapterConfig, apply_adapter
from hsfm_train.fewshot.episodes import patches_at

READOUTS = ("centre", "mean", "tile", "tile+centre")
WINDOW_READOUTS = ("centre", "mean")  # the readouts that read windows only (input-level mixup applies to them)
EMBED_BATCH = 256  # patches per forward pass when embedding without grad (window readouts)

Window = tuple[int, int, int, int]  # (first row, first column, height, width) of a crop, in pixels


@dataclass
class Domain:
    """A scene as the model sees it."""
    path: str
    name: str
    kind: str  # "target", "labelled" (a scene's labels), "semi-real" / "dominant material" (from abundances)
    cube: np.ndarray  # [H, W, B] float32, normalised for the model
    wavelengths: np.ndarray  # [B] float32 (nominal band centres with pca_bands)
    labels: np.ndarray  # [H*W] int64, 0 = unlabelled
    normalisation: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.cube.shape[0], self.cube.shape[1]

    @property
    def classes(self) -> list[int]:
        return [int(c) for c in np.unique(self.labels[self.labels > 0])]


def tile_offsets(size: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis (token units): every ``stride``, the last one flush with the border."""
    if size <= tile:
        return [0]
    offsets = list(range(0, size - tile, stride))
    return offsets + [size - tile]


class FewshotEmbedder(nn.Module):
    """An adapted backbone + a linear head [D -> embedding_dim]: pixels -> embeddings (see the module docstring).
    ``embedding_dim=None``: no head (the identity), for a run that trains nothing."""

    def __init__(self, backbone: nn.Module, embedding_dim: int | None, readout: str, window: int,
                 tile_size: int = 256, tile_overlap: int = 64):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {list(READOUTS)}, got {readout!r}")
        self.backbone = backbone
        self.readout = readout
        self.window = window
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        p = backbone.config.patch_size
        self.input_size = math.ceil(window / p) * p
        extra = self.input_size - window
        self.padding = (extra // 2, extra - extra // 2)
        centre = self.padding[0] + window // 2
        self.centre_token = (centre // p, centre // p)
        self.reads_tiles = readout in ("tile", "tile+centre")
        self.reads_windows = readout != "tile"
        feature_dim = (2 if readout == "tile+centre" else 1) * backbone.config.embed_dim
        self.output_dim = feature_dim if embedding_dim is None else embedding_dim
        self.head = nn.Identity() if embedding_dim is None else nn.Linear(feature_dim, embedding_dim)

    # --------------------------------------------------------------------------------------- window readouts

    def features(self, patches: torch.Tensor, wavelengths: torch.Tensor) -> torch.Tensor:
        """Window readouts: patches [N, B, S', S'] -> backbone features [N, D]."""
        tokens = self.backbone.encode(patches, wavelengths)[:, 1:]  # [N, G*P, D], group-major, raster patches
        grid = self.input_size // self.backbone.config.patch_size
        tokens = tokens.reshape(tokens.shape[0], -1, grid, grid, tokens.shape[-1])  # [N, G, r, c, D]
        if self.readout in ("centre", "tile+centre"):
            return tokens[:, :, self.centre_token[0], self.centre_token[1]].mean(dim=1)
        return tokens.mean(dim=(1, 2, 3))

    def forward(self, patches: torch.Tensor, wavelengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(patches, wavelengths))

    def patches(self, domain: Domain, indices: np.ndarray) -> np.ndarray:
        """[N, B, S', S'] model inputs of the pixels at flat ``indices``, float32."""
        windows = patches_at(domain.cube, indices, self.window)  # [N, S, S, B]
        a, b = self.padding
        if a or b:
            windows = np.pad(windows, ((0, 0), (a, b), (a, b), (0, 0)), mode="reflect")
        return np.ascontiguousarray(windows.transpose(0, 3, 1, 2), dtype=np.float32)

    # ------------------------------------------------------------------------------------------ tile readout

    def context_grid(self, image: torch.Tensor, wavelengths: torch.Tensor) -> torch.Tensor:
        """Tile readout: an image [1, B, H, W] -> its token grid [D, ceil(H/p), ceil(W/p)], spectral groups
        averaged, overlapping tiles averaged."""
        p = self.backbone.config.patch_size
        height, width = image.shape[-2:]
        rows, cols = math.ceil(height / p), math.ceil(width / p)
        padded = image
        if rows * p > height or cols * p > width:
            padded = F.pad(image, (0, cols * p - width, 0, rows * p - height), mode="reflect")
        tile = max(1, self.tile_size // p)
        stride = max(1, tile - self.tile_overlap // p)
        tr, tc = min(tile, rows), min(tile, cols)
        total = None
        count = torch.zeros(rows, cols, device=image.device)
        for r0 in tile_offsets(rows, tile, stride):
            for c0 in tile_offsets(cols, tile, stride):
                piece = padded[..., r0 * p:(r0 + tr) * p, c0 * p:(c0 + tc) * p]
                tokens = self.backbone.encode(piece, wavelengths)[0, 1:]  # [G*P, D], group-major, raster patches
                groups = tokens.shape[0] // (tr * tc)
                if groups * tr * tc != tokens.shape[0]:
                    raise RuntimeError(f"{tokens.shape[0]} patch tokens do not tile a {tr}x{tc} patch grid")
                grid = tokens.float().view(groups, tr, tc, -1).mean(dim=0).permute(2, 0, 1)  # [D, tr, tc]
                placed = F.pad(grid, (c0, cols - c0 - tc, r0, rows - r0 - tr))
                total = placed if total is None else total + placed
                count[r0:r0 + tr, c0:c0 + tc] += 1
        return total / count  # every patch is covered by at least one tile

    def sample_grid(self, grid: torch.Tensor, indices: np.ndarray, width: int) -> torch.Tensor:
        """The grid [D, r, c] of an image ``width`` px wide, sampled at its pixels' flat ``indices`` -> [N, D]."""
        p = self.backbone.config.patch_size
        rows, cols = grid.shape[-2:]
        r, c = np.divmod(np.asarray(indices, dtype=np.int64), width)
        x = (2.0 * (c + 0.5) / (p * cols)) - 1.0
        y = (2.0 * (r + 0.5) / (p * rows)) - 1.0
        points = torch.as_tensor(np.stack([x, y], axis=-1), dtype=grid.dtype, device=grid.device)[None, None]
        sampled = F.grid_sample(grid[None], points, mode="bilinear", padding_mode="border", align_corners=False)
        return sampled[0, :, 0].T


def build_embedder(backbone: nn.Module, adapter: AdapterConfig, embedding_dim: int | None, readout: str, window: int,
                   seed: int, tile_size: int = 256, tile_overlap: int = 64) -> FewshotEmbedder:
    """A fresh copy of the frozen ``backbone`` with ``adapter`` and a new head, both from ``seed``."""
    adapted = apply_adapter(copy.deepcopy(backbone), adapter, seed=seed).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embedder = FewshotEmbedder(adapted, embedding_dim, readout, window, tile_size, tile_overlap)
    return embedder.eval()


class EmbeddingRunner:
    """Embeds pixel sets of a domain on the device: ``embed`` with grad, ``embed_all`` without."""

    def __init__(self, embedder: FewshotEmbedder, device: torch.device):
        self.embedder = embedder
        self.device = device
        self._wavelengths: dict[int, torch.Tensor] = {}
        self._grids: dict[tuple, torch.Tensor] = {}

    @property
    def reads_tiles(self) -> bool:
        return self.embedder.reads_tiles

    def wavelengths(self, domain: Domain) -> torch.Tensor:
        key = id(domain)
        if key not in self._wavelengths:
            self._wavelengths[key] = torch.as_tensor(domain.wavelengths, device=self.device)
        return self._wavelengths[key]

    def inputs(self, domain: Domain, indices: np.ndarray) -> torch.Tensor:
        """Window readouts: the patches of ``indices`` on the device."""
        return torch.from_numpy(self.embedder.patches(domain, indices)).to(self.device)

    def forget(self) -> None:
        """Drop the encoded scenes (after an optimiser step they are stale)."""
        self._grids.clear()

    def _grid(self, domain: Domain, window: Window | None) -> torch.Tensor:
        key = (id(domain), window, torch.is_grad_enabled())
        if key not in self._grids:
            cube = domain.cube
            if window is not None:
                r0, c0, h, w = window
                cube = cube[r0:r0 + h, c0:c0 + w]
            image = torch.from_numpy(np.ascontiguousarray(cube.transpose(2, 0, 1), dtype=np.float32))[None]
            self._grids[key] = self.embedder.context_grid(image.to(self.device), self.wavelengths(domain))
        return self._grids[key]

    def embed(self, domain: Domain, indices: np.ndarray, window: Window | None = None) -> torch.Tensor:
        """[N, E] embeddings of the pixels at flat ``indices`` of ``domain`` (inside ``window`` when given, a
        crop read on its own: tile readout only)."""
        if not self.reads_tiles:
            return self.embedder(self.inputs(domain, indices), self.wavelengths(domain))
        width, local = domain.shape[1], indices
        if window is not None:
            r0, c0, _, width_here = window
            rows, cols = np.divmod(np.asarray(indices, dtype=np.int64), width)
            local, width = (rows - r0) * width_here + (cols - c0), width_here
        features = [self.embedder.sample_grid(self._grid(domain, window), local, width)]
        if self.embedder.reads_windows:  # windows are cut from the whole scene, inside a crop or not
            features.append(self.embedder.features(self.inputs(domain, indices), self.wavelengths(domain)))
        return self.embedder.head(torch.cat(features, dim=1))

    @torch.no_grad()
    def embed_all(self, domain: Domain, indices: np.ndarray) -> torch.Tensor:
        """Without grad (windows in batches; the tile grid is encoded once): [N, E] on the device."""
        if not self.embedder.reads_windows:
            return self.embed(domain, indices)
        parts = [self.embed(domain, indices[start:start + EMBED_BATCH])
                 for start in range(0, len(indices), EMBED_BATCH)]
        if not parts:
            return torch.zeros(0, self.embedder.output_dim, device=self.device)
        return torch.cat(parts)
