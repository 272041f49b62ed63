"""Cross-domain few-shot classification on a frozen exported backbone, after MIFOMO (coalescent projection, mixup
domain adaptation, pseudo-labels).

    hsfm fewshot backbone=runs/main-mae/export data.target=../shared/data/classification/salinasA/salinasA.npz \\
        data.target_reader.sensor_preset=aviris data.target_reader.bands=corrected shots=5 seeds=20
    hsfm fewshot backbone=EXPORT data.target=indian_pines.npz data.source=[urban_gt_end4.npz] \\
        data.source_reader.sensor_preset=hydice_urban162 data.source_snr_db=30
    hsfm fewshot backbone=random random_like=EXPORT data.target=...     the random-init control, fed as EXPORT is

From Python: ``run_fewshot(load_fewshot_config([...overrides]))``; ``format_fewshot_summary(summary)`` prints it.
Outputs in ``output_dir``: summary.json (partial after each seed), runs/run_NNN.json (one seed's scores) +
runs/run_NNN.npz (its predicted label map), figures/confusion.png and figures/classification_map.png (seed 0).

Protocol (MIFOMO's, shared with DCFSL / Gia-CFSL). Per seed s = 0 .. seeds-1: K = ``shots`` labelled target
pixels per class are the support (drawn as the probe draws them, ``target_split``), every other labelled pixel is
the query and is scored (OA, AA, Cohen's kappa; mean +- sample std over seeds, beside chance = 1 / classes).
Each seed adapts a fresh copy of the frozen backbone (``adapter.kind``: cp = coalescent projection, lora, or
linear = nothing but the head) plus a linear head [D -> embedding_dim] to the prototype space, both initialised
from s. The readout gives a pixel its spatial context (hsfm_train/fewshot/embedder.py). ``centre`` / ``mean``: the
pixel is the ``patch_size`` window around it (reflect padding at the scene border), reflect-padded again
(symmetrically, the extra pixel after) up to a multiple of the model's patch size and encoded alone; its feature
is the tokens of the patch covering the centre pixel averaged over the spectral groups (``centre``), or every
token averaged (``mean``). ``tile``: the whole scene is encoded at once (in tiles of ``tile_size`` px overlapping
by ``tile_overlap``, as ``hsfm probe`` reads it), with gradients, once per training step; a pixel's feature is the
group-averaged token grid sampled bilinearly at the pixel; a source episode is drawn inside one random
``source_crop`` px crop of its scene, encoded alone (the crop with the most classes of ``CROP_TRIES``).
``tile+centre``: the tile feature and the ``centre`` feature side by side (a source episode's windows are cut
from its whole scene; its tiles from the crop). The embedding is the head of the feature. The backbone stays in eval() (frozen, no stochastic depth).

1. Source phase (only with ``data.source``): ``source_episodes`` prototypical episodes (n_way = min(target classes,
   source classes with n_support + n_query pixels); n_support + n_query pixels per class), the sources in turn.
2. Target phase, ``target_episodes`` episodes. Pseudo-labels (``pseudo_labelling``): the support and a pool of
   unlabelled target pixels are embedded and labels propagated from the support (Zhou et al. 2003). The pool is,
   ``mode=transductive`` (MIFOMO), the query pixels, whose labels are never read while training (they are read
   after training, for the reported pseudo-label accuracy only); ``mode=inductive``, the scene's label-0 pixels,
   never scored. The graph is dense up to ``pseudo_labels.dense_limit`` points and a ``pseudo_labels.auto_knn``-NN
   graph above (unless ``pseudo_labels.knn`` is set). sigma: ``pseudo_labels.sigma`` when set; by default (null)
   the median pairwise Euclidean distance of the embeddings (over at most 2000 of them), recomputed at each update,
   because the embedding's scale is the backbone's and the head's, not MIFOMO's (their sigma 50 is in their own
   units). The ``top_k`` most confident pool pixels per class are kept with smoothed labels. Pseudo-labels are
   recomputed every ``pseudo_label_every`` (25) target episodes, from the model as it is then (0: once, before
   the first). Each target episode: prototypes from the support embeddings; queries = every support pixel
   (leave-one-out: its own class's prototype without it; a class of one support pixel keeps it) and up to
   ``episodes.n_query`` pseudo-labelled pixels per class; soft cross-entropy.
   Mixup DA (``mixup_da``, with sources and pseudo-labels): each target episode also builds an intermediate
   domain: a source episode and a target episode of one shape (N classes = the source n_way, the target's drawn
   from its classes when fewer; n_support + n_query per class, the target's from the support and pseudo-labelled
   pixels of that (pseudo) class, with replacement when a class has fewer), paired position by position
   (class-major), so both sides carry the same local label. lambda comes from ``MixupSchedule`` updated with the
   2-Wasserstein distance of the episode's source and target embeddings. Mixed at the embedding level always, and
   at the input level too when the two patch tensors have one band count (window readouts only; e.g.
   ``pca_bands``; the band centres are mixed with the same lambda); labels are mixed as
   y = lambda y_S + (1 - lambda) y_T (y_T smoothed for pseudo-labelled pixels); prototypical soft cross-entropy
   on the mixed episode (the mean of the two levels).
3. Evaluation: support + every query pixel embedded (no grad), then ``predict``: the nearest support prototype,
   or (transductive) labels propagated from the support over the support + query embeddings, as the pseudo-labels
   are (``auto``, the default: propagation when transductive, prototype when inductive). Both are recorded in
   transductive mode (``oa_prototype``, ``oa_propagation``).

Inputs. The target and labelled sources are read with ``read_scene(path, **reader)``; a ground-truth-only
``.npz`` source (``endmembers`` + ``abundances``, no cube: Urban's) becomes the unmix stage's semi-real scene
(abundances x endmembers + noise at ``data.source_snr_db``), and a source with abundances but no labels is
labelled by its dominant material (argmax abundance + 1). Cubes are normalised for the model as the probe does
(``normalise_for_model``; the random-init control of an export uses the export's statistics). ``pca_bands=N``
projects each scene (its own mean-centred pixels, no labels) onto its first N principal components and gives them
nominal band centres spread evenly over that scene's wavelength range, so that the wavelength-conditioned backbone
accepts them: its spectral prior (what a band at a wavelength means) does NOT apply then, the components are
normalised with the scene's own statistics, and input-level mixup becomes possible.

Randomness: the split uses default_rng(s), episodes default_rng([s, seed]), adapter and head torch seeds s.
Resume: a seed's record is written when it ends; a rerun with the same settings (everything but seeds,
output_dir and name) reuses the finished seeds. AdamW with lr ``adapter_lr`` for the adapter and ``head_lr``
for the head (MIFOMO: 1e-3 and 1e-4; 1e-3 for both here), weight decay ``weight_decay``; MIFOMO trains 1500
source episodes, the defaults here are 100 + 100 (a CPU budget). Defaults that differ from MIFOMO, each measured
against its setting in docs/results.md: the tile readout (MIFOMO reads 9 x 9 patches), head_lr, top_k 30 (10),
and prediction by propagation when transductive (MIFOMO: nearest prototype).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hsfm_train.config import compose, free_mapping_overrides
from hsfm_train.errors import ConfigError, DataFormatError, HsfmError
from hsfm_train.fewshot.adapters import AdapterConfig, apply_adapter, parameter_report
from hsfm_train.fewshot.embedder import (READOUTS, WINDOW_READOUTS, Domain, EmbeddingRunner, FewshotEmbedder,
                                         Window, build_embedder)
from hsfm_train.fewshot.episodes import EpisodeConfig, FewShotSplit, SourceEpisodes, target_split
from hsfm_train.fewshot.transfer import (MixupConfig, MixupSchedule, PseudoLabelConfig, confident_pseudo_labels,
                                         gaussian_wasserstein, mix, propagate_labels, prototype_logits, prototypes,
                                         smooth_labels)
from hsfm_train.engine.run_records import finished_run, run_arrays_path, torch_device, write_run_record
from hsfm_train.io import jsonable, write_atomic, write_json_atomic
from hsfm_train.metrics import classification_scores, mean_std
from hsfm_train.stages.base import Stage, register_stage, say
from hsfm_train.stages.probe import backbone_problems, load_backbone, missing_backbone, normalise_for_model

MODES = ("transductive", "inductive")
PREDICTORS = ("auto", "prototype", "propagation")
SIGMA_SAMPLE = 2000  # embeddings the median pairwise distance is taken over
TRAJECTORY_POINTS = 10  # lambda values kept per seed


@dataclass
class SyntheticSourceConfig:
    """Source scenes made at the start from the packaged USGS library (linear mixing, ``hsfm_train.data.synthetic``)
    and labelled by their dominant material; small ``temperature`` gives nearly pure patches."""
    count: int = 0  # 0: none
    height: int = 96
    width: int = 96
    num_endmembers: int = 8  # the classes
    temperature: float = 0.1
    smoothness: float = 6.0  # px, the abundance fields' length scale
    snr_db: float = 30.0
    grid: str = "aviris224"  # a synthetic sensor grid or a sensor preset name
    seed: int = 0

    def problems(self) -> list[str]:
        if self.count < 0:
            return [f"data.synthetic_sources.count must be >= 0, got {self.count}"]
        try:
            self.scene_config()
        except HsfmError as error:
            return [f"data.synthetic_sources: {error}"]
        return []

    def scene_config(self):
        from hsfm_train.data.synthetic import SyntheticSceneConfig

        return SyntheticSceneConfig(height=self.height, width=self.width, num_endmembers=self.num_endmembers,
                                    snr_db=self.snr_db, smoothness=self.smoothness, temperature=self.temperature,
                                    target_wavelengths_nm=self.grid, name_prefix="usgs_synthetic")


@dataclass
class FewshotDataConfig:
    target: str = ""  # required: a scene file with labels (0 = unlabelled) and wavelengths
    target_reader: dict[str, Any] = field(default_factory=dict)  # read_scene options
    source: list[str] = field(default_factory=list)  # labelled scene files or ground-truth-only .npz files
    source_reader: dict[str, Any] = field(default_factory=dict)  # read_scene options, applied to every source
    source_snr_db: float = 30.0  # a ground-truth-only source: SNR of the semi-real cube built from it
    synthetic_sources: SyntheticSourceConfig = field(default_factory=SyntheticSourceConfig)


@dataclass
class FewshotPseudoLabelConfig(PseudoLabelConfig):
    """:class:`PseudoLabelConfig` with sigma defaulting to the data's own scale and a graph for large pools."""
    sigma: float | None = None  # None: the median pairwise distance of the embeddings, at every update
    top_k: int = 30  # most confident kept per class (MIFOMO: 10; see docs/results.md for both)
    auto_knn: int = 20  # knn=0 and more than dense_limit points: a k-NN graph with this k instead of a dense one

    def problems(self) -> list[str]:
        checked = replace(self, sigma=1.0) if self.sigma is None else self
        problems = PseudoLabelConfig.problems(checked)
        if self.auto_knn < 1:
            problems.append(f"pseudo_labels.auto_knn must be >= 1, got {self.auto_knn}")
        return problems

    def for_points(self, count: int, sigma: float) -> PseudoLabelConfig:
        """The plain config propagate_labels takes, for a graph of ``count`` points."""
        values = {f.name: getattr(self, f.name) for f in fields(PseudoLabelConfig)}
        values["sigma"] = float(sigma)
        if self.knn == 0 and count > self.dense_limit:
            values["knn"] = self.auto_knn
        return PseudoLabelConfig(**values)


