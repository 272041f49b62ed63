"""The classical baselines: endmember extraction (VCA, N-FINDR) then fully constrained least squares, and
sum-to-one NMF started from VCA (the algorithms themselves are in ``hsfm_train.spectra``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from hsfm_train.spectra import fcls, nfindr, nmf_unmix, vca
from hsfm_train.unmixing.base import UnmixingInput, UnmixingMethod


@dataclass
class NMFConfig:
    iterations: int = 500
    init: str = "vca"  # "vca" or "random" (random pixels)

    def problems(self) -> list[str]:
        return [] if self.init in ("vca", "random") else [f"nmf.init must be vca or random, got {self.init!r}"]


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
}
