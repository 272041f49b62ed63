"""The classical baselines: endmember extraction (VCA, N-FINDR) then fully constrained least squares, sum-to-one
NMF started from VCA, and the semi-supervised baseline ``labelled-als`` (alternating non-negative least squares
anchored by K labelled pixels; the one a semi-supervised learned method must beat). The algorithms themselves are
in ``hsfm_train.spectra``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from hsfm_train.spectra import anchored_als, fcls, nfindr, nmf_unmix, vca
from hsfm_train.unmixing.base import UnmixingInput, UnmixingMethod


@dataclass
class NMFConfig:
    iterations: int = 500
    init: str = "vca"  # "vca" or "random" (random pixels)

    def problems(self) -> list[str]:
        return [] if self.init in ("vca", "random") else [f"nmf.init must be vca or random, got {self.init!r}"]


@dataclass
class LabelledALSConfig:
    labelled: int = 10  # K pixels with ground-truth abundances, as mamba-semi's default
    iterations: int = 100  # alternations of the abundance and endmember steps (on Samson: 0.037 at 100, 0.036 at 300)
    inner_steps: int = 50  # accelerated projected-gradient steps per least-squares solve
    anchor_weight: float = 1.0  # the labelled pixels' term counts as much as all pixels together at 1

    def problems(self) -> list[str]:
        problems = [] if self.labelled >= 1 else [f"als.labelled must be >= 1, got {self.labelled}"]
        for name in ("iterations", "inner_steps"):
            if getattr(self, name) < 1:
                problems.append(f"als.{name} must be >= 1, got {getattr(self, name)}")
        if self.anchor_weight < 0:
            problems.append(f"als.anchor_weight must be >= 0, got {self.anchor_weight}")
        return problems


def _labelled_als(inputs: UnmixingInput, seed: int, config: Any) -> tuple[np.ndarray, np.ndarray]:
    settings = config.als
    return anchored_als(inputs.pixels, inputs.count, inputs.labelled.indices, inputs.labelled.abundances,
                        iterations=settings.iterations, inner_steps=settings.inner_steps,
                        anchor_weight=settings.anchor_weight, setting="als.labelled")


def _extract_then_fcls(extract: Callable[..., np.ndarray]):
    def fit(inputs: UnmixingInput, seed: int, config: Any) -> tuple[np.ndarray, np.ndarray]:
        endmembers = extract(inputs.pixels, inputs.count, seed=seed)
        return endmembers, fcls(inputs.pixels, endmembers)
    return fit


def _nmf(inputs: UnmixingInput, seed: int, config: Any) -> tuple[np.ndarray, np.ndarray]:
    start = vca(inputs.pixels, inputs.count, seed=seed) if config.nmf.init == "vca" else None
    return nmf_unmix(inputs.pixels, inputs.count, seed=seed, iterations=config.nmf.iterations,
                     initial_endmembers=start)


CLASSICAL = {
    "vca-fcls": UnmixingMethod(_extract_then_fcls(vca), description="VCA endmembers, FCLS abundances"),
    "nfindr-fcls": UnmixingMethod(_extract_then_fcls(nfindr), description="N-FINDR endmembers, FCLS abundances"),
    "nmf": UnmixingMethod(_nmf, description="sum-to-one NMF (multiplicative updates) from VCA"),
    "labelled-als": UnmixingMethod(
        _labelled_als, labelled_pixels=lambda config: config.als.labelled,
        description="alternating NNLS anchored by K labelled pixels (als.labelled), E from their least squares"),
}
