"""Spectral utilities every layer shares: the packaged USGS spectral library, endmember extraction and the
classical unmixing baselines.

Synthetic scenes (``data/synthetic.py``), the LSMM head's starting endmembers (``stages/pretrain.py``) and the
unmixing stage all draw on these, so they live below all of them. VCA: Nascimento & Bioucas-Dias, "Vertex
component analysis", IEEE TGRS 43(4), 2005. N-FINDR: Winter, SPIE 3753, 1999. FCLS: Heinz & Chang, IEEE TGRS
39(3), 2001 (sum-to-one by an appended, weighted row of ones, then non-negative least squares). NMF with the same
sum-to-one row: the multiplicative updates of Lee & Seung (NIPS 2000).

Pixels are [P, B] (reflectance), endmembers [R, B], abundances [P, R].
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hsfm_train.errors import ConfigError, DataFormatError

LIBRARY_ASSET = "usgs_splib_aviris224.npz"


@dataclass
class SpectralLibrary:
    """Reference spectra on a common band grid: spectra [K, B], wavelengths_nm [B], one name per spectrum."""

    spectra: np.ndarray
    wavelengths_nm: np.ndarray
    names: list[str]
    source: str = "unknown"

    def __post_init__(self) -> None:
        self.spectra = np.ascontiguousarray(self.spectra, dtype=np.float32)
        self.wavelengths_nm = np.asarray(self.wavelengths_nm, dtype=np.float32).reshape(-1)
        self.names = [str(name) for name in self.names]
        where = f"spectral library {self.source}"
        if self.spectra.ndim != 2 or self.spectra.shape[1] != self.wavelengths_nm.shape[0]:
            raise DataFormatError(
                f"{where}: spectra must be [K, B] with B = {self.wavelengths_nm.shape[0]} wavelengths, "
                f"got {self.spectra.shape}"
            )
        if len(self.names) != self.spectra.shape[0]:
            raise DataFormatError(f"{where}: {len(self.names)} names for {self.spectra.shape[0]} spectra")
        if not np.isfinite(self.spectra).all():
            raise DataFormatError(f"{where}: spectra contain non-finite values")
        if not np.isfinite(self.wavelengths_nm).all() or (self.wavelengths_nm <= 0).any():
            raise DataFormatError(f"{where}: wavelengths_nm must be positive finite nanometres")

    def __len__(self) -> int:
        return int(self.spectra.shape[0])

    def resampled(self, target_wavelengths_nm: np.ndarray) -> SpectralLibrary:
        """The library linearly interpolated onto other band centres (which must lie within its own range)."""
        target = np.asarray(target_wavelengths_nm, dtype=np.float64).reshape(-1)
        low, high = float(self.wavelengths_nm.min()), float(self.wavelengths_nm.max())
        if target.min() < low or target.max() > high:
            raise ConfigError(
                f"target_wavelengths_nm spans {target.min():.1f}-{target.max():.1f} nm, outside the range "
                f"{low:.1f}-{high:.1f} nm of {self.source}; extrapolating reflectance is not supported"
            )
        # AVIRIS' spectrometers overlap (two short runs of decreasing wavelength), and np.interp needs
        # increasing sample points, so interpolate along the sorted grid.
        order = np.argsort(self.wavelengths_nm, kind="stable")
        grid = self.wavelengths_nm[order].astype(np.float64)
        spectra = np.stack([np.interp(target, grid, spectrum[order]) for spectrum in self.spectra])
        return SpectralLibrary(spectra, target, self.names, source=f"{self.source} resampled to {target.size} bands")


def load_spectral_library(path: str | Path | None = None) -> SpectralLibrary:
    """The packaged USGS library (default) or any npz with ``spectra`` [K, B], ``wavelengths_nm`` [B], ``names`` [K]."""
    if path is None:
        resource = resources.files("hsfm_train") / "assets" / LIBRARY_ASSET
        with resource.open("rb") as handle:
            return _library_from_npz(handle, f"hsfm_train/assets/{LIBRARY_ASSET}")
    with open(path, "rb") as handle:
        return _library_from_npz(handle, str(path))


def _library_from_npz(handle: BinaryIO, where: str) -> SpectralLibrary:
    with np.load(handle, allow_pickle=False) as archive:
        missing = {"spectra", "wavelengths_nm", "names"} - set(archive.files)
        if missing:
            raise DataFormatError(f"{where}: missing key(s) {sorted(missing)}; found {archive.files}")
        return SpectralLibrary(archive["spectra"], archive["wavelengths_nm"], list(archive["names"]), source=where)



def library_endmembers(count: int, low_nm: float, high_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """``count`` mutually most different USGS spectra ([count, B], wavelengths [B]) by farthest-point selection on
    the spectral angle over the bands in [low_nm, high_nm]; deterministic."""
    library = load_spectral_library()
    order = np.argsort(library.wavelengths_nm)
    wavelengths, spectra = library.wavelengths_nm[order], library.spectra[:, order]
    inside = (wavelengths >= low_nm) & (wavelengths <= high_nm)
    unit = spectra[:, inside] / np.linalg.norm(spectra[:, inside], axis=1, keepdims=True)
    # start from the spectrum farthest from the library's mean shape, then add the one farthest from all chosen
    mean = unit.mean(axis=0)
    chosen = [int(np.argmin(unit @ mean / np.linalg.norm(mean)))]
    closest = unit @ unit[chosen[0]]
    for _ in range(count - 1):
        chosen.append(int(np.argmin(closest)))
        closest = np.maximum(closest, unit @ unit[chosen[-1]])
    return spectra[chosen], wavelengths


def vca(pixels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Endmembers [count, B] of pixels [P, B] (reflectance) by vertex component analysis."""
    rng = np.random.default_rng(seed)
    y = pixels.T.astype(np.float64)  # [B, P]
    bands, samples = y.shape
    if samples < count:
        raise ValueError(f"VCA needs at least {count} pixels, got {samples}")
    mean = y.mean(axis=1, keepdims=True)
    centred = y - mean
    u_sub = np.linalg.svd(centred @ centred.T / samples)[0][:, :count]
    signal_power = np.sum(y**2) / samples
    projected_power = np.sum((u_sub.T @ centred) ** 2) / samples + float(np.sum(mean**2))
    snr = 10 * np.log10(max(projected_power - count / bands * signal_power, 1e-12)
                        / max(signal_power - projected_power, 1e-12))
    if snr > 15 + 10 * np.log10(count):  # projective projection onto the count-dimensional signal subspace
        u = np.linalg.svd(y @ y.T / samples)[0][:, :count]
        x = u.T @ y
        scale = x.mean(axis=1) @ x
        projected = x / np.where(np.abs(scale) > 1e-12, scale, 1e-12)
    else:  # low SNR: (count - 1)-dimensional subspace plus a constant coordinate
        u = u_sub[:, : count - 1]
        x = u.T @ centred
        lift = np.sqrt(np.max(np.sum(x**2, axis=0)))
        projected = np.vstack([x, lift * np.ones((1, samples))])
    basis = np.zeros((count, count))
    basis[-1, 0] = 1.0
    indices = []
    for i in range(count):
        w = rng.random(count)
        f = w - basis @ np.linalg.pinv(basis) @ w
        f /= max(np.linalg.norm(f), 1e-12)
        index = int(np.argmax(np.abs(f @ projected)))
        basis[:, i] = projected[:, index]
        indices.append(index)
    return pixels[indices].astype(np.float32)


