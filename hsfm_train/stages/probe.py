"""Frozen-backbone probes: does a pretraining run give features a classifier can use?

    hsfm probe backbone=runs/main-mae/export data.scene=../shared/data/classification/indian_pines/indian_pines.npz
    hsfm probe backbone=EXPORT data.scene=salinasA.npz data.reader.bands=corrected data.reader.sensor_preset=aviris
    hsfm probe backbone=random random_like=EXPORT data.scene=...   the control alone

From Python: ``run_probe(load_probe_config([...overrides]))``; ``format_probe_table(summary)`` prints the result.
Outputs in ``output_dir``: summary.json and figures/ (confusion matrix and classification map of the backbone).

Protocol. Per-pixel features come from the frozen encoder (patch tokens of every spectral group, upsampled
bilinearly to pixels, see :func:`pixel_features`). K labelled pixels per class are drawn per seed
(:func:`sample_support`), a linear probe (logistic regression, fixed C, no tuning on test pixels) and a kNN probe
are fitted on them, and every other labelled pixel is the test set (OA, AA, kappa). Every number stands beside
two controls computed in the same run on the same supports: the same architecture at random initialisation
(random ViT features with spatial pooling are a strong baseline on small scenes) and the raw spectra (per-band
standardised). Means and std are over seeds.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsfm_train.config import CONFIG_DIR, compose, free_mapping_overrides, to_dataclass
from hsfm_train.engine.run_records import torch_device
from hsfm_train.fewshot.embedder import tile_offsets
from hsfm_train.errors import ConfigError, DataFormatError
from hsfm_train.io import jsonable
from hsfm_train.metrics import classification_scores, effective_rank
from hsfm_train.models.mae import ModelConfig
from hsfm_train.stages.base import Stage, register_stage

PROBES = ("linear", "knn")
READOUTS = ("encoder", "decoder")
SOURCES = ("backbone", "random", "spectra")
SOURCE_TITLES = {"backbone": "backbone", "random": "random init", "spectra": "raw spectra"}
SPLIT_KEY = "split"  # the K entry of the results when an official train/test split replaces K-shot sampling


@dataclass
class ProbeDataConfig:
    scene: str = "???"  # a scene file with labels (0 = unlabelled) and wavelengths
    reader: dict[str, Any] = field(default_factory=dict)  # read_scene options, as in `hsfm shards build` manifests


@dataclass
class ProbeConfig:
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    backbone: str = "runs/main-mae/export"  # an `hsfm export` directory, or "random"
    random_like: str | None = None  # backbone=random: the architecture of this export, freshly initialised
    random_model: str = "tiny"  # backbone=random without random_like: a preset of configs/model/
    shots: list[int] = field(default_factory=lambda: [5, 10, 30])  # K labelled pixels per class
    seeds: int = 10  # supports drawn with seeds 0 .. seeds-1
    probes: list[str] = field(default_factory=lambda: list(PROBES))
    knn_k: int = 5
    with_spectrum: bool = False  # append the pixel's own normalised spectrum to its token feature
    readout: str = "encoder"  # "encoder": patch tokens of the encoder; "decoder": the decoder's, nothing masked
    controls: bool = True  # also the random-init control and the raw-spectra baseline
    split: str | None = None  # a label map of training pixels (.mat / .npz) replacing K-shot sampling
    split_key: str | None = None  # the array in the split file when it holds several
    seed: int = 0  # initialisation of the random-init model
    tile_size: int = 256  # px; larger images are encoded in overlapping tiles (attention is global in a tile)
    tile_overlap: int = 64  # px
    device: str = "auto"  # "auto": cuda when available
    name: str = "probe"
    output_dir: str = "runs/probe"


# ------------------------------------------------------------------------------------------------- config


def load_probe_config(overrides: list[str] | None = None) -> ProbeConfig:
    """``configs/probe.yaml`` + Hydra overrides -> a checked :class:`ProbeConfig`.

    The dataclass holds every default; it is Hydra's schema ``probe_schema``, which the YAML lists first, so the
    YAML holds only deviations and a mistyped key fails naming it. ``data.reader`` is a free mapping of reader
    options, where Hydra would want ``+`` to add a key: ``data.reader.bands=corrected`` is passed as
    ``++data.reader.bands=corrected`` (add or replace)."""
    config = compose("probe", free_mapping_overrides(list(overrides or []), ("data.reader",)), ProbeConfig)
    check_probe_config(config)
    return config


def check_probe_config(config: ProbeConfig) -> None:
    """One ConfigError naming every impossible value (run before anything is read or written)."""
    problems = []
    if config.data.scene in ("???", "", None):
        problems.append("data.scene must be set (a scene file with labels)")
    unknown = sorted(set(config.probes) - set(PROBES))
    if unknown or not config.probes:
        problems.append(f"probes must be a non-empty subset of {list(PROBES)}, got {config.probes}")
    if not config.shots or any(int(k) < 1 for k in config.shots):
        problems.append(f"shots must be positive pixel counts per class, got {config.shots}")
    if config.seeds < 1:
        problems.append(f"seeds must be >= 1, got {config.seeds}")
    if config.readout not in READOUTS:
        problems.append(f"readout must be one of {list(READOUTS)}, got {config.readout!r}")
    if config.knn_k < 1:
        problems.append(f"knn_k must be >= 1, got {config.knn_k}")
    if config.tile_overlap < 0 or config.tile_overlap >= config.tile_size:
        problems.append(f"tile_overlap must be in [0, tile_size={config.tile_size}), got {config.tile_overlap}")
    problems += backbone_problems(config.backbone, config.random_like, config.random_model)
    if config.split is not None and not Path(config.split).exists():
        problems.append(f"split file {config.split} does not exist")
    if problems:
        raise ConfigError("probe config: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------- models


def random_model(model_config: Any, seed: int, arch: str = "spectral-mae", with_decoder: bool = False
                 ) -> torch.nn.Module:
    """The encoder (or, ``with_decoder``, the whole model) of architecture ``arch`` with ``model_config``,
    freshly initialised from ``seed`` (the global RNG is left as it was)."""
    from hsfm_train.models.registry import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_config, arch, with_decoder=with_decoder)
    return model.eval()


def preset_model_config(name: str) -> ModelConfig:
    from omegaconf import OmegaConf

    path = CONFIG_DIR / "model" / f"{name}.yaml"
    values = OmegaConf.load(path)
    # a preset lists the presets it builds on (``defaults: [tiny, _self_]``): merge them first, as Hydra would
    bases = [preset_model_config(base) for base in values.pop("defaults", []) if base != "_self_"]
    merged = OmegaConf.merge(*[OmegaConf.structured(base) for base in bases], values) if bases else values
    return to_dataclass(ModelConfig, merged, str(path))


def load_backbone(config: ProbeConfig) -> tuple[torch.nn.Module, dict[str, Any] | None, str]:
    """(model in eval mode, the normalisation statistics that go with it or None, a description)."""
    decoder = config.readout == "decoder"
    model, statistics, description = backbone_from(config.backbone, config.random_like, config.random_model,
                                                   config.seed, decoder)
    if decoder and not getattr(model, "with_decoder", False):
        raise ConfigError(f"readout=decoder needs a backbone exported with its decoder; {config.backbone} is "
                          "encoder-only")
    return model, statistics, description


def backbone_problems(backbone: str, random_like: str | None, random_preset: str) -> list[str]:
    """What :func:`backbone_from` would refuse in these settings (nothing is read)."""
    problems = []
    if backbone == "random":
        if random_like is None and not (CONFIG_DIR / "model" / f"{random_preset}.yaml").exists():
            presets = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
            problems.append(f"random_model {random_preset!r} is not a preset of configs/model/ ({presets})")
    elif random_like is not None:
        problems.append("random_like only applies to backbone=random (the control of an export is always "
                        "the export's own architecture)")
    return problems


def missing_backbone(backbone: str, random_like: str | None) -> list[str]:
    """The exports :func:`backbone_from` would read that do not exist."""
    if backbone == "random":
        if random_like is not None and not Path(random_like).exists():
            return [f"random_like export {random_like} does not exist"]
    elif not Path(backbone).exists():
        return [f"backbone {backbone} does not exist (an `hsfm export` directory, or random)"]
    return []


def backbone_from(backbone: str, random_like: str | None, random_preset: str, seed: int, with_decoder: bool
                  ) -> tuple[torch.nn.Module, dict[str, Any] | None, str]:
    """An export (``backbone``: its directory; whole, as exported), or ``backbone="random"``: the architecture of
    the export ``random_like`` (fed with that export's normalisation) or of the model preset ``random_preset``,
    initialised from ``seed`` (with the decoder when ``with_decoder``). (model, statistics or None, description)."""
    from hsfm_train.engine.export import load_pretrained, read_export_config
    from hsfm_train.models.registry import DEFAULT_ARCHITECTURE
    from hsfm_train.models.registry import model_config as registry_model_config

    if backbone != "random":
        model = load_pretrained(backbone)
        return model, model.export_config.get("normalization") or {}, str(backbone)
    if random_like is not None:
        export = read_export_config(random_like)
        arch = export.get("arch", DEFAULT_ARCHITECTURE)
        model_config = registry_model_config(arch, export["model"], f"{random_like} model")
        # the control of an export is fed exactly as the export would be
        return (random_model(model_config, seed, arch, with_decoder), export.get("normalization") or {},
                f"random init (seed {seed}) like {random_like}")
    return (random_model(preset_model_config(random_preset), seed, with_decoder=with_decoder), None,
            f"random init (seed {seed}) of model preset {random_preset!r}")


# -------------------------------------------------------------------------------------------- normalisation


def scene_statistics(cube: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std over all pixels (labelled or not; no label is used), float64."""
    pixels = cube.reshape(-1, cube.shape[-1]).astype(np.float64)
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)  # a constant band becomes zeros, not inf


