"""Reconstruction metrics for masked hyperspectral autoencoding.

Conventions shared by every function here:

* images are ``[N, B, H, W]`` (B spectral bands, any reflectance scale), masks are ``[N, H, W]`` bool with
  True = masked pixel (one the model had to reconstruct);
* everything is computed in float64 whatever the input dtype, so bf16/fp16 predictions are scored exactly;
* every metric is first reduced to one value per image, then averaged over images. That makes the batch
  average of :class:`ReconstructionMeter` identical to a single pass over all images, whatever the batching;
* the data range R of a band is ``max - min`` of the *target* over all pixels of that image and band (floored
  at 1e-6), so a dark SWIR band is scored against its own contrast rather than the brightest band's.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

_RANGE_FLOOR = 1e-6
# PSNR is capped at 120 dB (MSE floored at 1e-12 R^2) so a perfect band gives a large finite value, not inf.
_MSE_FLOOR = 1e-12
_K1, _K2 = 0.01, 0.03


def _check_pair(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred and target must both be [N, B, H, W]; got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    if mask is not None and mask.shape != (pred.shape[0],) + tuple(pred.shape[2:]):
        raise ValueError(f"mask must be [N, H, W] = {(pred.shape[0],) + tuple(pred.shape[2:])}; "
                         f"got {tuple(mask.shape)}")


def _data_range(target: torch.Tensor, data_range: float | None) -> torch.Tensor:
    """Per (image, band) dynamic range ``[N, B]`` in float64."""
    if data_range is not None:
        return torch.full(target.shape[:2], float(data_range), dtype=torch.float64, device=target.device)
    flat = target.to(torch.float64).flatten(2)
    return (flat.amax(-1) - flat.amin(-1)).clamp_min(_RANGE_FLOOR)


def spectral_angle(pred: torch.Tensor, target: torch.Tensor, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """Angle in radians between ``pred`` and ``target`` spectra along ``dim`` (float64, ``dim`` reduced).

    Scale invariant: a spectrum and any positive multiple of it have angle 0. A zero spectrum has angle
    pi/2 to everything (its norm is floored at ``eps``).
    """
    p, t = pred.to(torch.float64), target.to(torch.float64)
    cos = (p * t).sum(dim) / (p.norm(dim=dim).clamp_min(eps) * t.norm(dim=dim).clamp_min(eps))
    return torch.acos(cos.clamp(-1.0, 1.0))


def _psnr_per_image(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                    data_range: float | None = None) -> torch.Tensor:
    """Band-mean PSNR of each image's masked pixels, ``[N]``; NaN for images with no masked pixel."""
    _check_pair(pred, target, mask)
    weight = mask.to(torch.float64).unsqueeze(1)  # [N, 1, H, W]
    count = weight.sum((2, 3))  # [N, 1]
    sq_err = (pred.to(torch.float64) - target.to(torch.float64)).square()
    mse = (sq_err * weight).sum((2, 3)) / count.clamp_min(1)  # [N, B]
    r2 = _data_range(target, data_range).square()
    psnr = 10 * torch.log10(r2 / torch.maximum(mse, _MSE_FLOOR * r2))
    per_image = psnr.mean(1)
    return torch.where(count[:, 0] > 0, per_image, torch.full_like(per_image, math.nan))


def _nanmean(values: torch.Tensor) -> float:
    valid = ~values.isnan()
    return float(values[valid].mean()) if bool(valid.any()) else math.nan


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                data_range: float | None = None) -> float:
    """Mean PSNR (MPSNR) in dB over masked pixels.

    For every (image, band): ``10 log10(R^2 / MSE)`` with MSE over that image's masked pixels of that band
    and R the target's max - min over *all* pixels of that image and band (floored at 1e-6), or
    ``data_range`` when given. The result is the mean over all (image, band) pairs; images without any
    masked pixel are skipped (NaN when no image has one). Capped at 120 dB per band.
    """
    return _nanmean(_psnr_per_image(pred, target, mask, data_range))


def _gaussian_1d(window: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(window, dtype=torch.float64, device=device) - (window - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma ** 2))
    return g / g.sum()