def fcls(pixels: np.ndarray, endmembers: np.ndarray, sum_weight: float | None = None) -> np.ndarray:
    """Fully constrained least-squares abundances [P, R] (non-negative, summing to one) of pixels [P, B] on
    endmembers [R, B]. The sum-to-one row is weighted by ``sum_weight`` (default: 10 x the largest endmember
    value, strong enough to hold the sum to one within about 1e-4 while the fit still dominates elsewhere)."""
    from scipy.optimize import nnls

    e = np.asarray(endmembers, np.float64)
    y = np.asarray(pixels, np.float64)
    delta = 10.0 * float(np.abs(e).max()) if sum_weight is None else sum_weight
    system = np.vstack([e.T, delta * np.ones((1, len(e)))])  # [B + 1, R]
    abundances = np.empty((len(y), len(e)))
    for index, pixel in enumerate(y):
        abundances[index] = nnls(system, np.append(pixel, delta))[0]
    abundances /= np.maximum(abundances.sum(axis=1, keepdims=True), 1e-12)  # exact sum to one (drift ~1e-4)
    return abundances.astype(np.float32)


def nfindr(pixels: np.ndarray, count: int, seed: int = 0, max_sweeps: int = 20) -> np.ndarray:
    """Endmembers [count, B]: the pixels spanning the simplex of largest volume in the (count - 1)-dimensional
    principal subspace, found by replacing one vertex at a time (every pixel tried for every vertex) until a whole
    sweep changes nothing. Starts from ``count`` random pixels."""
    y = np.asarray(pixels, np.float64)
    if len(y) < count:
        raise ValueError(f"N-FINDR needs at least {count} pixels, got {len(y)}")
    centred = y - y.mean(axis=0)
    basis = np.linalg.svd(centred, full_matrices=False)[2][: count - 1]  # [count - 1, B]
    reduced = np.hstack([np.ones((len(y), 1)), centred @ basis.T])  # [P, count]: homogeneous coordinates
    chosen = np.random.default_rng(seed).choice(len(y), count, replace=False)
    volume = abs(np.linalg.det(reduced[chosen]))
    for _ in range(max_sweeps):
        changed = False
        for vertex in range(count):
            trial = np.repeat(reduced[chosen][None], len(y), axis=0)  # [P, count, count]
            trial[:, vertex] = reduced
            volumes = np.abs(np.linalg.det(trial))
            best = int(np.argmax(volumes))
            if volumes[best] > volume * (1 + 1e-9):
                chosen[vertex], volume, changed = best, volumes[best], True
        if not changed:
            break
    return y[chosen].astype(np.float32)


