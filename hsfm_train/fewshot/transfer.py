"""Moving knowledge from a labelled source scene to a barely labelled target: prototypes, pseudo-labels, mixup.

* Prototypical networks: a class is the mean embedding of its support pixels, a query's logits are minus its
  squared Euclidean distances to the prototypes.
* Pseudo-labels for the target's unlabelled (query) pixels by label propagation (Zhou et al. 2003) over a
  Gaussian affinity graph of the embeddings, keeping only the most confident few per class, softened by label
  smoothing because some of them are wrong.
* Mixup domain adaptation: an intermediate domain of convex combinations of source and target samples (inputs or
  embeddings) and of their labels, lam ~ Beta(2, 2), with lam shifted by how far apart the two domains still are
  (:class:`MixupSchedule`).

The lambda schedule (our reading of a method description that gives only its intent and two constants): while
the domains are far apart the mixed samples lean towards the target (lam = weight of the source is lowered),
and as the domains come closer lam moves towards the source. The distance is the closed-form 2-Wasserstein
distance between Gaussians fitted to the two sets of embeddings (:func:`gaussian_wasserstein`): it sees the
means and the covariances, is exact for Gaussians, deterministic (no random projections as in a sliced
distance) and costs one eigendecomposition of a D x D matrix. Raw distances depend on the embedding's scale, so
the schedule uses r = d / d_ref, d_ref the first distance it is given (the start of the mixup phase: r = 1 then,
0 when the domains coincide). The shift is a two-way softmax between "lean target" (score r) and "lean source"
(score 1 - r) at the temperature:

    shift = perturbation * (p_source - p_target) = perturbation * tanh((1 - 2 r) / (2 temperature))
    lam   = clip(lam_beta + shift, 0, 1),  lam_beta ~ Beta(2, 2)

so shift is -perturbation (-0.2) at the start, +0.2 once the distance has shrunk well below half its start, and
0 at half; temperature 0.05 makes the switch sharp (most of it within r in [0.4, 0.6]), a larger one a ramp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hsfm_train.errors import ConfigError, DataFormatError

SOLVERS = ("auto", "solve", "iterate")


# ------------------------------------------------------------------------------------------------ prototypes


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[C, D] class means of ``embeddings`` [N, D] by ``labels`` [N] in 0..C-1; every class needs a sample."""
    labels = labels.long()
    counts = torch.bincount(labels, minlength=n_classes)
    if counts.numel() > n_classes or (counts[:n_classes] == 0).any():
        missing = torch.nonzero(counts[:n_classes] == 0).flatten().tolist()
        raise DataFormatError(f"prototypes: labels must cover 0..{n_classes - 1}; classes without a sample: "
                              f"{missing}, labels up to {int(labels.max())}")
    sums = torch.zeros(n_classes, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    sums = sums.index_add(0, labels, embeddings)
    return sums / counts.to(embeddings.dtype)[:, None]


def prototype_logits(queries: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[M, C] minus the squared Euclidean distance of each query [M, D] to each prototype [C, D]."""
    return -(queries[:, None, :] - centres[None, :, :]).pow(2).sum(-1)


# ---------------------------------------------------------------------------------------- label propagation


@dataclass
class PseudoLabelConfig:
    alpha: float = 0.9  # weight of the graph against the given labels, in (0, 1)
    sigma: float = 50.0  # Gaussian affinity width, in embedding units
    knn: int = 0  # 0: the dense graph; k > 0: each point's k nearest neighbours only (symmetrised), for large N
    solver: str = "auto"  # "solve" (I - alpha S) F = Y, "iterate" F <- alpha S F + Y; auto: solve up to dense_limit
    dense_limit: int = 4096  # points up to which auto solves exactly (an N x N system in float64)
    max_iterations: int = 1000  # alpha^t of the start is left after t iterations: 0.9^200 ~ 7e-10
    tolerance: float = 1e-6  # iteration stops when the largest change is below tolerance x the largest score
    top_k: int = 10  # most confident pseudo-labels kept per class
    smoothing: float = 0.1  # label smoothing epsilon of the kept pseudo-labels

    def problems(self) -> list[str]:
        problems = []
        if not 0.0 < self.alpha < 1.0:
            problems.append(f"pseudo_labels.alpha must be in (0, 1), got {self.alpha}")
        if not self.sigma > 0:
            problems.append(f"pseudo_labels.sigma must be > 0, got {self.sigma}")
        if self.knn < 0:
            problems.append(f"pseudo_labels.knn must be >= 0 (0: dense graph), got {self.knn}")
        if self.solver not in SOLVERS:
            problems.append(f"pseudo_labels.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        for name in ("dense_limit", "max_iterations", "top_k"):
            if getattr(self, name) < 1:
                problems.append(f"pseudo_labels.{name} must be >= 1, got {getattr(self, name)}")
        if not self.tolerance > 0:
            problems.append(f"pseudo_labels.tolerance must be > 0, got {self.tolerance}")
        if not 0.0 <= self.smoothing < 1.0:
            problems.append(f"pseudo_labels.smoothing must be in [0, 1), got {self.smoothing}")
        return problems


@dataclass
class Propagation:
    labels: torch.Tensor  # [N] argmax of the scores
    confidence: torch.Tensor  # [N] the largest score over the row's sum, in [1/C, 1]; 0 where the row is all 0
    scores: torch.Tensor  # [N, C] F


def gaussian_affinity(x: torch.Tensor, sigma: float, knn: int = 0, chunk: int = 1024) -> torch.Tensor:
    """W_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)) with a zero diagonal: dense [N, N], or with ``knn`` > 0 a
    sparse COO matrix keeping each point's k nearest neighbours, symmetrised as (W + W^T) / 2 (an edge found from
    one side only keeps half its weight). The neighbours are found ``chunk`` rows at a time (memory N x chunk)."""
    n = x.shape[0]
    scale = 2.0 * sigma * sigma
    if knn == 0:
        weights = torch.exp(-torch.cdist(x, x).pow(2) / scale)
        return weights.fill_diagonal_(0.0)
    k = min(knn, n - 1)
    rows, cols, values = [], [], []
    for start in range(0, n, chunk):
        block = torch.cdist(x[start:start + chunk], x).pow(2)
        here = torch.arange(start, start + block.shape[0], device=x.device)
        block[torch.arange(block.shape[0], device=x.device), here] = math.inf  # no self-loop
        distances, neighbours = block.topk(k, dim=1, largest=False)
        rows.append(here.repeat_interleave(k))
        cols.append(neighbours.reshape(-1))
        values.append(torch.exp(-distances.reshape(-1) / scale))
    row, col, value = torch.cat(rows), torch.cat(cols), torch.cat(values)
    indices = torch.stack([torch.cat([row, col]), torch.cat([col, row])])
    # built from in-range indices here, so the invariant checks (and their warning) are skipped
    return torch.sparse_coo_tensor(indices, torch.cat([value, value]) / 2, (n, n), check_invariants=False).coalesce()


def normalised_affinity(weights: torch.Tensor) -> torch.Tensor:
    """S = D^-1/2 W D^-1/2 (D the degrees); a point without edges keeps a zero row and column."""
    if weights.is_sparse:
        degree = torch.sparse.sum(weights, dim=1).to_dense()
    else:
        degree = weights.sum(dim=1)
    inverse_root = torch.where(degree > 0, degree.clamp_min(torch.finfo(degree.dtype).tiny).rsqrt(),
                               torch.zeros_like(degree))
    if weights.is_sparse:
        row, col = weights.indices()
        scaled = weights.values() * inverse_root[row] * inverse_root[col]
        return torch.sparse_coo_tensor(weights.indices(), scaled, weights.shape, check_invariants=False).coalesce()
    return inverse_root[:, None] * weights * inverse_root[None, :]


def propagate_labels(embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int,
                     config: PseudoLabelConfig | None = None) -> Propagation:
    """Label propagation over all ``embeddings`` [N, D]; ``labels`` [N] holds 0..C-1 for the labelled points
    (the support) and -1 for the rest. F = (I - alpha S)^-1 Y, by a linear solve or by iterating
    F <- alpha S F + Y from F = Y (the same fixed point: alpha S has spectral radius < 1)."""
    config = config or PseudoLabelConfig()
    problems = config.problems()
    if problems:
        raise ConfigError("pseudo-label config: " + "; ".join(problems))
    labels = labels.long()
    if labels.shape != embeddings.shape[:1]:
        raise DataFormatError(f"labels {tuple(labels.shape)} must be [N] for embeddings {tuple(embeddings.shape)}")
    if (labels >= n_classes).any() or (labels < -1).any():
        raise DataFormatError(f"labels must be -1 (unlabelled) or 0..{n_classes - 1}")
    n = embeddings.shape[0]
    solve = config.solver == "solve" or (config.solver == "auto" and n <= config.dense_limit)
    # float64 for an exact solve of a small system; float32 keeps a large graph's memory at 4 N^2 (or 4 N k)
    dtype = torch.float64 if solve else torch.float32
    x = embeddings.detach().to(dtype)
    given = torch.zeros(n, n_classes, dtype=dtype, device=x.device)
    known = labels >= 0
    given[known.nonzero().squeeze(1), labels[known]] = 1.0
    graph = normalised_affinity(gaussian_affinity(x, config.sigma, config.knn))
    if solve:
        dense = graph.to_dense() if graph.is_sparse else graph
        system = torch.eye(n, dtype=dtype, device=x.device) - config.alpha * dense
        scores = torch.linalg.solve(system, given)
    else:
        scores = given.clone()
        for _ in range(config.max_iterations):
            updated = config.alpha * (graph @ scores) + given
            change = (updated - scores).abs().max()
            scores = updated
            if change <= config.tolerance * scores.abs().max().clamp_min(torch.finfo(dtype).tiny):
                break
    total = scores.sum(dim=1)
    best, predicted = scores.max(dim=1)
    confidence = torch.where(total > 0, best / total.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(total))
    return Propagation(labels=predicted, confidence=confidence.float(), scores=scores)


def confident_pseudo_labels(labels: torch.Tensor, confidence: torch.Tensor, n_classes: int, top_k: int = 10,
                            candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, labels) of the ``top_k`` most confident points predicted as each class, class by class, most
    confident first; only ``candidates`` (a bool mask [N], e.g. the unlabelled points) and points with a
    confidence above zero take part. A class predicted for fewer than k points gives all of them."""
    eligible = confidence > 0
    if candidates is not None:
        eligible = eligible & candidates.bool()
    kept_index, kept_label = [], []
    for label in range(n_classes):
        members = torch.nonzero(eligible & (labels == label)).flatten()
        order = confidence[members].argsort(descending=True, stable=True)[:top_k]
        kept_index.append(members[order])
        kept_label.append(torch.full((order.numel(),), label, dtype=torch.long, device=labels.device))
    return torch.cat(kept_index), torch.cat(kept_label)


