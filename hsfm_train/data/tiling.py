"""Cut a Scene into fixed-size tiles, channel-first, with nodata handling.

Tile origins step by ``stride`` and a last row/column of tiles sits flush with the border, so every pixel
of a scene at least ``tile_size`` wide is covered. Pixels that are declared nodata, equal ``nodata_value`` in
every band, or non-finite in any band are invalid: a tile with more than ``max_nodata_fraction`` invalid
pixels is dropped (and counted); a kept tile has its invalid pixels set to 0 and carries a ``valid`` mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from hsfm_train.data.scene import Scene
from hsfm_train.errors import ConfigError


@dataclass(frozen=True)
class TilingConfig:
    tile_size: int = 32
    stride: int | None = None  # None: equal to tile_size (no overlap)
    max_nodata_fraction: float = 0.5
    nodata_value: float | None = None

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ConfigError(f"tile_size must be >= 1, got {self.tile_size}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"stride must be >= 1, got {self.stride}")
        if not 0.0 <= self.max_nodata_fraction < 1.0:
            raise ConfigError(f"max_nodata_fraction must be in [0, 1), got {self.max_nodata_fraction}")

    @property
    def step(self) -> int:
        return self.stride or self.tile_size


@dataclass
class Tile:
    scene: str
    row: int
    col: int
    hsi: np.ndarray  # [B, h, w] float32
    valid: np.ndarray | None  # [h, w] bool, None when every pixel is valid
    labels: np.ndarray | None = None  # [h, w] int16
    abundances: np.ndarray | None = None  # [R, h, w] float32
    pair: np.ndarray | None = None  # [B2, h, w] float32

    @property
    def key(self) -> str:
        return f"{self.scene}__r{self.row:05d}_c{self.col:05d}"


def tile_origins(length: int, tile_size: int, step: int) -> list[int]:
    """Start offsets along one axis; the last tile is flush with the border."""
    if length < tile_size:
        return []
    origins = list(range(0, length - tile_size + 1, step))
    if origins[-1] != length - tile_size:
        origins.append(length - tile_size)
    return origins


def invalid_pixels(scene: Scene, nodata_value: float | None) -> np.ndarray:
    invalid = scene.invalid_mask()
    if nodata_value is not None:
        invalid |= (scene.cube == np.float32(nodata_value)).all(axis=2)
    return invalid


def iter_tiles(scene: Scene, config: TilingConfig, counters: dict[str, int] | None = None) -> Iterator[Tile]:
    """Yield the kept tiles of ``scene`` in raster order; ``counters`` collects drop reasons."""
    counters = counters if counters is not None else {}
    size = config.tile_size
    rows = tile_origins(scene.cube.shape[0], size, config.step)
    cols = tile_origins(scene.cube.shape[1], size, config.step)
    if not rows or not cols:
        counters["scene_smaller_than_tile"] = counters.get("scene_smaller_than_tile", 0) + 1
        return
    invalid = invalid_pixels(scene, config.nodata_value)
    for row in rows:
        for col in cols:
            window = (slice(row, row + size), slice(col, col + size))
            tile_invalid = invalid[window]
            invalid_fraction = float(tile_invalid.mean())
            if invalid_fraction > config.max_nodata_fraction:
                counters["tile_mostly_nodata"] = counters.get("tile_mostly_nodata", 0) + 1
                continue
            hsi = _channel_first(scene.cube[window])
            pair = _channel_first(scene.pair[window]) if scene.pair is not None else None
            valid = None
            if invalid_fraction > 0:
                valid = ~tile_invalid
                hsi[:, tile_invalid] = 0.0
                if pair is not None:
                    pair[:, tile_invalid] = 0.0
            yield Tile(
                scene=scene.name,
                row=row,
                col=col,
                hsi=hsi,
                valid=valid,
                labels=scene.labels[window].copy() if scene.labels is not None else None,
                abundances=_channel_first(scene.abundances[window]) if scene.abundances is not None else None,
                pair=pair,
            )


def _channel_first(window: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(window, 2, 0), dtype=np.float32)
