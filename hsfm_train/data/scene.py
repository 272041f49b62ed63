"""The one in-memory scene type every reader returns and every tiler consumes.

Conventions (../shared/DESIGN.md): the cube is [H, W, B] float32; wavelengths are band centres in
nanometres; abundances are [H, W, R] and sum to one over R; endmembers are [R, B]; labels are [H, W] int16
with 0 = unlabelled; ``nodata_mask`` is True where a pixel is invalid. An optical-SAR pair stores the optical
image as ``cube`` and the co-registered SAR image as ``pair`` ([H, W, B2]).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hsfm_train.errors import DataFormatError


@dataclass
class Scene:
    name: str
    cube: np.ndarray
    wavelengths_nm: np.ndarray | None = None
    sensor: str = "unknown"
    labels: np.ndarray | None = None
    abundances: np.ndarray | None = None
    endmembers: np.ndarray | None = None
    endmember_names: list[str] | None = None
    nodata_mask: np.ndarray | None = None
    pair: np.ndarray | None = None
    pair_wavelengths_nm: np.ndarray | None = None
    pair_sensor: str | None = None
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"scene {self.name!r}" + (f" ({self.source})" if self.source else "")
        self.cube = _as_float32(self.cube, "cube", where)
        if self.cube.ndim != 3:
            raise DataFormatError(f"{where}: cube must be [H, W, B], got shape {self.cube.shape}")
        height, width, bands = self.cube.shape
        if bands < 1 or height < 1 or width < 1:
            raise DataFormatError(f"{where}: cube has an empty axis, shape {self.cube.shape}")

        if self.wavelengths_nm is not None:
            self.wavelengths_nm = _as_float32(self.wavelengths_nm, "wavelengths_nm", where).reshape(-1)
            _check_wavelengths(self.wavelengths_nm, bands, "wavelengths_nm", where)

        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (height, width):
                raise DataFormatError(f"{where}: labels must be [H, W] = {(height, width)}, got {labels.shape}")
            if not np.issubdtype(labels.dtype, np.integer):
                raise DataFormatError(f"{where}: labels must be integers, got dtype {labels.dtype}")
            if labels.min() < np.iinfo(np.int16).min or labels.max() > np.iinfo(np.int16).max:
                raise DataFormatError(f"{where}: label ids do not fit int16")
            self.labels = labels.astype(np.int16, copy=False)

        if self.endmembers is not None:
            self.endmembers = _as_float32(self.endmembers, "endmembers", where)
            if self.endmembers.ndim != 2 or self.endmembers.shape[1] != bands:
                raise DataFormatError(
                    f"{where}: endmembers must be [R, B] with B = {bands}, got {self.endmembers.shape}"
                )
        if self.abundances is not None:
            self.abundances = _as_float32(self.abundances, "abundances", where)
            if self.abundances.ndim != 3 or self.abundances.shape[:2] != (height, width):
                raise DataFormatError(
                    f"{where}: abundances must be [H, W, R] with H, W = {(height, width)}, "
                    f"got {self.abundances.shape}"
                )
            if self.endmembers is not None and self.endmembers.shape[0] != self.abundances.shape[2]:
                raise DataFormatError(
                    f"{where}: {self.abundances.shape[2]} abundance maps but {self.endmembers.shape[0]} endmembers"
                )
        if self.endmember_names is not None:
            self.endmember_names = [str(n) for n in self.endmember_names]
            count = self.num_endmembers
            if count is not None and len(self.endmember_names) != count:
                raise DataFormatError(f"{where}: {len(self.endmember_names)} endmember names for {count} endmembers")

        if self.nodata_mask is not None:
            mask = np.asarray(self.nodata_mask)
            if mask.shape != (height, width):
                raise DataFormatError(f"{where}: nodata_mask must be [H, W] = {(height, width)}, got {mask.shape}")
            self.nodata_mask = mask.astype(bool, copy=False)

        if self.pair is not None:
            self.pair = _as_float32(self.pair, "pair", where)
            if self.pair.ndim != 3 or self.pair.shape[:2] != (height, width):
                raise DataFormatError(
                    f"{where}: paired image must be [H, W, B2] with H, W = {(height, width)}, got {self.pair.shape}"
                )
            if self.pair_wavelengths_nm is not None:
                self.pair_wavelengths_nm = _as_float32(self.pair_wavelengths_nm, "pair_wavelengths_nm", where)
                self.pair_wavelengths_nm = self.pair_wavelengths_nm.reshape(-1)
                _check_wavelengths(self.pair_wavelengths_nm, self.pair.shape[2], "pair_wavelengths_nm", where)
        elif self.pair_wavelengths_nm is not None or self.pair_sensor is not None:
            raise DataFormatError(f"{where}: pair metadata given without a paired image")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.cube.shape)  # type: ignore[return-value]

    @property
    def num_bands(self) -> int:
        return int(self.cube.shape[2])

    @property
    def num_endmembers(self) -> int | None:
        if self.endmembers is not None:
            return int(self.endmembers.shape[0])
        if self.abundances is not None:
            return int(self.abundances.shape[2])
        return None

    def invalid_mask(self) -> np.ndarray:
        """[H, W] bool: declared nodata plus any pixel with a non-finite value in any band."""
        invalid = ~np.isfinite(self.cube).all(axis=2)
        if self.pair is not None:
            invalid |= ~np.isfinite(self.pair).all(axis=2)
        if self.nodata_mask is not None:
            invalid |= self.nodata_mask
        return invalid


def _as_float32(array: Any, key: str, where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DataFormatError(f"{where}: {key} must be numeric, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_wavelengths(wavelengths: np.ndarray, bands: int, key: str, where: str) -> None:
    if wavelengths.shape[0] != bands:
        raise DataFormatError(f"{where}: {key} has {wavelengths.shape[0]} entries for {bands} bands")
    if not np.isfinite(wavelengths).all() or (wavelengths <= 0).any():
        raise DataFormatError(f"{where}: {key} must be positive finite nanometres")