@dataclass
class FewshotConfig:
    data: FewshotDataConfig = field(default_factory=FewshotDataConfig)
    backbone: str = "runs/main-mae/export"  # an `hsfm export` directory, or "random"
    random_like: str | None = None  # backbone=random: the architecture (and normalisation) of this export
    random_model: str = "tiny"  # backbone=random without random_like: a preset of configs/model/
    seed: int = 0  # initialisation of a random backbone; also mixed into the episode draws
    shots: int = 5  # K labelled target pixels per class
    seeds: int = 20  # support draws 0 .. seeds-1 (MIFOMO: 20)
    patch_size: int = 9  # pixel-centred window, odd
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    embedding_dim: int = 64  # the trainable head's output: the prototype space
    readout: str = "tile"  # "tile": of the whole scene; "centre" / "mean": of the pixel's window; "tile+centre"
    tile_size: int = 256  # readout=tile(+centre): px; a larger scene is encoded in overlapping tiles of this side
    tile_overlap: int = 64  # readout=tile(+centre): px
    source_crop: int = 64  # readout=tile(+centre): a source episode is drawn from one random crop of this side
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)  # n_way is set per source (see above)
    source_episodes: int = 100  # MIFOMO: 1500
    target_episodes: int = 100
    adapter_lr: float = 1e-3
    head_lr: float = 1e-3  # MIFOMO: 1e-4 (see docs/results.md for both)
    weight_decay: float = 1e-5  # AdamW
    mixup: MixupConfig = field(default_factory=MixupConfig)
    mixup_da: bool = True  # the intermediate domain (needs sources and pseudo-labels)
    pseudo_labels: FewshotPseudoLabelConfig = field(default_factory=FewshotPseudoLabelConfig)
    pseudo_labelling: bool = True
    pseudo_label_every: int = 25  # target episodes between pseudo-label updates; 0: once, before the first
    mode: str = "transductive"  # pseudo-label pool: "transductive" the query pixels, "inductive" label-0 pixels
    predict: str = "auto"  # "prototype": nearest support prototype; "propagation" (transductive): labels
    # propagated from the support over the support + query embeddings (the pseudo-label graph, every query pixel);
    # "auto": propagation when transductive, prototype when inductive
    pca_bands: int = 0  # 0: the scene's bands; N > 0: its first N principal components (see the module docstring)
    device: str = "auto"  # "auto": cuda when available
    name: str = "fewshot"
    output_dir: str = "runs/fewshot"


# ------------------------------------------------------------------------------------------------- config


def load_fewshot_config(overrides: list[str] | None = None) -> FewshotConfig:
    """``configs/fewshot.yaml`` + Hydra overrides -> a :class:`FewshotConfig` (schema ``fewshot_schema``).
    ``data.target_reader`` and ``data.source_reader`` are free mappings of reader options.

    An impossible value fails here, in one ConfigError that also names every unusable input file; the input
    files alone are checked when the stage starts (:func:`read_inputs`, before anything is written), so that
    ``--print-config`` works without them."""
    config = compose("fewshot", free_mapping_overrides(list(overrides or []),
                                                       ("data.target_reader", "data.source_reader")), FewshotConfig)
    problems = config_problems(config)
    if problems:
        raise ConfigError("fewshot config: " + "; ".join(problems + input_problems(config)))
    return config