def smooth_labels(labels: torch.Tensor, n_classes: int, epsilon: float = 0.1) -> torch.Tensor:
    """[N, C] (1 - epsilon) one-hot + epsilon / C: each row sums to one, the given class keeps most of it."""
    if not 0.0 <= epsilon < 1.0:
        raise ConfigError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")
    one_hot = torch.nn.functional.one_hot(labels.long(), n_classes).float()
    return one_hot * (1.0 - epsilon) + epsilon / n_classes


# ----------------------------------------------------------------------------------------------------- mixup


def mix(source: torch.Tensor, target: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """lam * source + (1 - lam) * target for inputs, embeddings or soft labels alike. ``lam`` a number, or [N]
    (one per sample, broadcast over the trailing dims). The two sides must have one shape: input-level mixing
    needs both domains in one band set (e.g. after PCA, or resampled to common band centres), label mixing one
    label space (episode-local labels of equally many classes)."""
    if source.shape != target.shape:
        raise DataFormatError(f"mixup: source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
    if isinstance(lam, torch.Tensor) and lam.dim() > 0:
        lam = lam.to(source.dtype).reshape(-1, *([1] * (source.dim() - 1)))
    return lam * source + (1 - lam) * target


def mixup(source: torch.Tensor, source_labels: torch.Tensor, target: torch.Tensor, target_labels: torch.Tensor,
          lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed samples, mixed soft labels): labels [N, C] soft (one-hot or smoothed) on both sides."""
    return mix(source, target, lam), mix(source_labels.float(), target_labels.float(), lam)


def sample_beta(rng: np.random.Generator, a: float = 2.0, b: float = 2.0, size: int | None = None
                ) -> float | np.ndarray:
    """lam ~ Beta(a, b) from a numpy Generator: Beta(2, 2) is symmetric about 1/2 and rarely near 0 or 1."""
    return float(rng.beta(a, b)) if size is None else rng.beta(a, b, size=size)


# ------------------------------------------------------------------------------------- domain distance


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def gaussian_wasserstein(first: torch.Tensor, second: torch.Tensor) -> float:
    """2-Wasserstein distance between Gaussians fitted to ``first`` [N1, D] and ``second`` [N2, D]:
    W2^2 = ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2), in float64 through symmetric
    eigendecompositions (the matrices are PSD; rank-deficient covariances from N < D are fine)."""
    if first.dim() != 2 or second.dim() != 2 or first.shape[1] != second.shape[1]:
        raise DataFormatError(f"gaussian_wasserstein: expected [N1, D] and [N2, D], got {tuple(first.shape)} and "
                              f"{tuple(second.shape)}")
    a, b = first.detach().double(), second.detach().double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a = torch.cov(a.T, correction=0).reshape(a.shape[1], a.shape[1])
    cov_b = torch.cov(b.T, correction=0).reshape(b.shape[1], b.shape[1])
    root_b = _symmetric_sqrt(cov_b)
    inner = root_b @ cov_a @ root_b
    cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    squared = (mean_a - mean_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(squared.clamp_min(0).sqrt())


@dataclass
class MixupConfig:
    beta_a: float = 2.0  # lam_beta ~ Beta(beta_a, beta_b)
    beta_b: float = 2.0
    temperature: float = 0.05  # softness of the lean-target / lean-source switch, in units of d / d_ref
    perturbation: float = 0.2  # the largest shift of lam either way

    def problems(self) -> list[str]:
        problems = []
        for name in ("beta_a", "beta_b", "temperature"):
            if not getattr(self, name) > 0:
                problems.append(f"mixup.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.perturbation <= 1.0:
            problems.append(f"mixup.perturbation must be in [0, 1], got {self.perturbation}")
        return problems


class MixupSchedule:
    """lam for the next mixed batch, from the latest source/target distance (see the module docstring):
    ``update(distance)`` then ``sample(rng)``. ``state_dict``/``load_state_dict`` keep d_ref across a resume."""

    def __init__(self, config: MixupConfig | None = None):
        self.config = config or MixupConfig()
        problems = self.config.problems()
        if problems:
            raise ConfigError("mixup config: " + "; ".join(problems))
        self.reference: float | None = None  # d_ref, the first distance seen
        self.distance: float | None = None

    def update(self, distance: float) -> None:
        if not math.isfinite(distance) or distance < 0:
            raise DataFormatError(f"mixup schedule: a domain distance must be finite and >= 0, got {distance}")
        if self.reference is None:
            self.reference = distance
        self.distance = distance

    def ratio(self) -> float:
        """r = d / d_ref in [0, 1] (1 before any distance: the domains are taken to be as far apart as ever)."""
        if self.distance is None or self.reference is None:
            return 1.0
        if self.reference == 0:  # the domains coincided from the start
            return 0.0
        return min(max(self.distance / self.reference, 0.0), 1.0)

    def shift(self) -> float:
        """perturbation * tanh((1 - 2 r) / (2 temperature)): -perturbation far apart, +perturbation close."""
        c = self.config
        return c.perturbation * math.tanh((1.0 - 2.0 * self.ratio()) / (2.0 * c.temperature))

    def sample(self, rng: np.random.Generator, size: int | None = None) -> float | np.ndarray:
        lam = sample_beta(rng, self.config.beta_a, self.config.beta_b, size) + self.shift()
        return float(min(max(lam, 0.0), 1.0)) if size is None else np.clip(lam, 0.0, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "distance": self.distance}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference, self.distance = state["reference"], state["distance"]