def _valid_filter_matrix(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """[size - k + 1, size] matrix whose rows are the kernel at every fully-inside position."""
    rows = size - kernel.numel() + 1
    matrix = torch.zeros(rows, size, dtype=kernel.dtype, device=kernel.device)
    for offset in range(rows):
        matrix[offset, offset:offset + kernel.numel()] = kernel
    return matrix


def _ssim_per_image(pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None,
                    window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Band-mean SSIM of each image, ``[N]``."""
    _check_pair(pred, target)
    n, b, h, w = pred.shape
    window = min(window, min(h, w))
    window -= 1 - window % 2  # largest odd size that fits
    x, y = pred.to(torch.float64), target.to(torch.float64)
    # The five local statistics of all bands go through one separable ("valid") Gaussian filter, written as two
    # banded matrices: float64 matmuls are fast on CPU, where float64 grouped convolutions are not.
    stack = torch.cat([x, y, x * x, y * y, x * y], 1)  # [N, 5B, H, W]
    g = _gaussian_1d(window, sigma, x.device)
    stack = _valid_filter_matrix(g, h) @ stack @ _valid_filter_matrix(g, w).T
    mx, my, mxx, myy, mxy = stack.split(b, 1)
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    r = _data_range(target, data_range).view(n, b, 1, 1)
    c1, c2 = (_K1 * r) ** 2, (_K2 * r) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None,
         window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) averaged over images and bands.

    Gaussian window (``window`` wide, ``sigma``), K1 = 0.01, K2 = 0.03, population (not sample) covariances
    and only windows fully inside the image, i.e. the mean SSIM of scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` per band, with
    R per (image, band) as in the module docstring unless ``data_range`` is given. Images smaller than the
    window use the largest odd window that fits.
    """
    return float(_ssim_per_image(pred, target, data_range, window, sigma).mean())


def _sam_per_image(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean spectral angle in degrees over each image's masked pixels, ``[N]``; NaN when none is masked."""
    _check_pair(pred, target, mask)
    weight = mask.to(torch.float64)
    angle = torch.rad2deg(spectral_angle(pred, target, dim=1))  # [N, H, W]
    count = weight.sum((1, 2))
    per_image = (angle * weight).sum((1, 2)) / count.clamp_min(1)
    return torch.where(count > 0, per_image, torch.full_like(per_image, math.nan))


def masked_spectral_angle_deg(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Spectral angle mapper (SAM) in degrees: mean over each image's masked pixels, then over images.

    Images without a masked pixel are skipped (NaN when no image has one).
    """
    return _nanmean(_sam_per_image(pred, target, mask))


def _reconstruction_per_image(pred: torch.Tensor, target: torch.Tensor,
                              mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image psnr / ssim / sam_deg ``[N]`` of the images with at least one masked pixel."""
    _check_pair(pred, target, mask)
    keep = mask.flatten(1).any(1)
    pred, target, mask = pred[keep], target[keep], mask[keep]
    pasted = torch.where(mask.unsqueeze(1), pred.to(target.dtype), target)
    return {"psnr": _psnr_per_image(pred, target, mask),
            "ssim": _ssim_per_image(pasted, target),
            "sam_deg": _sam_per_image(pred, target, mask)}


def reconstruction_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``{"psnr", "ssim", "sam_deg"}`` of a masked reconstruction.

    PSNR and SAM look only at masked pixels, so copying the visible input cannot inflate them. SSIM needs
    whole images, so it compares the *pasted* image (target where visible, prediction where masked) with the
    target. All three are averaged over the images that have at least one masked pixel (NaN if none has).
    """
    return ReconstructionMeter().update(pred, target, mask).compute()


class ReconstructionMeter:
    """Accumulates :func:`reconstruction_metrics` over batches, weighting every image equally."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums = {"psnr": 0.0, "ssim": 0.0, "sam_deg": 0.0}
        self._count = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> ReconstructionMeter:
        per_image = _reconstruction_per_image(pred.detach(), target.detach(), mask)
        for key, values in per_image.items():
            self._sums[key] += float(values.sum())
        self._count += len(per_image["psnr"])
        return self

    @property
    def count(self) -> int:
        """Number of images scored so far (those with at least one masked pixel)."""
        return self._count

    def compute(self) -> dict[str, float]:
        if self._count == 0:
            return {key: math.nan for key in self._sums}
        return {key: total / self._count for key, total in self._sums.items()}


# ----------------------------------------------------------------------------------------- classification


def classification_scores(y_true, y_pred, classes) -> dict:
    """``{"oa", "aa", "kappa", "confusion"}`` of predicted class labels.

    OA = correct / all (a fraction in [0, 1]); AA = the mean per-class recall over the classes of ``classes``
    present in ``y_true`` (a class without test pixels has no recall and is left out); kappa = Cohen's kappa
    (scikit-learn's ``cohen_kappa_score``, unweighted); confusion = ``[len(classes), len(classes)]`` counts,
    rows = true class, columns = predicted class, in the order of ``classes`` (scikit-learn's
    ``confusion_matrix``). A prediction outside ``classes`` counts as an error in OA and AA (kappa and the
    confusion matrix, scikit-learn's, leave such pixels out).
    """
    from sklearn.metrics import cohen_kappa_score, confusion_matrix

    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"y_true and y_pred must be non-empty and of one length; got {y_true.size} and "
                         f"{y_pred.size}")
    classes = [c.item() if hasattr(c, "item") else c for c in classes]
    confusion = confusion_matrix(y_true, y_pred, labels=classes)
    # recall from the labels themselves, not the confusion rows: a prediction outside ``classes`` is not a row
    recall = np.array([(y_pred[y_true == c] == c).mean() for c in classes if (y_true == c).any()])
    oa = float((y_true == y_pred).mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = float(cohen_kappa_score(y_true, y_pred, labels=classes))
    return {"oa": oa, "aa": float(recall.mean()) if recall.size else float("nan"),
            "kappa": kappa, "confusion": confusion}


def effective_rank(features: Any, max_rows: int | None = 4096, centre: bool = True) -> float:
    """Effective rank of a feature matrix [N, F] (Roy & Vetterli 2007): exp of the entropy of its L1-normalised
    singular values, after centring unless ``centre`` is false (RankMe, Garrido et al. 2023, does not centre);
    F for perfectly spread features, 1 for features on one line. At most ``max_rows`` evenly spaced rows are used
    (None: all), enough for a stable value and cheap on large scenes."""
    x = np.asarray(features, dtype=np.float64)
    if max_rows is not None:
        x = x[:: max(1, len(x) // max_rows)]
    singular = np.linalg.svd(x - x.mean(axis=0) if centre else x, compute_uv=False)
    if singular.sum() <= 0:
        return 0.0
    p = singular / singular.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


# ------------------------------------------------------------------------------------------------------- unmixing
# Endmembers are [R, B] (one spectrum per row), abundances [P, R] (one row per pixel), pixels [P, B]. SAD is in
# radians; estimated endmembers are matched to the ground truth by the Hungarian algorithm on the SAD matrix
# (never greedily, never by position), and the abundances are permuted with them.


def spectral_angle_matrix(estimated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """[R_est, R_true] spectral angles (radians) between every estimated and every true endmember; a zero spectrum
    is at pi/2 from everything."""
    a, b = np.asarray(estimated, np.float64), np.asarray(truth, np.float64)
    norms = np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None, :]
    cosine = np.divide(a @ b.T, norms, out=np.zeros((len(a), len(b))), where=norms > 0)
    return np.arccos(np.clip(cosine, -1.0, 1.0))


def match_endmembers(estimated: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``order`` such that ``estimated[order[i]]`` is matched to ``truth[i]``: the assignment of least total SAD."""
    from scipy.optimize import linear_sum_assignment

    if len(estimated) != len(truth):
        raise ValueError(f"{len(estimated)} estimated endmembers for {len(truth)} true ones")
    rows, columns = linear_sum_assignment(spectral_angle_matrix(estimated, truth))
    order = np.empty(len(truth), dtype=np.int64)
    order[columns] = rows
    return order


def unmixing_scores(endmembers: np.ndarray, abundances: np.ndarray | None, pixels: np.ndarray,
                    true_endmembers: np.ndarray | None = None, true_abundances: np.ndarray | None = None
                    ) -> dict[str, Any]:
    """One run's scores: ``sad_per_endmember`` and ``sad_mean`` (radians, after Hungarian matching),
    ``abundance_rmse`` (over every pixel and endmember, matched order), ``reconstruction_rmse`` of
    ``abundances @ endmembers`` against ``pixels`` and ``reconstruction_rmse_scaled``, the same after each pixel's
    least-squares brightness factor c_p >= 0 (the fit of the scaled mixing model y_p ~ c_p a_p E, which methods
    with a per-pixel brightness use); the ground-truth scores where the truth is given."""
    endmembers = np.asarray(endmembers, np.float64)
    scores: dict[str, Any] = {}
    if abundances is not None:
        abundances = np.asarray(abundances, np.float64)
        reconstruction = abundances @ endmembers
        observed = np.asarray(pixels, np.float64)
        scores["reconstruction_rmse"] = float(np.sqrt(np.mean((reconstruction - observed) ** 2)))
        power = np.sum(reconstruction * reconstruction, axis=1, keepdims=True)
        brightness = np.maximum(np.sum(reconstruction * observed, axis=1, keepdims=True), 0.0) / np.maximum(power, 1e-30)
        scores["reconstruction_rmse_scaled"] = float(np.sqrt(np.mean((brightness * reconstruction - observed) ** 2)))
    if true_endmembers is not None:
        order = match_endmembers(endmembers, true_endmembers)
        angles = spectral_angle_matrix(endmembers[order], true_endmembers).diagonal()
        scores.update(order=order.tolist(), sad_per_endmember=angles.tolist(), sad_mean=float(angles.mean()))
        if abundances is not None and true_abundances is not None:
            error = abundances[:, order] - np.asarray(true_abundances, np.float64)
            scores["abundance_rmse"] = float(np.sqrt(np.mean(error ** 2)))
    return scores


def mean_std(values: Any, ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of ``values``: ``ddof=0`` the population std, ``ddof=1`` the sample std (0.0
    for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=ddof)) if array.size > ddof else 0.0


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation (population, as the unmixing papers report) over runs of every scalar score,
    and the per-endmember SAD means: ``<score>_mean``, ``<score>_std``, ``sad_per_endmember``."""
    summary: dict[str, Any] = {"runs": len(runs)}
    for key in ("sad_mean", "abundance_rmse", "reconstruction_rmse", "reconstruction_rmse_scaled"):
        values = [run[key] for run in runs if key in run]
        if values:
            name = "sad" if key == "sad_mean" else key
            summary[f"{name}_mean"], summary[f"{name}_std"] = mean_std(values)
    per_endmember = [run["sad_per_endmember"] for run in runs if "sad_per_endmember" in run]
    if per_endmember:
        summary["sad_per_endmember"] = np.mean(per_endmember, axis=0).tolist()
    return summary