def _npz_keys(path: Path) -> set[str] | None:
    if path.suffix.lower() != ".npz":
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return set(arrays.files)
    except (OSError, ValueError):
        return set()


def config_problems(config: FewshotConfig) -> list[str]:
    """Every impossible setting (nothing is read)."""
    problems = []
    problems += config.adapter.problems() + config.episodes.problems() + config.mixup.problems()
    problems += config.pseudo_labels.problems() + config.data.synthetic_sources.problems()
    if config.shots < 1:
        problems.append(f"shots must be >= 1 labelled pixels per class, got {config.shots}")
    if config.seeds < 1:
        problems.append(f"seeds must be >= 1, got {config.seeds}")
    if config.patch_size < 1 or config.patch_size % 2 == 0:
        problems.append(f"patch_size must be an odd positive window (a centre pixel), got {config.patch_size}")
    if config.mode not in MODES:
        problems.append(f"mode must be one of {list(MODES)}, got {config.mode!r}")
    if config.predict not in PREDICTORS:
        problems.append(f"predict must be one of {list(PREDICTORS)}, got {config.predict!r}")
    elif config.predict == "propagation" and config.mode != "transductive":
        problems.append("predict=propagation reads the query pixels' embeddings: it needs mode=transductive")
    if config.readout not in READOUTS:
        problems.append(f"readout must be one of {list(READOUTS)}, got {config.readout!r}")
    if config.tile_overlap < 0 or config.tile_overlap >= config.tile_size:
        problems.append(f"tile_overlap must be in [0, tile_size={config.tile_size}), got {config.tile_overlap}")
    if config.source_crop < 1:
        problems.append(f"source_crop must be >= 1 px, got {config.source_crop}")
    if config.embedding_dim < 1:
        problems.append(f"embedding_dim must be >= 1, got {config.embedding_dim}")
    for name in ("source_episodes", "target_episodes", "pseudo_label_every", "pca_bands"):
        if getattr(config, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(config, name)}")
    for name in ("adapter_lr", "head_lr", "weight_decay"):
        if not getattr(config, name) >= 0:
            problems.append(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.episodes.n_way:
        problems.append("episodes.n_way is set per source (min(target classes, source classes)); leave it 0")
    problems += backbone_problems(config.backbone, config.random_like, config.random_model)
    return problems


def input_problems(config: FewshotConfig) -> list[str]:
    """Every input that is unset or missing, or (an .npz, whose arrays are listed without reading them) has no
    labels or ground truth. What only reading a file tells is checked by :func:`read_inputs`."""
    problems = missing_backbone(config.backbone, config.random_like)
    if config.data.target in ("???", "", None):
        problems.append("data.target must be set (a scene file with labels)")
    elif not Path(config.data.target).exists():
        problems.append(f"data.target {config.data.target} does not exist")
    else:
        keys = _npz_keys(Path(config.data.target))
        if keys is not None and "labels" not in keys and "labels" not in config.data.target_reader:
            problems.append(f"data.target {config.data.target} has no labels (an .npz needs a `labels` array, or "
                            "data.target_reader.labels=)")
    for source in config.data.source:
        if not Path(source).exists():
            problems.append(f"data.source {source} does not exist")
            continue
        keys = _npz_keys(Path(source))
        if keys is None:
            continue
        ground_truth = {"endmembers", "abundances"} <= keys
        if "cube" not in keys and not ground_truth:
            problems.append(f"data.source {source} has neither a cube nor ground truth (endmembers + abundances)")
        elif "labels" not in keys and "abundances" not in keys and "labels" not in config.data.source_reader:
            problems.append(f"data.source {source} has no labels and no ground-truth abundances to label it from")
    return problems


def check_fewshot_config(config: FewshotConfig) -> None:
    """One ConfigError naming every impossible setting and every unusable input file (nothing is written)."""
    problems = config_problems(config) + input_problems(config)
    if problems:
        raise ConfigError("fewshot config: " + "; ".join(problems))


def predictor(config: FewshotConfig) -> str:
    """``config.predict`` with ``auto`` resolved."""
    if config.predict != "auto":
        return config.predict
    return "propagation" if config.mode == "transductive" else "prototype"


def run_identity(config: FewshotConfig) -> dict[str, Any]:
    """What a finished seed must share with the run that reuses it (the device as resolved: ``auto`` on a CPU
    machine computes what ``cpu`` does)."""
    identity = {k: v for k, v in jsonable(asdict(config)).items() if k not in ("seeds", "output_dir", "name")}
    identity["device"] = str(torch_device(config.device))
    return identity


# ------------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    backbone: nn.Module  # encoder only, eval mode, never trained (each seed adapts a copy)
    backbone_name: str
    target: Domain
    sources: list[Domain]
    notes: list[str]


def principal_components(cube: np.ndarray, wavelengths: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(the cube projected on its first ``count`` principal components [H, W, count], nominal band centres spread
    evenly over the scene's wavelength range). Each component's sign makes its largest loading positive."""
    height, width, bands = cube.shape
    if count > bands:
        raise DataFormatError(f"pca_bands={count}, but the scene has {bands} bands")
    pixels = cube.reshape(-1, bands).astype(np.float64)
    centred = pixels - pixels.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred / max(len(centred) - 1, 1))
    vectors = vectors[:, np.argsort(values)[::-1][:count]]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(count)])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    projected = (centred @ vectors).reshape(height, width, count).astype(np.float32)
    centres = np.linspace(float(np.min(wavelengths)), float(np.max(wavelengths)), count).astype(np.float32)
    return projected, centres


def _encoder_only(model: nn.Module) -> nn.Module:
    """The model without its decoder (few-shot reads the encoder; a decoder would only inflate the totals)."""
    if not getattr(model, "with_decoder", False):
        return model
    from hsfm_train.models.registry import architecture_of, build_model

    with torch.random.fork_rng(devices=[]):
        encoder = build_model(model.config, architecture_of(model), with_decoder=False)
    keep = set(encoder.state_dict())
    encoder.load_state_dict({k: v for k, v in model.state_dict().items() if k in keep})
    for attribute in ("export_config", "normalizer"):
        if hasattr(model, attribute):
            setattr(encoder, attribute, getattr(model, attribute))
    return encoder.eval()


def _read_scene_domain(path: str, reader: dict[str, Any], kind: str, snr_db: float | None) -> tuple:
    """(name, cube [H, W, B], wavelengths, labels [H*W], kind) of a target or source file."""
    from hsfm_train.data.readers import read_scene

    source = Path(path)
    keys = _npz_keys(source)
    if kind == "source" and keys is not None and "cube" not in keys:
        from hsfm_train.stages.unmix import UnmixDataConfig, load_unmixing_scene

        scene = load_unmixing_scene(UnmixDataConfig(scene=path, reader=dict(reader), snr_db=snr_db))
        height, width = scene.shape
        labels = scene.true_abundances.argmax(axis=1).astype(np.int64) + 1
        return (scene.name, scene.pixels.reshape(height, width, -1), scene.wavelengths_nm, labels,
                "semi-real (labels: dominant material)")
    scene = read_scene(path, **reader)
    labels, how = scene.labels, "labelled"
    if (labels is None or not (labels > 0).any()) and kind == "source" and scene.abundances is not None:
        labels, how = scene.abundances.argmax(axis=-1) + 1, "dominant material"
    if labels is None:
        labels = np.zeros(scene.cube.shape[:2], dtype=np.int64)
    return scene.name, scene.cube, scene.wavelengths_nm, np.asarray(labels).reshape(-1).astype(np.int64), how


def read_inputs(config: FewshotConfig) -> Inputs:
    """The backbone and every scene, normalised for it; one ConfigError naming every unusable input (before
    anything is written)."""
    check_fewshot_config(config)
    problems: list[str] = []
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone, statistics, backbone_name = load_backbone(config)
        backbone = _encoder_only(backbone)
        scenes = []
        entries = [("target", config.data.target, config.data.target_reader)]
        entries += [("source", path, config.data.source_reader) for path in config.data.source]
        for role, path, reader in entries:
            where = f"data.{role} {path}"
            try:
                name, cube, wavelengths, labels, how = _read_scene_domain(path, reader, role, config.data.source_snr_db)
            except (HsfmError, TypeError, ValueError, OSError) as error:
                problems.append(f"{where}: {error}")
                continue
            classes = np.unique(labels[labels > 0])
            if classes.size == 0:
                problems.append(f"{where}: no labelled pixels (labels > 0)")
            elif role == "target" and classes.size < 2:
                problems.append(f"{where}: one labelled class only; few-shot classification needs two or more")
            if wavelengths is None:
                problems.append(f"{where}: no band wavelengths (reader option wavelengths_nm=, or a sensor preset)")
            elif config.pca_bands > cube.shape[2]:
                problems.append(f"{where}: pca_bands={config.pca_bands} but the scene has {cube.shape[2]} bands")
            scenes.append((role, path, name, cube, wavelengths, labels, how))
        if problems:
            raise ConfigError("fewshot inputs: " + "; ".join(problems))
        synthetic = config.data.synthetic_sources
        if synthetic.count:
            from hsfm_train.data.synthetic import generate_scenes

            for scene in generate_scenes(synthetic.scene_config(), synthetic.count, synthetic.seed):
                labels = scene.abundances.argmax(axis=-1).reshape(-1).astype(np.int64) + 1
                scenes.append(("source", "synthetic", scene.name, scene.cube, scene.wavelengths_nm, labels,
                               "synthetic USGS (labels: dominant material)"))
        domains = []
        for role, path, name, cube, wavelengths, labels, how in scenes:
            wavelengths = np.asarray(wavelengths, dtype=np.float32).reshape(-1)
            if config.pca_bands:
                cube, wavelengths = principal_components(cube, wavelengths, config.pca_bands)
            normalised, normalisation = normalise_for_model(backbone, cube, wavelengths, statistics)
            domains.append(Domain(path=str(path), name=name, kind="target" if role == "target" else how,
                                  cube=normalised, wavelengths=wavelengths, labels=labels,
                                  normalisation=normalisation))
    for warning in caught:  # said on stderr as they came, and kept in the summary
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        notes.append(str(warning.message))
    notes = list(dict.fromkeys(notes))
    if config.pca_bands:
        notes.append(f"pca_bands={config.pca_bands}: principal components with nominal band centres; the "
                     "backbone's spectral prior does not apply to them")
    return Inputs(backbone.eval(), backbone_name, domains[0], domains[1:], notes)


# -------------------------------------------------------------------------------------------------- model


def trains_nothing(config: FewshotConfig, inputs: Inputs) -> bool:
    """No episode updates anything: no target episodes, and no source episodes (or no source)."""
    return config.target_episodes == 0 and (config.source_episodes == 0 or not inputs.sources)


def new_embedder(backbone: nn.Module, config: FewshotConfig, seed: int, frozen: bool = False) -> FewshotEmbedder:
    """A fresh copy of the frozen ``backbone`` with the adapter of ``config`` and a new head, both from ``seed``.
    ``frozen`` (nothing will train): the backbone's own features, no adapter and an identity head, since an
    untrained adapter or head would only perturb or randomly project them."""
    adapter = replace(config.adapter, kind="linear") if frozen else config.adapter
    return build_embedder(backbone, adapter, None if frozen else config.embedding_dim, config.readout,
                          config.patch_size, seed, config.tile_size, config.tile_overlap)


# ------------------------------------------------------------------------------------------- pseudo-labels


@dataclass
class PseudoLabels:
    indices: np.ndarray  # flat pixel indices of the kept pool pixels
    classes: np.ndarray  # their pseudo class positions 0..C-1
    soft: torch.Tensor  # [n, C] smoothed labels
    pool: np.ndarray  # every pool pixel
    pool_classes: np.ndarray  # every pool pixel's propagated class
    sigma: float
    graph: str


def pseudo_label_pool(mode: str, query: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The unlabelled pixels pseudo-labels are drawn from: the query pixels (transductive; their indices only)
    or the scene's label-0 pixels (inductive; never scored)."""
    if mode == "transductive":
        return np.asarray(query, dtype=np.int64)
    return np.flatnonzero(np.asarray(labels).reshape(-1) == 0)


def median_distance(embeddings: torch.Tensor, rng: np.random.Generator) -> float:
    """The median pairwise Euclidean distance over at most SIGMA_SAMPLE of ``embeddings``."""
    x = embeddings
    if len(x) > SIGMA_SAMPLE:
        x = x[torch.as_tensor(np.sort(rng.choice(len(x), SIGMA_SAMPLE, replace=False)), device=x.device)]
    distances = torch.cdist(x.double(), x.double())
    upper = distances[torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)]
    value = float(upper.median()) if upper.numel() else 1.0
    return value if value > 0 else 1.0


def propagate_from_support(support: torch.Tensor, support_classes: np.ndarray, pool: torch.Tensor, n_classes: int,
                           settings: FewshotPseudoLabelConfig, rng: np.random.Generator):
    """Label propagation from ``support`` points (class positions ``support_classes``) over support + ``pool``
    points: (the propagation, its sigma, the graph's name). Reads no label of the pool."""
    points = torch.cat([support, pool])
    sigma = settings.sigma if settings.sigma is not None else median_distance(points, rng)
    plain = settings.for_points(len(points), sigma)
    given = torch.cat([torch.as_tensor(support_classes, dtype=torch.long),
                       torch.full((len(pool),), -1, dtype=torch.long)]).to(points.device)
    graph = f"{plain.knn}-NN" if plain.knn else "dense"
    return propagate_labels(points, given, n_classes, plain), float(sigma), graph


def compute_pseudo_labels(runner: EmbeddingRunner, target: Domain, support: np.ndarray, support_classes: np.ndarray,
                          pool: np.ndarray, n_classes: int, config: FewshotConfig, rng: np.random.Generator
                          ) -> PseudoLabels:
    """Label propagation from the support (class positions ``support_classes``) over the support and ``pool``
    pixels' embeddings, and the most confident pool pixels per class; reads no label of the pool."""
    settings = config.pseudo_labels
    result, sigma, graph = propagate_from_support(runner.embed_all(target, support), support_classes,
                                                  runner.embed_all(target, pool), n_classes, settings, rng)
    total = len(support) + len(pool)
    candidates = torch.zeros(total, dtype=torch.bool, device=result.labels.device)
    candidates[len(support):] = True
    kept, kept_classes = confident_pseudo_labels(result.labels, result.confidence, n_classes, settings.top_k,
                                                 candidates)
    kept_np = kept.cpu().numpy() - len(support)
    return PseudoLabels(indices=pool[kept_np], classes=kept_classes.cpu().numpy(),
                        soft=smooth_labels(kept_classes, n_classes, settings.smoothing).to(runner.device),
                        pool=pool, pool_classes=result.labels[len(support):].cpu().numpy(), sigma=sigma,
                        graph=graph)


# ------------------------------------------------------------------------------------------------ training


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def leave_one_out_logits(embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of every support sample against the prototypes, its own class's prototype computed without it
    (kept when the class has one sample), the prototypes [C, E])."""
    centres = prototypes(embeddings, labels, n_classes)
    counts = torch.bincount(labels, minlength=n_classes).to(embeddings.dtype)
    sums = centres * counts[:, None]
    own = counts[labels]
    loo = (sums[labels] - embeddings) / (own - 1).clamp_min(1)[:, None]
    loo_logit = -(embeddings - loo).pow(2).sum(dim=1)
    logits = prototype_logits(embeddings, centres)
    rows = torch.arange(len(labels), device=labels.device)
    own_logit = torch.where(own > 1, loo_logit, logits[rows, labels])
    logits = logits.index_put((rows, labels), own_logit)
    return logits, centres


def _one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return F.one_hot(labels.long(), n_classes).float()


def _draw(rng: np.random.Generator, members: np.ndarray, count: int) -> np.ndarray:
    """``count`` positions into ``members`` without replacement when it has enough, with replacement otherwise."""
    return rng.choice(len(members), size=count, replace=len(members) < count)


class SourceDraw(NamedTuple):
    source: Domain
    episode: Any  # an episodes.Episode, flat indices into the whole source scene
    n_way: int
    window: Window | None  # readout=tile: the crop the episode lies in (encoded alone)


CROP_TRIES = 20  # random crops tried for one with n_way eligible classes before taking the best one seen


def crop_source_episode(source: Domain, sampler: SourceEpisodes, config: FewshotConfig,
                        rng: np.random.Generator) -> SourceDraw:
    """A source episode inside one random ``source_crop`` x ``source_crop`` crop: the crop whose labelled pixels
    give the most classes with n_support + n_query pixels (up to the scene sampler's n_way) of CROP_TRIES."""
    height, width = source.shape
    h, w = min(config.source_crop, height), min(config.source_crop, width)
    labels = source.labels.reshape(height, width)
    need = config.episodes.n_support + config.episodes.n_query
    best = None
    for _ in range(CROP_TRIES):
        r0, c0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        inside = np.zeros_like(labels)
        inside[r0:r0 + h, c0:c0 + w] = labels[r0:r0 + h, c0:c0 + w]
        counts = np.bincount(inside.reshape(-1), minlength=1)[1:]
        eligible = int((counts >= need).sum())
        if best is None or eligible > best[0]:
            best = (eligible, (r0, c0, h, w), inside.reshape(-1))
        if eligible >= sampler.n_way:
            break
    eligible, window, inside = best
    if eligible < 2:
        return SourceDraw(source, sampler.sample(rng), sampler.n_way, None)  # no crop holds a task: whole scene
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small classes of a crop are skipped, as the scene's are
        cropped = SourceEpisodes(inside, replace(config.episodes, n_way=min(sampler.n_way, eligible)))
    return SourceDraw(source, cropped.sample(rng), cropped.n_way, window)


@dataclass
class SeedResult:
    record: dict[str, Any]
    predicted_map: np.ndarray  # [H, W] int, 0 outside the labelled pixels
    embedder: FewshotEmbedder


def _optimizer(embedder: FewshotEmbedder, config: FewshotConfig) -> torch.optim.Optimizer:
    adapter = [p for p in embedder.backbone.parameters() if p.requires_grad]
    groups = [{"params": list(embedder.head.parameters()), "lr": config.head_lr}]
    if adapter:
        groups.insert(0, {"params": adapter, "lr": config.adapter_lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def draw_splits(target: Domain, config: FewshotConfig) -> tuple[list[FewShotSplit], list[str]]:
    """The support/query split of every seed, and the warnings of the draw (said once, by the stage)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = [target_split(target.labels.reshape(target.shape), config.shots, seed=seed)
                  for seed in range(config.seeds)]
    return splits, list(dict.fromkeys(str(w.message) for w in caught))


def run_seed(inputs: Inputs, config: FewshotConfig, seed: int, device: torch.device,
             split: FewShotSplit | None = None) -> SeedResult:
    """Adapt a fresh copy of the backbone with support draw ``seed`` (``split``, drawn here when not given) and
    score it on the query pixels."""
    started = time.perf_counter()
    target = inputs.target
    classes = np.asarray(target.classes)
    n_classes = len(classes)
    if split is None:
        split = draw_splits(target, replace(config, seeds=seed + 1))[0][seed]
    # what training may see of the target: support pixels and their classes, the pool's pixel indices
    support, support_classes = split.support, split.support_labels
    pool = pseudo_label_pool(config.mode, split.query, target.labels)
    rng = np.random.default_rng([seed, config.seed])

    frozen = trains_nothing(config, inputs)
    embedder = new_embedder(inputs.backbone, config, seed, frozen).to(device)
    runner = EmbeddingRunner(embedder, device)
    optimizer = None if frozen else _optimizer(embedder, config)
    report = parameter_report(embedder)
    support_t = torch.as_tensor(support_classes, dtype=torch.long, device=device)

    samplers = []
    for source in inputs.sources:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampler = SourceEpisodes(source.labels, replace(config.episodes, n_way=0))
        sampler.config = replace(config.episodes, n_way=min(n_classes, int(sampler.classes.size)))
        samplers.append((source, sampler))

    def source_episode(number: int) -> SourceDraw:
        source, sampler = samplers[number % len(samplers)]
        if runner.reads_tiles:
            return crop_source_episode(source, sampler, config, rng)
        return SourceDraw(source, sampler.sample(rng), sampler.n_way, None)

    losses: dict[str, list[float]] = {"source": [], "target": [], "mixup": []}
    # 1. source phase
    for number in range(config.source_episodes if samplers else 0):
        source, episode, n_way, window = source_episode(number)
        both = runner.embed(source, np.concatenate([episode.support, episode.query]), window)
        s, q = both[:len(episode.support)], both[len(episode.support):]
        logits = prototype_logits(q, prototypes(s, torch.as_tensor(episode.support_labels, device=device), n_way))
        loss = F.cross_entropy(logits, torch.as_tensor(episode.query_labels, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        runner.forget()
        losses["source"].append(loss.item())

    # 2. target phase
    pseudo: PseudoLabels | None = None
    history: list[PseudoLabels] = []
    schedule = MixupSchedule(config.mixup)
    lambdas: list[tuple[int, float, float]] = []
    mixup_active = bool(config.mixup_da and samplers and config.pseudo_labelling)
    c = config.episodes
    for number in range(config.target_episodes):
        if config.pseudo_labelling and (
                pseudo is None or (config.pseudo_label_every and number % config.pseudo_label_every == 0)):
            if len(pool):
                pseudo = compute_pseudo_labels(runner, target, support, support_classes, pool, n_classes, config,
                                               rng)
                history.append(pseudo)
        indices = [support]
        if pseudo is not None and len(pseudo.indices):
            chosen = []
            for position in range(n_classes):
                members = np.flatnonzero(pseudo.classes == position)
                if len(members) > c.n_query:
                    members = np.sort(rng.choice(members, size=c.n_query, replace=False))
                chosen.append(members)
            chosen = np.concatenate(chosen)
            indices.append(pseudo.indices[chosen])
        embedded = runner.embed(target, np.concatenate(indices))
        logits, centres = leave_one_out_logits(embedded[:len(support)], support_t, n_classes)
        targets = [_one_hot(support_t, n_classes)]
        if len(indices) > 1:
            logits = torch.cat([logits, prototype_logits(embedded[len(support):], centres)])
            targets.append(pseudo.soft[torch.as_tensor(chosen, device=device)])
        loss = soft_cross_entropy(logits, torch.cat(targets))
        losses["target"].append(loss.item())
        if mixup_active and pseudo is not None and len(pseudo.indices):
            mixed_loss, lam = _mixup_episode(runner, target, source_episode(number), support, support_classes,
                                             pseudo, n_classes, schedule, rng, c)
            lambdas.append((number, lam, schedule.ratio()))
            losses["mixup"].append(mixed_loss.item())
            loss = loss + mixed_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        runner.forget()

    # 3. evaluation: nearest support prototype; transductive, also label propagation over support + query
    query = split.query
    with torch.no_grad():
        centres = prototypes(runner.embed_all(target, support), support_t, n_classes)
        labelled = np.flatnonzero(target.labels > 0)
        predicted_pos = prototype_logits(runner.embed_all(target, labelled), centres).argmax(dim=1).cpu().numpy()
    predicted_map = np.zeros(target.labels.size, dtype=np.int64)
    predicted_map[labelled] = classes[predicted_pos]
    propagated_map = None
    if config.mode == "transductive":
        final = compute_pseudo_labels(runner, target, support, support_classes, query, n_classes, config, rng)
        propagated_map = np.zeros(target.labels.size, dtype=np.int64)
        propagated_map[support] = classes[support_classes]
        propagated_map[query] = classes[final.pool_classes]
    by_prototype = classification_scores(target.labels[query], predicted_map[query], classes.tolist())
    by_propagation = None if propagated_map is None else \
        classification_scores(target.labels[query], propagated_map[query], classes.tolist())
    if predictor(config) == "propagation":
        scores, predicted_map = by_propagation, propagated_map
    else:
        scores = by_prototype

    # reporting only, after training: how right the pseudo-labels were (pool labels known in transductive mode)
    record: dict[str, Any] = {
        "seed": seed, "oa": scores["oa"], "aa": scores["aa"], "kappa": scores["kappa"],
        "oa_prototype": by_prototype["oa"], "oa_propagation": by_propagation["oa"] if by_propagation else None,
        "confusion": np.asarray(scores["confusion"]).tolist(), "seconds": 0.0,
        "support_pixels": int(len(support)), "query_pixels": int(len(query)),
        "trainable_parameters": int(report["trainable"]), "total_parameters": int(report["total"]),
        "pseudo_label_pool": int(len(pool)) if config.pseudo_labelling else 0,
        "pseudo_label_updates": len(history),
        "pseudo_label_accuracy": None, "pseudo_label_accuracy_per_update": [], "propagation_accuracy": None,
        "pseudo_labels_kept": int(len(history[-1].indices)) if history else 0,
        "pseudo_label_sigma": [round(p.sigma, 6) for p in history],
        "pseudo_label_graph": history[-1].graph if history else None,
        "lambda_trajectory": _trajectory(lambdas),
        "lambda_mean": float(np.mean([lam for _, lam, _ in lambdas])) if lambdas else None,
        "mixup_episodes": len(lambdas),
        "loss": {phase: {"first": values[0], "last": values[-1], "episodes": len(values)}
                 for phase, values in losses.items() if values},
    }
    if history and config.mode == "transductive":
        position = np.searchsorted(classes, target.labels)  # read only now, for the report
        per_update = [float((position[p.indices] == p.classes).mean()) if len(p.indices) else None for p in history]
        record["pseudo_label_accuracy_per_update"] = per_update
        record["pseudo_label_accuracy"] = per_update[-1]
        last = history[-1]
        record["propagation_accuracy"] = float((position[last.pool] == last.pool_classes).mean())
    record["seconds"] = time.perf_counter() - started
    return SeedResult(record, predicted_map.reshape(target.shape), embedder)


def _mixup_episode(runner: EmbeddingRunner, target: Domain, drawn, support: np.ndarray, support_classes: np.ndarray,
                   pseudo: PseudoLabels, n_classes: int, schedule: MixupSchedule, rng: np.random.Generator,
                   c: EpisodeConfig) -> tuple[torch.Tensor, float]:
    """The intermediate-domain episode's loss and its lambda (see the module docstring)."""
    source, episode, n_way, window = drawn
    device = runner.device
    chosen = np.arange(n_classes) if n_way >= n_classes else np.sort(rng.choice(n_classes, n_way, replace=False))
    # the target side: per chosen class, support pixels (one-hot) and pseudo-labelled pixels (smoothed)
    soft_support = _one_hot(torch.as_tensor(support_classes, device=device), n_classes)
    pixels = np.concatenate([support, pseudo.indices])
    soft = torch.cat([soft_support, pseudo.soft])
    kind = np.concatenate([support_classes, pseudo.classes])
    picks_support, picks_query = [], []
    for position in chosen:
        members = np.flatnonzero(kind == position)
        drawn_here = members[_draw(rng, members, c.n_support + c.n_query)]
        picks_support.append(drawn_here[:c.n_support])
        picks_query.append(drawn_here[c.n_support:])
    order = np.concatenate(picks_support + picks_query)  # class-major support, then class-major query
    local = torch.as_tensor(np.repeat(np.arange(n_way), c.n_support), device=device)
    # target labels in the episode's local label space: the soft label restricted to the chosen classes
    target_soft = soft[torch.as_tensor(order, device=device)][:, torch.as_tensor(chosen, device=device)]
    target_soft = target_soft / target_soft.sum(dim=1, keepdim=True)
    source_pixels = np.concatenate([episode.support, episode.query])
    source_soft = _one_hot(torch.as_tensor(np.concatenate([episode.support_labels, episode.query_labels]),
                                           device=device), n_way)

    source_emb = runner.embed(source, source_pixels, window)
    target_emb = runner.embed(target, pixels[order])
    schedule.update(gaussian_wasserstein(source_emb, target_emb))
    lam = float(schedule.sample(rng))
    labels = mix(source_soft, target_soft, lam)[n_way * c.n_support:]
    split = n_way * c.n_support

    def episode_loss(embedded: torch.Tensor) -> torch.Tensor:
        centres = prototypes(embedded[:split], local, n_way)
        return soft_cross_entropy(prototype_logits(embedded[split:], centres), labels)

    loss = episode_loss(mix(source_emb, target_emb, lam))
    if not runner.reads_tiles and source.cube.shape[2] == target.cube.shape[2]:
        # one band count: mix the input patches (and band centres) too
        source_wl, target_wl = runner.wavelengths(source), runner.wavelengths(target)
        mixed_inputs = mix(runner.inputs(source, source_pixels), runner.inputs(target, pixels[order]), lam)
        loss = (loss + episode_loss(runner.embedder(mixed_inputs, mix(source_wl, target_wl, lam)))) / 2
    return loss, lam


def _trajectory(lambdas: list[tuple[int, float, float]]) -> list[dict[str, float]]:
    """At most TRAJECTORY_POINTS (episode, lambda, distance ratio) entries, evenly spaced, first and last kept."""
    if not lambdas:
        return []
    keep = np.unique(np.linspace(0, len(lambdas) - 1, min(TRAJECTORY_POINTS, len(lambdas))).round().astype(int))
    return [{"episode": int(lambdas[i][0]), "lambda": round(lambdas[i][1], 6), "distance_ratio": round(lambdas[i][2], 6)}
            for i in keep]


# ------------------------------------------------------------------------------------------------------ run


def _write_map(path: Path, predicted: np.ndarray) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.savez(handle, predicted=predicted.astype(np.int16))
    write_atomic(path, write)


def _over_seeds(entry: dict[str, Any], count: int) -> dict[str, Any]:
    """A baseline's scores restricted to the first ``count`` seeds (those the model has finished)."""
    restricted: dict[str, Any] = {}
    for key in ("oa", "aa", "kappa"):
        values = entry[f"{key}_per_seed"][:count]
        restricted[f"{key}_mean"], restricted[f"{key}_std"] = mean_std(values, ddof=1)
        restricted[f"{key}_per_seed"] = values
    return restricted


def input_spectra_baselines(target: Domain, splits: list[FewShotSplit], config: FewshotConfig
                            ) -> dict[str, dict[str, Any]]:
    """The trivial baselines on each seed's own split, without any network: every pixel's input spectrum (as the
    model receives it: normalised, or its principal components with ``pca_bands``), classified by a logistic
    regression (the probe's ``linear``: standardised on the support, C = 1), by the nearest support-class mean
    after the same standardisation (a prototypical classifier on spectra) and, transductive, by label propagation
    from the support over support + query with the stage's own pseudo-label settings (what propagation alone
    gives, without the backbone)."""
    from hsfm_train.stages.probe import fit_probe

    spectra = target.cube.reshape(-1, target.cube.shape[-1]).astype(np.float64)
    classes = target.classes
    found: dict[str, list[dict[str, Any]]] = {"spectra_linear": [], "spectra_prototypes": []}
    if config.mode == "transductive":
        found["spectra_propagation"] = []
    for seed, split in enumerate(splits):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            linear = fit_probe("linear", spectra[split.support], target.labels[split.support])
        truth = target.labels[split.query]
        found["spectra_linear"].append(classification_scores(truth, linear.predict(spectra[split.query]), classes))
        mean = spectra[split.support].mean(axis=0)
        std = spectra[split.support].std(axis=0)
        std = np.where(std > 0, std, 1.0)
        support = (spectra[split.support] - mean) / std
        centres = np.stack([support[split.support_labels == position].mean(axis=0)
                            for position in range(len(classes))])
        query = (spectra[split.query] - mean) / std
        distances = (query ** 2).sum(1)[:, None] - 2 * query @ centres.T + (centres ** 2).sum(1)[None, :]
        predicted = np.asarray(classes)[distances.argmin(axis=1)]
        found["spectra_prototypes"].append(classification_scores(truth, predicted, classes))
        if "spectra_propagation" in found:
            result, _, _ = propagate_from_support(torch.as_tensor(support, dtype=torch.float32),
                                                  split.support_labels, torch.as_tensor(query, dtype=torch.float32),
                                                  len(classes), config.pseudo_labels,
                                                  np.random.default_rng([seed, config.seed]))
            predicted = np.asarray(classes)[result.labels[len(support):].numpy()]
            found["spectra_propagation"].append(classification_scores(truth, predicted, classes))
    summary: dict[str, dict[str, Any]] = {}
    for name, scores in found.items():
        entry: dict[str, Any] = {}
        for key in ("oa", "aa", "kappa"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([score[key] for score in scores], ddof=1)
            entry[f"{key}_per_seed"] = [score[key] for score in scores]
        summary[name] = entry
    return summary


def fewshot_summary(config: FewshotConfig, inputs: Inputs) -> dict[str, Any]:
    """Every seed (finished ones reused), each written when it ends, then the figures of seed 0; the summary."""
    started = time.perf_counter()
    device = torch_device(config.device)
    output = Path(config.output_dir)
    (output / "runs").mkdir(parents=True, exist_ok=True)
    identity = run_identity(config)
    target = inputs.target
    classes = target.classes
    notes = list(inputs.notes)
    splits, warned = draw_splits(target, config)
    notes += warned

    frozen = trains_nothing(config, inputs)
    if frozen:
        notes.append("nothing trains (target_episodes=0, no source episodes): the frozen backbone's own features, "
                     f"without the {config.adapter.kind} adapter or a head")
    probe = new_embedder(inputs.backbone, config, 0, frozen)
    report = parameter_report(probe)
    adapter_count = sum(p.numel() for p in probe.backbone.parameters() if p.requires_grad)
    head_count = sum(p.numel() for p in probe.head.parameters())
    del probe
    say(f"fewshot: {target.name} ({len(classes)} classes, K={config.shots}, {config.seeds} seeds, {config.mode}), "
        f"adapter {config.adapter.kind}: {report['trainable']:,} trainable of {report['total']:,} parameters "
        f"({100 * report['fraction']:.2f}%: adapter {adapter_count:,} + head {head_count:,})")
    baselines = input_spectra_baselines(target, splits, config)
    mixup_active = bool(config.mixup_da and inputs.sources and config.pseudo_labelling)
    if config.mixup_da and not mixup_active:
        notes.append("mixup DA is on but inactive: it needs data.source and pseudo_labelling")

    per_seed: list[dict[str, Any]] = []
    reused = 0
    for seed in range(config.seeds):
        finished = finished_run(output, seed, identity)
        if finished is not None:
            per_seed.append(finished)
            reused += 1
            continue
        result = run_seed(inputs, config, seed, device, splits[seed])
        record = jsonable(result.record)
        _write_map(run_arrays_path(output, seed), result.predicted_map)
        write_run_record(output, seed, identity, record)
        per_seed.append(record)
        say(f"seed {seed}: OA {100 * record['oa']:.1f}%, AA {100 * record['aa']:.1f}%, kappa {record['kappa']:.3f} "
            f"({record['seconds']:.0f} s)")
        if seed + 1 < config.seeds:
            write_json_atomic(output / "summary.json", _summary(config, inputs, per_seed, reused, report,
                                                                adapter_count, head_count, notes, {}, started,
                                                                baselines))
    figures = _figures(output, target, classes, per_seed[0])
    return _summary(config, inputs, per_seed, reused, report, adapter_count, head_count, notes, figures, started,
                    baselines)


def _figures(output: Path, target: Domain, classes: list[int], first: dict[str, Any]) -> dict[str, str]:
    from hsfm_train.figures import classification_map_figure, confusion_matrix_figure

    with np.load(output / "runs" / "run_000.npz", allow_pickle=False) as arrays:
        predicted = arrays["predicted"].astype(np.int64)
    what = f"{target.name}: few-shot, seed 0, OA {100 * first['oa']:.1f}% (query pixels)"
    return {
        "confusion": str(confusion_matrix_figure(output / "figures" / "confusion.png", first["confusion"],
                                                 [str(c) for c in classes], title=what)),
        "classification_map": str(classification_map_figure(output / "figures" / "classification_map.png",
                                                            predicted, target.labels.reshape(target.shape), what)),
    }


def _summary(config: FewshotConfig, inputs: Inputs, per_seed: list[dict[str, Any]], reused: int,
             report: dict[str, float], adapter_count: int, head_count: int, notes: list[str],
             figures: dict[str, str], started: float, baselines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    target = inputs.target
    classes = target.classes
    scores: dict[str, Any] = {}
    for key in ("oa", "aa", "kappa"):
        scores[f"{key}_mean"], scores[f"{key}_std"] = mean_std([record[key] for record in per_seed], ddof=1)
        scores[f"{key}_per_seed"] = [record[key] for record in per_seed]
    for key in ("oa_prototype", "oa_propagation"):
        values = [record[key] for record in per_seed if record.get(key) is not None]
        if len(values) == len(per_seed):
            scores[f"{key}_mean"], scores[f"{key}_std"] = mean_std(values, ddof=1)
    accuracies = [r["pseudo_label_accuracy"] for r in per_seed if r.get("pseudo_label_accuracy") is not None]
    updates = ("off" if not config.pseudo_labelling else
               f"every {config.pseudo_label_every} target episodes" if config.pseudo_label_every else
               "once, before the first target episode")
    return {
        "stage": "fewshot", "name": config.name,
        "target": str(config.data.target), "target_name": target.name,
        "shape": [*target.shape, int(target.cube.shape[2])],
        "classes": classes, "class_pixels": [int((target.labels == c).sum()) for c in classes],
        "chance_oa": 1.0 / len(classes),
        "backbone": inputs.backbone_name,
        "normalisation": {"target": target.normalisation, "sources": [s.normalisation for s in inputs.sources]},
        "sources": [{"path": s.path, "name": s.name, "kind": s.kind, "classes": s.classes,
                     "shape": [*s.shape, int(s.cube.shape[2])]} for s in inputs.sources],
        "mode": config.mode, "predict": predictor(config), "adapter": jsonable(asdict(config.adapter)),
        "readout": config.readout,
        "mixup_da": bool(config.mixup_da and inputs.sources and config.pseudo_labelling),
        "pseudo_labelling": config.pseudo_labelling, "pseudo_label_updates": updates,
        "pca_bands": config.pca_bands,
        "trainable_parameters": int(report["trainable"]), "total_parameters": int(report["total"]),
        "trainable_fraction": float(report["fraction"]),
        "parameters": {"adapter": int(adapter_count), "head": int(head_count),
                       "backbone_frozen": int(report["total"] - report["trainable"])},
        "shots": config.shots, "seeds": config.seeds, "seeds_done": len(per_seed),
        "complete": len(per_seed) == config.seeds, "runs_reused": reused,
        **scores,
        # on the seeds done so far, so that the comparison is like for like in a partial summary too
        "baselines": {name: _over_seeds(entry, len(per_seed)) for name, entry in baselines.items()},
        "pseudo_label_accuracy_mean": float(np.mean(accuracies)) if accuracies else None,
        "seconds_per_seed": float(np.mean([r["seconds"] for r in per_seed])),
        "seconds": time.perf_counter() - started,
        "protocol": ("K labelled target pixels per class per seed (max(1, n//2) for classes of fewer than 2K), "
                     "query = every other labelled pixel, predicted by " + (
                         "nearest support prototype" if predictor(config) == "prototype" else
                         "label propagation from the support over support + query") +
                     "; mean and sample std (ddof=1) over seeds 0..seeds-1"),
        "per_seed": per_seed, "figures": figures, "notes": notes,
        "output_dir": str(config.output_dir), "config": jsonable(asdict(config)),
    }


def run_fewshot(config: FewshotConfig) -> dict[str, Any]:
    """Run as ``hsfm fewshot`` does: inputs read and checked, output_dir locked, summary.json written."""
    return FewshotStage(config).execute()


@register_stage
class FewshotStage(Stage):
    """``hsfm fewshot``: inputs are read before the output_dir lock is taken (a bad input leaves no trace)."""

    name = "fewshot"
    help = "cross-domain few-shot classification on a frozen backbone (adapter + prototypes, MIFOMO-style)"
    config_class = FewshotConfig

    @classmethod
    def load_config(cls, overrides: list[str] | None = None) -> FewshotConfig:
        return load_fewshot_config(overrides)

    def execute(self) -> dict[str, Any]:
        self.inputs = read_inputs(self.config)
        return super().execute()

    def run(self) -> dict[str, Any]:
        return fewshot_summary(self.config, self.inputs)

    def format_summary(self, summary: dict[str, Any]) -> str:
        return (f"{format_fewshot_summary(summary)}\n"
                f"summary: {Path(self.config.output_dir) / 'summary.json'} ({summary['seconds']:.0f} s)")


def format_fewshot_summary(summary: dict[str, Any]) -> str:
    seeds = f"{summary['seeds_done']} of {summary['seeds']} seeds" if not summary["complete"] else \
        f"{summary['seeds']} seeds"
    sources = ", ".join(s["name"] for s in summary["sources"]) or "none"
    lines = [
        f"{summary['target_name']}: few-shot K={summary['shots']}, {len(summary['classes'])} classes, {seeds}, "
        f"{summary['mode']}; backbone {summary['backbone']}",
        f"  adapter {summary['adapter']['kind']}: {summary['trainable_parameters']:,} trainable of "
        f"{summary['total_parameters']:,} parameters ({100 * summary['trainable_fraction']:.2f}%)",
        f"  OA {100 * summary['oa_mean']:.1f} +- {100 * summary['oa_std']:.1f} %  (chance {100 * summary['chance_oa']:.1f} %)"
        f"   AA {100 * summary['aa_mean']:.1f} +- {100 * summary['aa_std']:.1f} %"
        f"   kappa {summary['kappa_mean']:.3f} +- {summary['kappa_std']:.3f}",
        f"  sources: {sources}; mixup DA {'on' if summary['mixup_da'] else 'off'}; pseudo-labels "
        f"{summary['pseudo_label_updates']}"
        + (f" (kept accuracy {100 * summary['pseudo_label_accuracy_mean']:.1f} %)"
           if summary.get("pseudo_label_accuracy_mean") is not None else ""),
        f"  {summary['seconds_per_seed']:.1f} s per seed; {summary['runs_reused']} seeds reused",
    ]
    if "oa_propagation_mean" in summary:
        lines.insert(3, f"  predicted by {summary['predict']}; OA by nearest prototype "
                        f"{100 * summary['oa_prototype_mean']:.1f} %, by label propagation over the query "
                        f"{100 * summary['oa_propagation_mean']:.1f} %")
    names = {"spectra_linear": "input spectra, logistic regression",
             "spectra_prototypes": "input spectra, nearest class mean",
             "spectra_propagation": "input spectra, label propagation"}
    for name, entry in summary.get("baselines", {}).items():
        verdict = "the model LOSES to it" if entry["oa_mean"] > summary["oa_mean"] else "the model beats it"
        lines.append(f"  baseline {names.get(name, name)}: OA {100 * entry['oa_mean']:.1f} +- "
                     f"{100 * entry['oa_std']:.1f} %, AA {100 * entry['aa_mean']:.1f} %, kappa {entry['kappa_mean']:.3f}"
                     f" ({verdict})")
    return "\n".join(lines)