def nmf_unmix(pixels: np.ndarray, count: int, seed: int = 0, iterations: int = 500,
              initial_endmembers: np.ndarray | None = None, sum_weight: float | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(endmembers [count, B], abundances [P, count]) by non-negative matrix factorisation with the sum-to-one row
    appended to pixels and endmembers (so the abundances sum to one up to its weight), multiplicative updates.
    Starts from ``initial_endmembers`` (e.g. VCA's) or from random pixels."""
    y = np.maximum(np.asarray(pixels, np.float64), 0.0)
    rng = np.random.default_rng(seed)
    e = (np.asarray(initial_endmembers, np.float64) if initial_endmembers is not None
         else y[rng.choice(len(y), count, replace=False)]).copy()
    e = np.maximum(e, 1e-6)
    a = np.full((len(y), count), 1.0 / count)
    delta = 10.0 * float(y.max()) if sum_weight is None else sum_weight
    tiny = 1e-12
    for _ in range(iterations):
        # abundances against the augmented system [E | delta], pixels [Y | delta]
        augmented = np.hstack([e, np.full((count, 1), delta)])  # [R, B + 1]
        target = np.hstack([y, np.full((len(y), 1), delta)])  # [P, B + 1]
        a *= (target @ augmented.T) / (a @ augmented @ augmented.T + tiny)
        e *= (a.T @ y) / (a.T @ a @ e + tiny)
    a /= np.maximum(a.sum(axis=1, keepdims=True), tiny)
    return e.astype(np.float32), a.astype(np.float32)


ILL_CONDITIONED = 1e3  # condition number of the labelled abundances above which the fit's scales are unreliable


def labelled_endmembers(pixels: np.ndarray, abundances: np.ndarray, scaled: bool = False, iterations: int = 10,
                        setting: str = "the number of labelled pixels") -> np.ndarray:
    """E >= 0 [R, B] minimising ||pixels [K, B] - abundances [K, R] E|| (NNLS, one band at a time): the endmembers
    that K pixels of known abundances imply.

    ``scaled``: each pixel has its own brightness factor as well, pixels ~ diag(c) abundances E. With w = 1 / c
    the model diag(w) pixels = abundances E is linear in (w, E): w is the least singular vector of the map
    w -> (I - A A^+) diag(w) pixels (exact on noiseless mixtures), E the NNLS fit given w, then ``iterations``
    alternating refinements of c (closed form) and E on the original residual; the mean of c is held at 1.
    Needs abundances of rank R (so at least R pixels; the factors need more than R); raises ConfigError naming
    ``setting`` otherwise."""
    from scipy.optimize import nnls

    a = np.asarray(abundances, np.float64)
    y = np.asarray(pixels, np.float64)
    count = a.shape[1]
    if len(a) < count:
        raise ConfigError(f"{len(a)} labelled pixels cannot determine {count} endmembers (the least-squares fit is "
                          f"underdetermined); raise {setting} to at least {count}")
    singular = np.linalg.svd(a, compute_uv=False)
    rank = int(np.sum(singular > 1e-6 * singular[0])) if singular[0] > 0 else 0
    if rank < count:
        raise ConfigError(f"the abundances of the {len(a)} labelled pixels span only {rank} of {count} dimensions, so "
                          f"they cannot determine the endmembers; raise {setting} or use another seed")
    condition = singular[0] / singular[-1]
    if condition > ILL_CONDITIONED:
        largest = a.max(axis=0)
        warnings.warn(f"the abundances of the {len(a)} labelled pixels are ill-conditioned (condition number "
                      f"{condition:.0f}): material {int(largest.argmin())} makes up at most {largest.min():.3g} of "
                      "any of them, so its endmember's scale (not its shape) is unreliable; raise "
                      f"{setting} or use another seed", stacklevel=2)

    def solve(weights: np.ndarray) -> np.ndarray:
        return np.stack([nnls(weights, y[:, band])[0] for band in range(y.shape[1])], axis=1)

    if not scaled or len(a) == count:  # K = R: any factors fit exactly, so they are not identifiable
        return solve(a).astype(np.float32)
    residual = np.eye(len(a)) - a @ np.linalg.pinv(a)  # [K, K]: what no abundances @ E can explain
    # ||(I - A A^+) diag(w) Y||^2 = w^T (residual * Y Y^T) w: the Gram matrix is [K, K], never [K*B, K]
    w = np.linalg.eigh(residual * (y @ y.T))[1][:, 0]
    w = w * np.sign(w.sum())
    w = np.maximum(w, 1e-3 * np.abs(w).max())  # noise can push a factor through zero
    factors = 1.0 / w
    factors /= factors.mean()
    endmembers = solve(a * factors[:, None])
    for _ in range(iterations):
        mixed = a @ endmembers
        power = np.sum(mixed * mixed, axis=1)
        factors = np.where(power > 0, np.sum(mixed * y, axis=1) / np.maximum(power, 1e-30), 1.0)
        factors = np.maximum(factors, 1e-6)
        factors /= factors.mean()
        endmembers = solve(a * factors[:, None])
    return endmembers.astype(np.float32)


def _nonnegative_quadratic(start: np.ndarray, gram: np.ndarray, linear: np.ndarray, steps: int) -> np.ndarray:
    """X >= 0 minimising 0.5 tr(X^T G X) - tr(H^T X) by accelerated projected gradient (FISTA) from ``start``:
    every column of X is one non-negative least-squares problem, all solved at once."""
    lipschitz = max(float(np.linalg.eigvalsh(gram).max()), 1e-30)
    current, momentum_point, t = start, start.copy(), 1.0
    for _ in range(steps):
        following = np.maximum(momentum_point - (gram @ momentum_point - linear) / lipschitz, 0.0)
        t_next = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
        momentum_point = following + (t - 1.0) / t_next * (following - current)
        current, t = following, t_next
    return current


def anchored_als(pixels: np.ndarray, count: int, labelled_indices: np.ndarray, labelled_abundances: np.ndarray,
                 iterations: int = 100, inner_steps: int = 50, anchor_weight: float = 1.0,
                 setting: str = "the number of labelled pixels") -> tuple[np.ndarray, np.ndarray]:
    """Semi-supervised unmixing from K labelled pixels: E [R, B] starts from their scaled least-squares fit
    (``labelled_endmembers``), then alternating non-negative least squares on every pixel,

        min  ||Y - B E||^2 + anchor_weight * (P / K) * ||Y_K - diag(c_K) A*_K E||^2    over B >= 0, E >= 0,

    where a pixel's row of B is its brightness times its abundances (so the per-pixel brightness is free) and
    the labelled pixels keep their known abundances A*_K (c_K their least-squares brightness). The anchor term,
    weighted to count as much as all pixels together at weight 1, keeps E from drifting to another
    factorisation, as plain NMF does. Returns (E float32, abundances [P, R] = B's rows normalised to sum to one)."""
    y = np.asarray(pixels, np.float64)
    known = np.asarray(labelled_abundances, np.float64)
    labelled = y[labelled_indices]
    endmembers = labelled_endmembers(labelled, known, scaled=True, setting=setting).astype(np.float64)
    if count != known.shape[1]:
        raise ConfigError(f"the labelled abundances have {known.shape[1]} endmembers, not R = {count}")
    scale = np.sqrt(anchor_weight * len(y) / len(labelled))
    mixing = np.maximum(y @ np.linalg.pinv(endmembers), 0.0)  # [P, R]
    for _ in range(iterations):
        mixing = _nonnegative_quadratic(mixing.T, endmembers @ endmembers.T, endmembers @ y.T, inner_steps).T
        mixed = known @ endmembers
        brightness = np.maximum(np.sum(mixed * labelled, 1) / np.maximum(np.sum(mixed * mixed, 1), 1e-30), 1e-6)
        weights = np.vstack([mixing, scale * brightness[:, None] * known])
        targets = np.vstack([y, scale * labelled])
        endmembers = _nonnegative_quadratic(endmembers, weights.T @ weights, weights.T @ targets, inner_steps)
    mixing = _nonnegative_quadratic(mixing.T, endmembers @ endmembers.T, endmembers @ y.T, inner_steps).T
    total = mixing.sum(axis=1, keepdims=True)
    abundances = np.where(total > 0, mixing / np.maximum(total, 1e-30), 1.0 / count)
    # B E = (B / s) (s E): only the product is determined; the scale that makes the mean brightness 1 puts E on
    # the pixels' scale, as the labelled least squares does
    endmembers = endmembers * max(float(total.mean()), 1e-30)
    return endmembers.astype(np.float32), abundances.astype(np.float32)