def standardise_spectra(cube: np.ndarray) -> np.ndarray:
    """The raw-spectra baseline's input: each band standardised with the scene's own statistics."""
    mean, std = scene_statistics(cube)
    return ((cube - mean) / std).astype(np.float32)


def normalisation_statistics(model: torch.nn.Module, cube: np.ndarray, wavelengths: np.ndarray,
                             statistics: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(per-band mean, std, where they came from): what :func:`normalise_for_model` applies."""
    from hsfm_train.models.normalizer import Normalizer

    if statistics is not None:
        normalizer = Normalizer(statistics)
    else:
        normalizer = getattr(model, "normalizer", None)
        exported = (getattr(model, "export_config", None) or {}).get("normalization")
        if normalizer is None and exported is not None:
            normalizer = Normalizer(exported)
    if normalizer is None:
        mean, std = scene_statistics(cube)
        return mean, std, "the scene's own per-band statistics (the model has none)"
    mean, std, source = normalizer.statistics_for(np.asarray(wavelengths).reshape(-1), cube, band_axis=2)
    if not source.startswith("training statistics"):
        source = "the scene's own per-band statistics (a band set new to the model)"
    return mean, std, source


def normalise_for_model(model: torch.nn.Module, cube: np.ndarray, wavelengths: np.ndarray,
                        statistics: dict[str, Any] | None = None) -> tuple[np.ndarray, str]:
    """(cube normalised as the model expects, where the statistics came from).

    The rule is the backbone's own (:class:`hsfm_train.models.normalizer.Normalizer`): a band set of the export
    (same band count, every centre within 0.5 nm) gives its training statistics; otherwise the scene's own
    per-band mean/std over all pixels are used, with a warning saying so. ``statistics`` (an export's
    ``normalization``) replaces the model's: the random-init control of an export is fed as the export is. A
    model without any (a random preset) gets the scene's statistics without a warning."""
    mean, std, source = normalisation_statistics(model, cube, wavelengths, statistics)
    return ((cube - mean) / std).astype(np.float32), source


# ------------------------------------------------------------------------------------------------ features


@torch.no_grad()
def pixel_features(model: torch.nn.Module, cube_normalised: np.ndarray, wavelengths: np.ndarray,
                   with_spectrum: bool = False, tile_size: int = 256, tile_overlap: int = 64,
                   readout: str = "encoder") -> np.ndarray:
    """Per-pixel features ``[H*W, F]`` (float32, raster order) of a normalised cube ``[H, W, B]``.

    H and W are reflect-padded up to a multiple of the patch size p; the encoder sees the whole image (or, when
    a side exceeds ``tile_size``, patch-aligned tiles overlapping by ``tile_overlap`` whose tokens are averaged
    where they overlap). The patch tokens (cls dropped) of each spectral group form a grid [D, H/p, W/p]; the
    groups are concatenated on channels (F = G*D, G = the groups this band set has: the model makes tokens only
    for groups with bands, so there are no placeholder tokens to drop), upsampled bilinearly
    (align_corners=False: each token sits at its patch centre) to pixels and cropped to H, W.
    ``with_spectrum`` appends the pixel's own normalised spectrum (F += B). ``readout="decoder"`` takes the
    decoder's token features (nothing masked) instead of the encoder's (F = G*Dd)."""
    was_training = model.training
    model.eval()
    try:
        return _pixel_features(model, cube_normalised, wavelengths, with_spectrum, tile_size, tile_overlap, readout)
    finally:
        model.train(was_training)


def _pixel_features(model, cube, wavelengths, with_spectrum, tile_size, tile_overlap, readout) -> np.ndarray:
    cube = np.asarray(cube, dtype=np.float32)
    if cube.ndim != 3:
        raise DataFormatError(f"pixel_features needs a cube [H, W, B], got shape {cube.shape}")
    height, width, bands = cube.shape
    if np.size(wavelengths) != bands:
        raise DataFormatError(f"{np.size(wavelengths)} wavelengths for a cube of {bands} bands")
    p = model.config.patch_size
    rows, cols = math.ceil(height / p), math.ceil(width / p)
    padded = np.pad(cube, ((0, rows * p - height), (0, cols * p - width), (0, 0)), mode="reflect")
    device = next(model.parameters()).device
    hsi = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None].to(device)  # [1, B, H', W']
    lam = torch.as_tensor(np.asarray(wavelengths, dtype=np.float32).reshape(-1), device=device)

    tile = max(1, tile_size // p)
    stride = max(1, tile - tile_overlap // p)
    total, count = None, torch.zeros(rows, cols, device=device)
    for r0 in tile_offsets(rows, tile, stride):
        for c0 in tile_offsets(cols, tile, stride):
            tr, tc = min(tile, rows), min(tile, cols)
            piece = hsi[..., r0 * p:(r0 + tr) * p, c0 * p:(c0 + tc) * p]
            if readout == "decoder":
                tokens = model.decoder_features(piece, lam)[0]  # [G*P, Dd]
            else:
                tokens = model.encode(piece, lam)[0, 1:]  # [G*P, D]: group-major, patches in raster order
            groups = tokens.shape[0] // (tr * tc)
            if groups * tr * tc != tokens.shape[0]:
                raise RuntimeError(f"{tokens.shape[0]} patch tokens do not tile a {tr}x{tc} patch grid")
            grid = tokens.float().view(groups, tr, tc, -1).permute(0, 3, 1, 2).reshape(-1, tr, tc)  # [G*D, r, c]
            if total is None:
                total = torch.zeros(grid.shape[0], rows, cols, device=device)
            total[:, r0:r0 + tr, c0:c0 + tc] += grid
            count[r0:r0 + tr, c0:c0 + tc] += 1
    grid = total / count  # every patch is covered by at least one tile

    features = np.empty((height * width, grid.shape[0] + (bands if with_spectrum else 0)), dtype=np.float32)
    chunk = 64  # channels upsampled at a time: the full-resolution stack of all channels can be large
    for start in range(0, grid.shape[0], chunk):
        part = torch.nn.functional.interpolate(grid[None, start:start + chunk], size=(rows * p, cols * p),
                                               mode="bilinear", align_corners=False)[0, :, :height, :width]
        features[:, start:start + part.shape[0]] = part.reshape(part.shape[0], -1).T.cpu().numpy()
    if with_spectrum:
        features[:, grid.shape[0]:] = cube.reshape(-1, bands)
    return features


# -------------------------------------------------------------------------------------------------- support


def sample_support(labels: np.ndarray, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) flat pixel indices over the labelled pixels (label > 0), both sorted.

    K = ``shots`` pixels per class, drawn with ``np.random.default_rng(seed)`` class by class in increasing label
    order. A class with fewer than 2K pixels gives at most half of them, max(1, n // 2), so that every class
    keeps test pixels (Indian Pines has classes of 20 and 28 pixels; K = 30 would otherwise take them whole);
    a warning names each such class. Test = every other labelled pixel."""
    flat = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    train = []
    for label in np.unique(flat[flat > 0]):
        members = np.flatnonzero(flat == label)
        take = min(shots, max(1, members.size // 2))
        if take < shots:
            warnings.warn(f"class {int(label)} has {members.size} labelled pixels: {take} of them (not K = {shots}) "
                          "go to training so that the rest can be tested", stacklevel=2)
        train.append(rng.choice(members, size=take, replace=False))
    train_index = np.sort(np.concatenate(train)) if train else np.zeros(0, dtype=np.int64)
    labelled = np.flatnonzero(flat > 0)
    return train_index, np.setdiff1d(labelled, train_index, assume_unique=True)


def read_split(path: str | Path, shape: tuple[int, int], key: str | None = None) -> np.ndarray:
    """The training-pixel mask [H, W] of an official split file (a label map: .mat v5 or .npz)."""
    path = Path(path)
    if path.suffix == ".mat":
        import scipy.io

        arrays = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    else:
        raise DataFormatError(f"split {path}: expected a .mat or .npz label map")
    candidates = {k: v for k, v in arrays.items() if np.ndim(v) == 2} if key is None else arrays
    if key is not None and key not in arrays:
        raise DataFormatError(f"split {path}: no array {key!r} (found {sorted(arrays)})")
    if key is None and len(candidates) != 1:
        raise DataFormatError(f"split {path}: {len(candidates)} 2-D arrays ({sorted(candidates)}); set split_key")
    values = np.asarray(arrays[key] if key is not None else next(iter(candidates.values())))
    if values.shape != tuple(shape):
        raise DataFormatError(f"split {path}: label map {values.shape} does not match the scene's labels {shape}")
    return values > 0


def split_support(labels: np.ndarray, train_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) of an official split: train = the scene's labelled pixels inside the split map, test = the
    scene's labelled pixels outside it. The scene's own labels are used on both sides, so a split file's own class
    numbering does not matter (Indian_pines_disjoint_train numbers its classes differently); split pixels the
    scene leaves unlabelled are not used."""
    flat, inside = np.asarray(labels).reshape(-1), np.asarray(train_mask).reshape(-1)
    return np.flatnonzero((flat > 0) & inside), np.flatnonzero((flat > 0) & ~inside)


# --------------------------------------------------------------------------------------------------- probes


def fit_probe(name: str, x_train: np.ndarray, y_train: np.ndarray, knn_k: int = 5):
    """A fitted scikit-learn pipeline: features standardised with the TRAIN pixels' statistics, then
    ``linear``: multinomial logistic regression (lbfgs, C = 1 fixed: nothing is tuned on test pixels) or
    ``knn``: k nearest neighbours, Euclidean on the standardised features, k = min(knn_k, the smallest class's
    support) so that a K-shot support smaller than k still lets each class win a vote."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "linear":
        classifier = LogisticRegression(C=1.0, max_iter=1000)
    elif name == "knn":
        smallest = int(np.unique(y_train, return_counts=True)[1].min())
        classifier = KNeighborsClassifier(n_neighbors=max(1, min(knn_k, smallest)), metric="euclidean")
    else:
        raise ConfigError(f"unknown probe {name!r}; expected one of {list(PROBES)}")
    return make_pipeline(StandardScaler(), classifier).fit(x_train, y_train)


def _aggregate(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """mean and std over seeds (sample std, ddof=1; 0 for one seed) of OA, AA and kappa."""
    out: dict[str, Any] = {}
    for key in ("oa", "aa", "kappa"):
        values = np.array([s[key] for s in scores], dtype=np.float64)
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    for key in ("oa", "aa", "kappa"):
        out[f"{key}_per_seed"] = [float(s[key]) for s in scores]
    return out


# ------------------------------------------------------------------------------------------------------ run


def _read_labelled_scene(config: ProbeConfig):
    from hsfm_train.data.readers import read_scene

    scene = read_scene(config.data.scene, **config.data.reader)
    where = f"{config.data.scene}"
    if scene.labels is None or not (scene.labels > 0).any():
        raise DataFormatError(f"{where}: no labelled pixels (labels > 0); the probe needs a classification scene "
                              "(reader option labels= names a label map)")
    if len(np.unique(scene.labels[scene.labels > 0])) < 2:
        raise DataFormatError(f"{where}: one labelled class only; a classification probe needs two or more")
    if scene.wavelengths_nm is None:
        raise DataFormatError(f"{where}: no band wavelengths; the wavelength-conditioned backbone needs them "
                              "(reader option wavelengths_nm=, or a sensor preset)")
    return scene


def _evaluate(features: dict[str, np.ndarray], supports: dict[str, list], labels: np.ndarray, classes: list[int],
              config: ProbeConfig, figure_at: tuple[str, str, str, int]):
    """Every (source, probe, K, seed): (results, (scores, predicted label map [H*W]) at ``figure_at``, the count
    of logistic-regression fits that stopped at max_iter)."""
    from sklearn.exceptions import ConvergenceWarning

    results: dict[str, Any] = {}
    figure_inputs, unconverged = None, 0
    for source, per_source in features.items():
        results[source] = {}
        for probe in config.probes:
            results[source][probe] = {}
            for k, draws in supports.items():
                scores = []
                for seed, (train, test) in enumerate(draws):
                    # a list holds one feature set per seed (the random-init control: one initialisation each)
                    x = per_source[seed % len(per_source)] if isinstance(per_source, list) else per_source
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always", ConvergenceWarning)
                        fitted = fit_probe(probe, x[train], labels[train], config.knn_k)
                    unconverged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
                    score = classification_scores(labels[test], fitted.predict(x[test]), classes)
                    scores.append(score)
                    if (source, probe, k, seed) == figure_at:  # the map covers the whole labelled area
                        labelled = np.flatnonzero(labels > 0)
                        predicted = np.zeros_like(labels)
                        predicted[labelled] = fitted.predict(x[labelled])
                        figure_inputs = (score, predicted)
                results[source][probe][k] = _aggregate(scores)
    return results, figure_inputs, unconverged


def run_probe(config: ProbeConfig) -> dict[str, Any]:
    """Run the probe as ``hsfm probe`` does: ``output_dir`` locked for the run, ``summary.json`` written
    atomically at the end (see :func:`probe_summary` for what it holds); returns the summary."""
    return ProbeStage(config).execute()


def probe_summary(config: ProbeConfig) -> dict[str, Any]:
    """Run every (feature source, probe, K, seed); write, for the backbone's linear probe at the largest K and
    seed 0, ``output_dir/figures/confusion_*.png`` and ``figures/classification_map_*.png``; return the summary
    (what ``summary.json`` holds; ``format_probe_table`` renders it):

        {"scene", "backbone", "normalisation", "primary_probe", "results": {"backbone" | "random" | "spectra":
            {"<K>" (or "split"): {"oa_mean", "oa_std", "aa_mean", "aa_std", "kappa_mean", "kappa_std",
            "oa_per_seed", "aa_per_seed", "kappa_per_seed"}}} (the primary probe: linear when run),
            "results_by_probe": {source: {"linear" | "knn": {"<K>": {...}}}}, "config", "classes", "class_pixels",
            "chance_oa", "feature_dims", "support_seed0", "figures", "notes", "seconds", ...}

    OA / AA are fractions; std is the sample std over seeds. "random" is absent for backbone=random (it would
    repeat the backbone) and both controls are absent with controls=false."""
    from threadpoolctl import threadpool_limits

    from hsfm_train.figures import classification_map_figure, confusion_matrix_figure
    from hsfm_train.models.registry import architecture_of

    check_probe_config(config)
    started = time.perf_counter()
    scene = _read_labelled_scene(config)
    labels = scene.labels.reshape(-1).astype(np.int64)
    classes = [int(c) for c in np.unique(labels[labels > 0])]
    height, width, bands = scene.cube.shape
    device = torch_device(config.device)

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone, statistics, backbone_name = load_backbone(config)
        cube, normalisation = normalise_for_model(backbone, scene.cube, scene.wavelengths_nm, statistics)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        notes.append(str(warning.message))

    seconds: dict[str, float] = {}
    features: dict[str, Any] = {}

    def extract(model: torch.nn.Module) -> np.ndarray:
        return pixel_features(model.to(device), cube, scene.wavelengths_nm, config.with_spectrum, config.tile_size,
                              config.tile_overlap, config.readout)

    tick = time.perf_counter()
    features["backbone"] = extract(backbone)
    seconds["features_backbone"] = time.perf_counter() - tick
    if config.controls and config.backbone != "random":
        # the control is the same architecture at random initialisation, one initialisation per seed, so its
        # spread covers the initialisation as well as the labelled pixels
        tick = time.perf_counter()
        arch = architecture_of(backbone)
        draws = 1 if config.split is not None else config.seeds
        features["random"] = [extract(random_model(backbone.config, config.seed + seed, arch,
                                                   config.readout == "decoder")) for seed in range(draws)]
        seconds["features_random"] = time.perf_counter() - tick
    elif config.controls:
        notes.append("no separate random-init control: the backbone is itself a random initialisation")
    if config.controls:
        features["spectra"] = standardise_spectra(scene.cube).reshape(-1, bands)

    if config.split is not None:
        mask = read_split(config.split, (height, width), config.split_key)
        supports = {SPLIT_KEY: [split_support(labels, mask)]}  # one fixed split: seeds would repeat it
    else:
        supports = {}
        for shots in sorted({int(k) for k in config.shots}):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                supports[str(shots)] = [sample_support(labels, shots, seed) for seed in range(config.seeds)]
            for message in dict.fromkeys(str(w.message) for w in caught):  # once per class, not once per seed
                warnings.warn(message, stacklevel=2)
                notes.append(message)
    largest = list(supports)[-1]
    figure_probe = "linear" if "linear" in config.probes else config.probes[0]

    tick = time.perf_counter()
    # one BLAS / OpenMP thread: these fits are tiny, and thread pools on a busy machine made a 0.1 s lbfgs fit
    # take 5-25 s (measured on 2 shared cores)
    with threadpool_limits(limits=1):
        results, figure_inputs, unconverged = _evaluate(features, supports, labels, classes, config,
                                                        ("backbone", figure_probe, largest, 0))
    if figure_inputs is not None:
        figure_inputs = (figure_inputs[0], figure_inputs[1].reshape(height, width), figure_probe, largest)
    seconds["probes"] = time.perf_counter() - tick
    if unconverged:
        notes.append(f"logistic regression reached max_iter without converging in {unconverged} fits")

    output = Path(config.output_dir)
    figures_dir = output / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    if figure_inputs is not None:
        score, predicted, probe, k = figure_inputs
        names = [str(c) for c in classes]
        tag = f"backbone_{probe}_K{k}_seed0"
        what = "official split" if k == SPLIT_KEY else f"K={k}, seed 0"
        figures["confusion"] = str(confusion_matrix_figure(
            figures_dir / f"confusion_{tag}.png", score["confusion"], names,
            title=f"{scene.name}: backbone, {probe} probe, {what} (test pixels)"))
        figures["classification_map"] = str(classification_map_figure(
            figures_dir / f"classification_map_{tag}.png", predicted, scene.labels,
            f"{scene.name}: backbone {probe} probe, {what}, OA {score['oa']:.1%} (test pixels)"))
    seconds["total"] = time.perf_counter() - started

    first = next(iter(supports.values()))[0][0]
    summary = {
        "scene": str(config.data.scene),
        "scene_name": scene.name,
        "shape": [height, width, bands],
        "backbone": backbone_name,
        "normalisation": normalisation,
        "protocol": ("official split: train = the split map's pixels, test = the scene's other labelled pixels"
                     if config.split is not None else
                     "K labelled pixels per class per seed (max(1, n//2) for classes of fewer than 2K), test = "
                     "every other labelled pixel; mean and sample std (ddof=1) over seeds"),
        "classes": classes,
        "class_pixels": [int((labels == c).sum()) for c in classes],
        "chance_oa": 1.0 / len(classes),
        "feature_dims": {source: int((x[0] if isinstance(x, list) else x).shape[1]) for source, x in features.items()},
        # how spread the features are (a collapsed backbone has a low one); the control's first initialisation
        "feature_effective_rank": {source: effective_rank(x[0] if isinstance(x, list) else x)
                                   for source, x in features.items()},
        "support_seed0": {k: [int((labels[draws[0][0]] == c).sum()) for c in classes] for k, draws in supports.items()},
        "train_pixels_seed0": int(first.size),
        # the schema: results[source][K] for the primary probe (linear when run); every probe's
        # results, the primary's included, under results_by_probe[source][probe][K]
        "primary_probe": figure_probe,
        "results": {source: by_probe[figure_probe] for source, by_probe in results.items()},
        "results_by_probe": results,
        "figures": figures,
        "notes": notes,
        "seconds": seconds,
        "config": jsonable(asdict(config)),
    }
    return summary


@register_stage
class ProbeStage(Stage):
    """``hsfm probe``: the runner locks output_dir, calls :func:`probe_summary` and writes summary.json."""

    name = "probe"
    help = "frozen-backbone linear / kNN probes beside a random-init control and raw spectra"
    config_class = ProbeConfig

    @classmethod
    def load_config(cls, overrides: list[str] | None = None) -> ProbeConfig:
        return load_probe_config(overrides)

    def run(self) -> dict[str, Any]:
        return probe_summary(self.config)

    def format_summary(self, summary: dict[str, Any]) -> str:
        return (f"{format_probe_table(summary)}\n"
                f"summary: {Path(self.config.output_dir) / 'summary.json'} ({summary['seconds']['total']:.0f} s)")


# ------------------------------------------------------------------------------------------------ reporting


def format_probe_table(summary: dict[str, Any]) -> str:
    """One table per probe (rows = K, columns = backbone / random init / raw spectra, cells "OA mean +- std" in
    percent), then one line per K that says whether the backbone beats both controls or loses to one."""
    results = summary["results_by_probe"]
    seeds = summary.get("config", {}).get("seeds")
    lines = [f"{summary.get('scene_name', summary['scene'])}: backbone {summary['backbone']}",
             f"normalisation: {summary['normalisation']}"]
    probes = list(results["backbone"])
    for probe in probes:
        over = ("the official split" if SPLIT_KEY in results["backbone"][probe]
                else f"mean +- std over {seeds} seeds")
        lines += ["", f"{probe} probe: OA % ({over})",
                  f"{'K':>6}  " + "  ".join(f"{SOURCE_TITLES[s]:>14}" for s in SOURCES)]
        verdicts = []
        for k, mine in results["backbone"][probe].items():
            cells = []
            for source in SOURCES:
                entry = results.get(source, {}).get(probe, {}).get(k)
                if entry is None:
                    cells.append("-")
                elif k == SPLIT_KEY:  # one fixed split: there is no spread to show
                    cells.append(f"{100 * entry['oa_mean']:.1f}")
                else:
                    cells.append(f"{100 * entry['oa_mean']:.1f} +- {100 * entry['oa_std']:.1f}")
            lines.append(f"{k:>6}  " + "  ".join(f"{c:>14}" for c in cells))
            verdicts.append(_verdict(k, mine, {s: results.get(s, {}).get(probe, {}).get(k) for s in SOURCES[1:]}))
        lines += verdicts
    return "\n".join(lines)


def _verdict(k: str, mine: dict[str, Any], controls: dict[str, dict[str, Any] | None]) -> str:
    label = "split" if k == SPLIT_KEY else f"K={k}"
    losses, wins = [], []
    for source, entry in controls.items():
        if entry is None:
            continue
        gap = 100 * (mine["oa_mean"] - entry["oa_mean"])
        spread = 100 * math.hypot(mine["oa_std"], entry["oa_std"])
        within = " (within the seed spread)" if abs(gap) <= spread and k != SPLIT_KEY else ""
        if gap < 0:
            losses.append(f"LOSES to {SOURCE_TITLES[source]} by {-gap:.1f} points{within}")
        else:
            wins.append(f"beats {SOURCE_TITLES[source]} by {gap:.1f} points{within}")
    if not losses and not wins:
        return f"  {label}: no controls in this run"
    return f"  {label}: the backbone " + "; ".join(losses + wins)


def main(overrides: list[str] | None = None) -> dict[str, Any]:
    """``python -m hsfm_train.stages.probe key=value ...``: what ``hsfm probe`` does (table on stdout)."""
    stage = ProbeStage(load_probe_config(overrides))
    summary = stage.execute()
    print(stage.format_summary(summary), flush=True)
    return summary


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
