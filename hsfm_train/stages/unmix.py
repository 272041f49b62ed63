"""Spectral unmixing: a scene's endmembers and abundances by one method, over several runs, scored against the
scene's ground truth.

    hsfm unmix method=vca-fcls data.scene=../shared/data/unmixing/samson/samson.npz
    hsfm unmix method=nfindr-fcls data.scene=... runs=25 seed=0
    hsfm unmix method=nmf data.scene=../shared/data/unmixing/urban/urban_gt_end4.npz data.snr_db=30

Methods (``hsfm_train.unmixing.METHODS``, one signature, each with its own config section): the classical
baselines ``vca-fcls`` and ``nfindr-fcls`` (endmember extraction, then fully constrained least squares) and ``nmf``
(non-negative factorisation with sum-to-one, started from VCA), ``labelled-als`` (the semi-supervised baseline:
alternating non-negative least squares anchored by ``als.labelled`` ground-truth pixels); ``cnnaeu`` and ``cnnaeu-contrastive``
(convolutional autoencoders); ``mamba-semi`` (dual-branch Mamba, semi-supervised from ``mamba.labelled``
ground-truth pixels); ``lsmm-head`` (an exported backbone + KARMA's abundance head).

Data. Any scene file the readers load (reader options under ``data.reader``); its ``endmembers`` and
``abundances``, where present, are the ground truth. A ``.npz`` with ground truth but no cube (Urban's) becomes a
semi-real scene: cube = abundances x endmembers plus white Gaussian noise at ``data.snr_db`` (fixed by
``data.noise_seed``, the same for every run). The ground truth is read only for scoring: a method gets the pixels
and R and nothing else. R (``data.num_endmembers``) defaults to the ground truth's count and is required without it.

Scores (``hsfm_train.metrics``): SAD per endmember and mean (radians, Hungarian matching), abundance RMSE,
reconstruction RMSE; per run (seeds ``seed`` .. ``seed + runs - 1``), then mean +- std over runs.
Outputs in ``output_dir``: summary.json, runs/run_NNN.npz (endmembers [R, B], abundances [H, W, R], matched to the
ground truth's order when there is one) and figures/run_NNN_{endmembers,abundances}.png.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hsfm_train.config import compose, free_mapping_overrides
from hsfm_train.errors import ConfigError, DataFormatError
from hsfm_train.engine.run_records import finished_run, run_arrays_path, torch_device, write_run_record
from hsfm_train.io import write_atomic, write_json_atomic
from hsfm_train.metrics import summarise_runs, unmixing_scores
from hsfm_train.stages.base import Stage, register_stage
from hsfm_train.unmixing import METHODS, LabelledPixels, UnmixingInput
from hsfm_train.unmixing.classical import LabelledALSConfig, NMFConfig
from hsfm_train.unmixing.cnnaeu import CNNAEUConfig, ContrastiveConfig
from hsfm_train.unmixing.lsmm_head import LSMMHeadConfig
from hsfm_train.unmixing.mamba_semi import MambaSemiConfig


@dataclass
class UnmixDataConfig:
    scene: str = "???"  # a scene file; with endmembers + abundances for scoring
    reader: dict[str, Any] = field(default_factory=dict)  # read_scene options, as in `hsfm shards build` manifests
    num_endmembers: int | None = None  # R; default: the ground truth's count
    snr_db: float | None = None  # a ground-truth-only .npz: the SNR of the semi-real cube built from it
    noise_seed: int = 0


@dataclass
class UnmixConfig:
    data: UnmixDataConfig = field(default_factory=UnmixDataConfig)
    method: str = "vca-fcls"
    runs: int = 25
    name: str = "unmix"
    output_dir: str = "runs/unmix"
    seed: int = 0
    figures: bool = True
    device: str = "auto"  # the learned methods: "auto" (CUDA when there is one), "cpu", "cuda", "cuda:1", ...
    nmf: NMFConfig = field(default_factory=NMFConfig)
    als: LabelledALSConfig = field(default_factory=LabelledALSConfig)
    cnnaeu: CNNAEUConfig = field(default_factory=CNNAEUConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    mamba: MambaSemiConfig = field(default_factory=MambaSemiConfig)
    lsmm: LSMMHeadConfig = field(default_factory=LSMMHeadConfig)

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.runs < 1:
            problems.append(f"runs must be >= 1, got {self.runs}")
        for section in (self.nmf, self.als, self.cnnaeu, self.contrastive, self.mamba, self.lsmm):
            problems += section.problems()
        if self.data.num_endmembers is not None and self.data.num_endmembers < 2:
            problems.append(f"data.num_endmembers must be >= 2, got {self.data.num_endmembers}")
        if problems:
            raise ConfigError("unmix: " + "; ".join(problems))


@dataclass
class UnmixingScene:
    """What a method sees (pixels, R, the image shape, wavelengths) and, apart, what only scoring sees."""
    pixels: np.ndarray  # [P, B] float32
    shape: tuple[int, int]
    count: int
    wavelengths_nm: np.ndarray | None
    name: str
    true_endmembers: np.ndarray | None = None  # [R, B]
    true_abundances: np.ndarray | None = None  # [P, R]
    endmember_names: list[str] | None = None


def load_unmixing_scene(config: UnmixDataConfig) -> UnmixingScene:
    path = Path(config.scene)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such scene file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            has_cube = "cube" in arrays.files
        if not has_cube:
            return _semi_real_scene(path, config)
    from hsfm_train.data.readers import read_scene

    scene = read_scene(path, **config.reader)
    height, width, bands = scene.cube.shape
    truth_e = scene.endmembers
    truth_a = scene.abundances.reshape(height * width, -1) if scene.abundances is not None else None
    count = _endmember_count(config, truth_e, path)
    return UnmixingScene(scene.cube.reshape(-1, bands).astype(np.float32), (height, width), count,
                         scene.wavelengths_nm, scene.name, truth_e, truth_a, scene.endmember_names)


def _semi_real_scene(path: Path, config: UnmixDataConfig) -> UnmixingScene:
    """Ground truth without a cube: abundances x endmembers + white Gaussian noise at data.snr_db."""
    with np.load(path, allow_pickle=False) as arrays:
        missing = [key for key in ("endmembers", "abundances") if key not in arrays.files]
        if missing:
            raise DataFormatError(f"{path}: no cube, and no {' / '.join(missing)} to build a semi-real one from")
        endmembers = arrays["endmembers"].astype(np.float64)
        abundances = arrays["abundances"].astype(np.float64)
        names = [str(n) for n in arrays["endmember_names"]] if "endmember_names" in arrays.files else None
        wavelengths = arrays["wavelengths_nm"] if "wavelengths_nm" in arrays.files else None
    if config.snr_db is None:
        raise ConfigError(f"unmix: {path} holds ground truth but no cube; set data.snr_db (e.g. 30 or 20) to unmix "
                          "the semi-real scene built from it")
    if abundances.ndim != 3 or abundances.shape[-1] != len(endmembers):
        raise DataFormatError(f"{path}: abundances must be [H, W, R] with R = {len(endmembers)} endmembers, got "
                              f"{abundances.shape}")
    height, width, _ = abundances.shape
    wavelengths = _semi_real_wavelengths(path, config.reader, wavelengths, endmembers.shape[1])
    flat = abundances.reshape(-1, len(endmembers))
    clean = flat @ endmembers
    sigma = np.sqrt(np.mean(clean ** 2) / 10 ** (config.snr_db / 10))
    noisy = clean + np.random.default_rng(config.noise_seed).normal(0.0, sigma, clean.shape)
    count = _endmember_count(config, endmembers, path)
    return UnmixingScene(noisy.astype(np.float32), (height, width), count, wavelengths,
                         f"{path.stem} at {config.snr_db:g} dB", endmembers.astype(np.float32),
                         flat.astype(np.float32), names)


SEMI_REAL_READER_OPTIONS = ("wavelengths_nm", "sensor_preset", "preset_bands")


def _semi_real_wavelengths(path: Path, reader: dict[str, Any], stored: np.ndarray | None, bands: int
                           ) -> np.ndarray | None:
    """Band centres of a ground-truth-only file: its own ``wavelengths_nm``, or given under data.reader
    (``wavelengths_nm``, or ``sensor_preset`` [+ ``preset_bands``], e.g. hydice_urban162 for Urban)."""
    unknown = sorted(set(reader) - set(SEMI_REAL_READER_OPTIONS))
    if unknown:
        raise ConfigError(f"unmix: data.reader.{unknown[0]} does not apply to {path} (ground truth without a cube); "
                          f"options there: {', '.join(SEMI_REAL_READER_OPTIONS)}")
    if "wavelengths_nm" in reader and "sensor_preset" in reader:
        raise ConfigError("unmix: give data.reader.wavelengths_nm or data.reader.sensor_preset, not both")
    if "preset_bands" in reader and "sensor_preset" not in reader:
        raise ConfigError("unmix: data.reader.preset_bands needs data.reader.sensor_preset")
    if "sensor_preset" in reader:
        from hsfm_train.data import sensors

        given, _, _ = sensors.select_bands(reader["sensor_preset"], reader.get("preset_bands"))
        where = f"sensor preset {reader['sensor_preset']!r}"
    elif "wavelengths_nm" in reader:
        given, where = np.asarray(reader["wavelengths_nm"], dtype=np.float64).reshape(-1), "data.reader.wavelengths_nm"
    else:
        return stored
    if len(given) != bands:
        raise ConfigError(f"unmix: {where} gives {len(given)} band centres, but {path}'s endmembers have {bands} bands")
    return np.asarray(given, dtype=np.float32)


def _endmember_count(config: UnmixDataConfig, truth: np.ndarray | None, path: Path) -> int:
    if config.num_endmembers is not None:
        return config.num_endmembers
    if truth is None:
        raise ConfigError(f"unmix: {path} has no ground-truth endmembers; set data.num_endmembers")
    return len(truth)


# settings that do not change what a run computes: a finished run is reused when everything else matches
_NOT_IN_RUN_IDENTITY = ("runs", "output_dir", "figures", "name")


def run_identity(config: UnmixConfig) -> dict[str, Any]:
    identity = {key: value for key, value in asdict(config).items() if key not in _NOT_IN_RUN_IDENTITY}
    identity["device"] = str(torch_device(config.device))  # as resolved: "auto" on a CPU machine is "cpu"
    return identity


def run_unmixing(config: UnmixConfig) -> dict[str, Any]:
    """Every run, each written as soon as it ends (runs/run_NNN.npz + .json, then a partial summary.json), so an
    interrupted job loses at most the run in progress: a rerun with the same settings reuses the finished runs."""
    scene = load_unmixing_scene(config.data)
    method = METHODS[config.method]
    labelled = method.labelled_pixels(config)
    output = Path(config.output_dir)
    scored = scene.true_endmembers is not None and len(scene.true_endmembers) == scene.count
    identity = run_identity(config)
    runs: list[dict[str, Any]] = []
    reused = 0
    for number in range(config.runs):
        seed = config.seed + number
        finished = finished_run(output, number, identity)
        if finished is not None:
            runs.append(finished)
            reused += 1
            continue
        inputs = UnmixingInput(scene.pixels, scene.shape, scene.count, scene.wavelengths_nm,
                               labelled_pixels(scene, labelled, seed) if labelled else None)
        started = time.perf_counter()
        endmembers, abundances = method.fit(inputs, seed, config)  # the ground truth stays here
        seconds = time.perf_counter() - started
        scores = unmixing_scores(endmembers, abundances, scene.pixels,
                                 scene.true_endmembers if scored else None,
                                 scene.true_abundances if scored else None)
        order = np.asarray(scores.get("order", range(scene.count)))
        endmembers, abundances = endmembers[order], abundances[:, order]
        _write_run(output, number, endmembers, abundances.reshape(*scene.shape, -1))
        if config.figures:
            _figures(output, number, scene, endmembers, abundances, scores)
        runs.append({"seed": seed, "seconds": seconds, **scores})
        write_run_record(output, number, identity, runs[-1])
        if number + 1 < config.runs:
            write_json_atomic(output / "summary.json", _summary(config, scene, labelled, scored, runs, reused))
    return _summary(config, scene, labelled, scored, runs, reused)


def _summary(config: UnmixConfig, scene: UnmixingScene, labelled: int, scored: bool, runs: list[dict[str, Any]],
             reused: int) -> dict[str, Any]:
    return {"method": config.method, "labelled_pixels": labelled, "scene": str(config.data.scene),
            "scene_name": scene.name, "endmembers": scene.count, "pixels": len(scene.pixels),
            "bands": scene.pixels.shape[1], "endmember_names": scene.endmember_names, "scored": scored,
            "complete": len(runs) == config.runs, "runs_reused": reused, **summarise_runs(runs),
            "seconds_per_run": float(np.mean([run["seconds"] for run in runs])), "per_run": runs,
            "config": asdict(config)}


def labelled_pixels(scene: UnmixingScene, count: int, seed: int) -> LabelledPixels:
    """``count`` pixels drawn uniformly without replacement (``default_rng(seed)``), with their ground-truth
    abundances: the only ground truth a semi-supervised method is given."""
    if scene.true_abundances is None or scene.true_abundances.shape[1] != scene.count:
        raise ConfigError(f"unmix: this method is given {count} labelled pixels, but {scene.name} has no ground-truth "
                          f"abundances with R = {scene.count} endmembers to label them from")
    if count > len(scene.pixels):
        raise ConfigError(f"unmix: {count} labelled pixels asked for, but the scene has {len(scene.pixels)}")
    indices = np.sort(np.random.default_rng(seed).choice(len(scene.pixels), size=count, replace=False))
    return LabelledPixels(indices, scene.true_abundances[indices].copy())


def _write_run(output: Path, number: int, endmembers: np.ndarray, abundances: np.ndarray) -> None:
    path = run_arrays_path(output, number)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.savez(handle, endmembers=endmembers.astype(np.float32), abundances=abundances.astype(np.float32))
    write_atomic(path, write)


def _figures(output: Path, number: int, scene: UnmixingScene, endmembers: np.ndarray, abundances: np.ndarray,
             scores: dict[str, Any]) -> None:
    from hsfm_train.figures import abundance_maps_figure, endmembers_figure

    sad = f", mean SAD {scores['sad_mean']:.4f} rad" if "sad_mean" in scores else ""
    title = f"{scene.name}: run {number}{sad}"
    endmembers_figure(output / "figures" / f"run_{number:03d}_endmembers.png", endmembers, scene.true_endmembers,
                      scene.wavelengths_nm, scene.endmember_names, title)
    truth = scene.true_abundances.reshape(*scene.shape, -1) if scene.true_abundances is not None else None
    abundance_maps_figure(output / "figures" / f"run_{number:03d}_abundances.png",
                          abundances.reshape(*scene.shape, -1), truth, scene.endmember_names, title)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['method']} on {summary['scene_name']} ({summary['pixels']} pixels, {summary['bands']} bands, "
             f"R = {summary['endmembers']}), {summary['runs']} runs, {summary['seconds_per_run']:.2f} s per run"]
    if summary.get("scored"):
        lines.append(f"  mean SAD {summary['sad_mean']:.4f} +- {summary['sad_std']:.4f} rad; per endmember "
                     + ", ".join(f"{v:.4f}" for v in summary["sad_per_endmember"]))
        if "abundance_rmse_mean" in summary:
            lines.append(f"  abundance RMSE {summary['abundance_rmse_mean']:.4f} +- {summary['abundance_rmse_std']:.4f}")
    else:
        lines.append("  no ground truth with R endmembers in the scene: nothing to score against")
    lines.append(f"  reconstruction RMSE {summary['reconstruction_rmse_mean']:.4f} +- "
                 f"{summary['reconstruction_rmse_std']:.4f}")
    return "\n".join(lines)


@register_stage
class UnmixStage(Stage):
    name = "unmix"
    help = "unmix a scene (endmembers + abundances) and score it against its ground truth over several runs"
    config_class = UnmixConfig

    @classmethod
    def load_config(cls, overrides: list[str] | None = None) -> UnmixConfig:
        return compose(cls.name, free_mapping_overrides(list(overrides or []), ("data.reader",)), UnmixConfig)

    def run(self) -> dict[str, Any]:
        return run_unmixing(self.config)

    def format_summary(self, summary: dict[str, Any]) -> str:
        return f"{format_summary(summary)}\nsummary: {Path(self.config.output_dir) / 'summary.json'}"
