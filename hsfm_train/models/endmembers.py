"""Starting endmember matrices for the LSMM head: spectra from the packaged USGS library, or extracted from the
training pixels by VCA (Nascimento & Bioucas-Dias, "Vertex component analysis", IEEE TGRS 43(4), 2005)."""
from __future__ import annotations

import numpy as np

from hsfm_train.data.synthetic import load_spectral_library


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
