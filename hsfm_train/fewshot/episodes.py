"""Pixel-centred patches and the few-shot episodes built from a label map.

Cross-domain few-shot classification sees each labelled pixel as the small patch around it (9 x 9 in the
standard protocol), so that the backbone has spatial context. Two kinds of pixel sets are drawn:

* the target split (:func:`target_split`): K labelled pixels per class form the support, every other labelled
  pixel is the query; drawn per seed exactly as the frozen-feature probe draws its training pixels
  (``hsfm_train.stages.probe.sample_support``), so a few-shot result and a probe result with the same seed and K
  stand on the same support pixels;
* source episodes (:class:`SourceEpisodes`): N-way tasks over a labelled source scene, ``n_support`` +
  ``n_query`` pixels per class, for episodic (prototypical) training.

Pixels are addressed by flat index into the row-major [H, W] label map; label 0 is unlabelled and never drawn.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from hsfm_train.errors import ConfigError, DataFormatError


def _reflect(index: np.ndarray, length: int) -> np.ndarray:
    """Indices mirrored into [0, length) without repeating the edge (numpy's ``reflect`` padding), any distance
    out: the mirror is periodic with period 2 (length - 1)."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.abs(index) % period
    return np.where(index >= length, period - index, index)


def extract_patches(cube: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int = 9) -> np.ndarray:
    """[N, size, size, B] patches of ``cube`` [H, W, B] centred on pixels (rows[i], cols[i]), reflect-padded
    at the borders (as ``np.pad(mode="reflect")``). The cube is indexed, not padded, so a large source scene is
    never copied; the dtype of the cube is kept."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ConfigError(f"patch size must be an odd positive integer (a centre pixel), got {size!r}")
    cube = np.asarray(cube)
    if cube.ndim != 3:
        raise DataFormatError(f"cube must be [H, W, B], got shape {cube.shape}")
    rows, cols = np.asarray(rows, dtype=np.int64).reshape(-1), np.asarray(cols, dtype=np.int64).reshape(-1)
    if rows.shape != cols.shape:
        raise DataFormatError(f"rows ({rows.size}) and cols ({cols.size}) must pair up")
    height, width = cube.shape[:2]
    outside = (rows < 0) | (rows >= height) | (cols < 0) | (cols >= width)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise DataFormatError(f"pixel ({rows[first]}, {cols[first]}) is outside the {height} x {width} cube")
    offsets = np.arange(size) - size // 2
    patch_rows = _reflect(rows[:, None] + offsets[None, :], height)  # [N, size]
    patch_cols = _reflect(cols[:, None] + offsets[None, :], width)
    return cube[patch_rows[:, :, None], patch_cols[:, None, :]]


def patches_at(cube: np.ndarray, flat_indices: np.ndarray, size: int = 9) -> np.ndarray:
    """:func:`extract_patches` at flat (row-major) pixel indices, as the splits and episodes return them."""
    rows, cols = np.divmod(np.asarray(flat_indices, dtype=np.int64), np.asarray(cube).shape[1])
    return extract_patches(cube, rows, cols, size)


def _class_values(flat: np.ndarray) -> np.ndarray:
    return np.unique(flat[flat > 0])


# ---------------------------------------------------------------------------------------------- target split


@dataclass
class FewShotSplit:
    """Flat pixel indices (sorted) and their labels as class positions 0..C-1 in ``classes``."""
    classes: np.ndarray  # [C] the scene's label values, increasing
    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


def target_split(labels: np.ndarray, shots: int = 5, seed: int = 0) -> FewShotSplit:
    """K = ``shots`` support pixels per class drawn with seed ``seed``; query = every other labelled pixel.

    A class with fewer than 2K labelled pixels gives max(1, n // 2) of them to the support (with a warning naming
    it) so that it keeps query pixels to be scored; a class of one pixel has it in the support and no query
    pixel. This is the probe's rule (``sample_support``), reused so the two stages draw the same pixels."""
    # the probe stage owns the draw; imported here, not at module level, to keep this module light
    from hsfm_train.stages.probe import sample_support

    if shots < 1:
        raise ConfigError(f"shots must be >= 1 labelled pixels per class, got {shots}")
    flat = np.asarray(labels).reshape(-1)
    classes = _class_values(flat)
    if classes.size == 0:
        raise DataFormatError("the label map has no labelled pixel (every label is 0)")
    support, query = sample_support(labels, shots, seed)
    return FewShotSplit(classes=classes, support=support, support_labels=np.searchsorted(classes, flat[support]),
                        query=query, query_labels=np.searchsorted(classes, flat[query]))


# ------------------------------------------------------------------------------------------- source episodes


@dataclass
class EpisodeConfig:
    n_way: int = 0  # classes per episode, drawn without replacement; 0: every class with enough pixels
    n_support: int = 5
    n_query: int = 15

    def problems(self) -> list[str]:
        problems = []
        if self.n_way < 0:
            problems.append(f"episodes.n_way must be >= 0 (0: all classes), got {self.n_way}")
        if self.n_support < 1:
            problems.append(f"episodes.n_support must be >= 1, got {self.n_support}")
        if self.n_query < 1:
            problems.append(f"episodes.n_query must be >= 1, got {self.n_query}")
        return problems


@dataclass
class Episode:
    """One N-way task: flat pixel indices, class-major (n_support then n_query per class), and episode-local
    labels 0..N-1; ``classes[i]`` is the scene's label value of local label i (increasing)."""
    classes: np.ndarray  # [N]
    support: np.ndarray  # [N * n_support]
    support_labels: np.ndarray
    query: np.ndarray  # [N * n_query]
    query_labels: np.ndarray


class SourceEpisodes:
    """Draws :class:`Episode` s from a labelled source scene. A class with fewer than n_support + n_query pixels
    cannot fill an episode without repeating pixels: it is left out, listed in ``skipped`` (label -> pixel count)
    and named in a warning; at least one class must remain, and n_way (when set) must not exceed what remains."""

    def __init__(self, labels: np.ndarray, config: EpisodeConfig | None = None):
        config = config or EpisodeConfig()
        problems = config.problems()
        if problems:
            raise ConfigError("episode config: " + "; ".join(problems))
        self.config = config
        flat = np.asarray(labels).reshape(-1)
        need = config.n_support + config.n_query
        # each class's pixels found once: a source scene has millions of pixels and thousands of episodes
        order = np.argsort(flat, kind="stable")
        values, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
        self.members: dict[int, np.ndarray] = {}
        self.skipped: dict[int, int] = {}
        for value, start, count in zip(values, starts, counts):
            if value <= 0:
                continue
            if count < need:
                self.skipped[int(value)] = int(count)
            else:
                self.members[int(value)] = order[start:start + count]
        self.classes = np.array(sorted(self.members), dtype=np.int64)
        if self.skipped:
            listing = ", ".join(f"{label} ({count} px)" for label, count in self.skipped.items())
            warnings.warn(f"source episodes: {len(self.skipped)} classes have fewer than n_support + n_query = "
                          f"{need} pixels and are skipped: {listing}", stacklevel=2)
        if self.classes.size == 0:
            raise ConfigError(f"source episodes: no class has n_support + n_query = {need} labelled pixels")
        if config.n_way > self.classes.size:
            raise ConfigError(f"source episodes: n_way={config.n_way} but only {self.classes.size} classes have "
                              f"{need} pixels")

    @property
    def n_way(self) -> int:
        return self.config.n_way or int(self.classes.size)

    def sample(self, rng: np.random.Generator) -> Episode:
        c = self.config
        chosen = self.classes
        if self.n_way < self.classes.size:
            chosen = np.sort(rng.choice(self.classes, size=self.n_way, replace=False))
        support, query = [], []
        for value in chosen:
            picked = rng.choice(self.members[int(value)], size=c.n_support + c.n_query, replace=False)
            support.append(picked[:c.n_support])
            query.append(picked[c.n_support:])
        local = np.arange(chosen.size)
        return Episode(classes=chosen, support=np.concatenate(support), support_labels=np.repeat(local, c.n_support),
                       query=np.concatenate(query), query_labels=np.repeat(local, c.n_query))
