"""Unmixing benchmarks: one run of every ``hsfm unmix`` method on a scene, and how the mamba-semi model's training
step grows with the scene.

* methods: wall time of one run (``method.fit``, as ``hsfm unmix`` calls it, with the labelled pixels it asks for)
  of each method in ``hsfm_train.unmixing.METHODS`` on ``--scene`` (default: Samson), with its scores (mean SAD,
  abundance RMSE, reconstruction RMSE). ``--epochs-scale`` multiplies every ``epochs`` / ``iterations`` setting
  (so the learned methods can run short); ``--override KEY=VALUE`` (repeatable) passes any ``hsfm unmix``
  override. ``lsmm-head`` needs an exported backbone (``--backbone EXPORT``) and is skipped without one; a method
  that fails is reported with its error and the others still run.
* mamba-scaling: the mamba-semi model's time per full-image training step (median of ``--steps`` after one
  warm-up) and peak memory as the scene grows (``--sizes``, square scenes tiled from the scene's cube), with
  time and memory per pixel, so linearity in the number of pixels shows. Peak memory: CUDA
  ``torch.cuda.max_memory_allocated`` over the steps minus what was allocated before; CPU: each size runs in a
  child process and reports its peak resident set over the steps (the kernel's high-water mark, reset before the
  first step) minus its resident set before the first step.

Times on a shared CPU are noisy: read the ratios between rows of one run.

    python benchmarks/bench_unmix.py                                   # both sections, full settings
    python benchmarks/bench_unmix.py --sections methods --epochs-scale 0.1 --override mamba.features=32
    python benchmarks/bench_unmix.py --sections mamba-scaling --sizes 32,64,128,256 --steps 3
    python benchmarks/bench_unmix.py --quick                           # tiny sizes, seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
SECTIONS = ("methods", "mamba-scaling")
SHARED_DATA = Path(os.environ.get("HSFM_SHARED_DATA", REPO.parent / "shared" / "data"))
# --quick: a crop, few steps and a small network, so every section runs in seconds
QUICK = {"crop": 30, "epochs_scale": 0.01, "sizes": "8,16", "steps": 1,
         "override": ["mamba.features=8", "mamba.d_state=4", "mamba.pooled_size=4"]}


def say(text: str = "") -> None:
    print(text, flush=True)


def scene_path(args: argparse.Namespace) -> Path:
    path = Path(args.scene) if args.scene else SHARED_DATA / "unmixing" / "samson" / "samson.npz"
    if not path.exists():
        raise SystemExit(f"{path}: no such scene (pass --scene)")
    return path


def cropped_scene(args: argparse.Namespace, scratch: Path) -> Path:
    """The scene, or its top-left --crop x --crop pixels (with the ground truth) as a temporary .npz."""
    path = scene_path(args)
    if not args.crop:
        return path
    with np.load(path, allow_pickle=False) as arrays:
        if "cube" not in arrays.files:
            raise SystemExit(f"{path}: --crop needs a scene with a cube")
        cut = {key: arrays[key][: args.crop, : args.crop] if key in ("cube", "abundances") else arrays[key]
               for key in arrays.files}
    out = scratch / f"{path.stem}_crop{args.crop}.npz"
    np.savez(out, **cut)
    return out


def method_overrides(config_class, args: argparse.Namespace) -> list[str]:
    """``--epochs-scale`` applied to every ``epochs`` / ``iterations`` field of every config section."""
    if args.epochs_scale == 1.0:
        return []
    overrides = []
    for section in dataclasses.fields(config_class):
        default = section.default_factory() if section.default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(default):
            continue
        for name in ("epochs", "iterations"):
            value = getattr(default, name, None)
            if isinstance(value, int):
                overrides.append(f"{section.name}.{name}={max(1, round(value * args.epochs_scale))}")
    return overrides


# ------------------------------------------------------------------------------------------------------ methods

def run_methods(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from hsfm_train.metrics import unmixing_scores
    from hsfm_train.stages.unmix import UnmixConfig, UnmixStage, labelled_pixels, load_unmixing_scene
    from hsfm_train.unmixing import METHODS, UnmixingInput

    scene_file = cropped_scene(args, scratch)
    common = [f"data.scene={scene_file}", f"device={args.device}", f"seed={args.seed}",
              *method_overrides(UnmixConfig, args), *args.override]
    if args.backbone:
        common.append(f"lsmm.backbone={args.backbone}")
    chosen = args.methods or list(METHODS)
    rows: dict[str, Any] = {}
    scene = None
    for name in chosen:
        overrides = [f"method={name}", *common]
        row: dict[str, Any] = {"command": shlex.join(["python", "-m", "hsfm_train.cli", "unmix", *overrides,
                                                      "runs=1"])}
        rows[name] = row
        if name not in METHODS:
            row["skipped"] = f"not one of the registered methods ({', '.join(METHODS)})"
            continue
        if name == "lsmm-head" and not args.backbone:
            row["skipped"] = "needs an exported backbone: pass --backbone EXPORT"
            continue
        try:
            config = UnmixStage.load_config(overrides)
            scene = scene or load_unmixing_scene(config.data)
            method = METHODS[name]
            count = method.labelled_pixels(config)
            inputs = UnmixingInput(scene.pixels, scene.shape, scene.count, scene.wavelengths_nm,
                                   labelled_pixels(scene, count, config.seed) if count else None)
            started = time.perf_counter()
            endmembers, abundances = method.fit(inputs, config.seed, config)
            row["seconds"] = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001 - a benchmark reports what it cannot run and goes on
            row["skipped"] = f"{type(error).__name__}: {error}"
            continue
        scored = scene.true_endmembers is not None and len(scene.true_endmembers) == scene.count
        scores = unmixing_scores(endmembers, abundances, scene.pixels, scene.true_endmembers if scored else None,
                                 scene.true_abundances if scored else None)
        row.update({key: scores[key] for key in ("sad_mean", "abundance_rmse", "reconstruction_rmse") if key in scores},
                   labelled_pixels=count, description=method.description)
    reference = next((row["seconds"] for row in rows.values() if "seconds" in row), None)
    for row in rows.values():
        if "seconds" in row and reference:
            row["vs_first"] = row["seconds"] / reference
    shape = scene.shape if scene is not None else None
    return {"scene": str(scene_file), "shape": shape, "overrides": common, "rows": rows}


def print_methods(section: dict[str, Any]) -> None:
    say(f"\n### methods: one run each on {section['scene']} ({section['shape']})\n")
    say("| method | labelled | seconds | vs first | mean SAD (rad) | abundance RMSE | reconstruction RMSE |")
    say("|---|---:|---:|---:|---:|---:|---:|")

    def number(row, key, form):
        return format(row[key], form) if row.get(key) is not None else "-"
    for name, row in section["rows"].items():
        if "skipped" in row:
            say(f"| {name} | - | skipped: {row['skipped']} | | | | |")
            continue
        say(f"| {name} | {row['labelled_pixels']} | {row['seconds']:.2f} | {number(row, 'vs_first', '.2f')}x | "
            f"{number(row, 'sad_mean', '.4f')} | {number(row, 'abundance_rmse', '.4f')} | "
            f"{number(row, 'reconstruction_rmse', '.4f')} |")
    say(f"\noverrides: {' '.join(section['overrides'])}")


# ------------------------------------------------------------------------------------------------ mamba-scaling

def tiled_input(cube: np.ndarray, size: int):
    """A size x size scene tiled (mirrored, so there are no seams) from cube [H, W, B]; 10 labelled pixels with
    made-up abundances (only the step's cost is measured here)."""
    from hsfm_train.unmixing import LabelledPixels, UnmixingInput

    height, width, bands = cube.shape
    mirrored = np.concatenate([cube, cube[::-1]], axis=0)
    mirrored = np.concatenate([mirrored, mirrored[:, ::-1]], axis=1)
    reps = (-(-size // (2 * height)), -(-size // (2 * width)), 1)
    tiled = np.tile(mirrored, reps)[:size, :size]
    rng = np.random.default_rng(0)
    indices = np.sort(rng.choice(size * size, min(10, size * size), replace=False))
    given = LabelledPixels(indices, rng.dirichlet(np.ones(3), len(indices)).astype(np.float32))
    return UnmixingInput(np.ascontiguousarray(tiled.reshape(size * size, bands), np.float32), (size, size), 3, None,
                         given)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident set (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure_steps(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time per step and peak memory of the mamba-semi model on a size x size scene, in this process."""
    import torch

    from hsfm_train.stages.unmix import UnmixStage
    from hsfm_train.engine.run_records import torch_device
    from hsfm_train.unmixing.mamba_semi import MambaUnmixing

    if args.threads:
        torch.set_num_threads(args.threads)
    config = UnmixStage.load_config([f"data.scene={scene_path(args)}", "method=mamba-semi", f"device={args.device}",
                                     *args.override])
    device = torch_device(config.device)
    with np.load(scene_path(args), allow_pickle=False) as arrays:
        cube = arrays["cube"]
    cuda = device.type == "cuda"
    # lazy imports and one-off allocations of a first step, on a tiny scene, so they stay out of the peak
    MambaUnmixing(tiled_input(cube, 4), 0, config.mamba, device).step()
    run = MambaUnmixing(tiled_input(cube, size), 0, config.mamba, device)
    before = _status_mb("VmRSS")
    resettable = not cuda and reset_peak_rss()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
    run.step()  # warm-up at this size: allocator, thread pools, Triton compilation
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        run.step()
        sync()
        times.append(time.perf_counter() - started)
    if cuda:
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        kind = "cuda max_memory_allocated"
    else:
        # VmHWM since the reset (else ru_maxrss, the process's whole-life peak, which may be the imports')
        high = _status_mb("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        peak = high - (before or 0.0) if high is not None else None
        kind = "peak RSS - RSS before the steps" + ("" if resettable else " (ru_maxrss: an upper bound)")
    step = statistics.median(times)
    return {"size": size, "pixels": size * size, "step_s": step, "us_per_pixel": step / (size * size) * 1e6,
            "peak_mb": peak, "kb_per_pixel": peak * 1024 / (size * size) if peak is not None else None,
            "memory": kind, "device": str(device),
            "features": config.mamba.features, "d_state": config.mamba.d_state, "expand": config.mamba.expand}


def run_scaling(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    import torch

    from hsfm_train.engine.run_records import torch_device

    device = torch_device(args.device)
    rows = []
    for size in args.sizes:
        command = [sys.executable, str(SCRIPT), "--worker", "--size", str(size), "--steps", str(args.steps),
                   "--device", args.device, *(["--scene", str(args.scene)] if args.scene else []),
                   *(["--threads", str(args.threads)] if args.threads else []),
                   *[f"--override={value}" for value in args.override]]
        if device.type == "cuda":  # in process: the CUDA allocator's own peak is exact
            row = measure_steps(size, args)
        else:  # a child per size, so each peak RSS is its own
            result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
            if result.returncode != 0:
                raise SystemExit(f"mamba-scaling child failed for size {size}:\n{result.stdout[-2000:]}"
                                 f"{result.stderr[-3000:]}")
            row = json.loads(result.stdout.strip().splitlines()[-1])
        row["command"] = shlex.join(["python", "benchmarks/bench_unmix.py", *command[2:]])
        rows.append(row)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    first = rows[0] if rows else None
    for row in rows:
        row["time_ratio"] = row["step_s"] / first["step_s"]
        row["pixel_ratio"] = row["pixels"] / first["pixels"]
    return {"rows": rows}


def print_scaling(section: dict[str, Any]) -> None:
    rows = section["rows"]
    if not rows:
        return
    first = rows[0]
    say(f"\n### mamba-scaling: one full-image training step of mamba-semi ({first['device']}, C = "
        f"{first['features']}, N = {first['d_state']}, expand {first['expand']}; memory: {first['memory']})\n")
    say("| scene | pixels | step (s) | us / pixel | time ratio | pixel ratio | peak MB | KB / pixel |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        memory = (f"{row['peak_mb']:.1f} | {row['kb_per_pixel']:.2f}" if row["peak_mb"] is not None else "- | -")
        say(f"| {row['size']} x {row['size']} | {row['pixels']} | {row['step_s']:.3f} | {row['us_per_pixel']:.1f} | "
            f"{row['time_ratio']:.2f} | {row['pixel_ratio']:.0f} | {memory} |")


# ---------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {','.join(SECTIONS)}")
    parser.add_argument("--scene", help="a scene file (default: shared Samson)")
    parser.add_argument("--crop", type=int, help="methods: unmix the top-left CROP x CROP pixels only")
    parser.add_argument("--methods", help="methods: comma-separated names (default: every registered method)")
    parser.add_argument("--epochs-scale", type=float, help="methods: multiply every epochs / iterations (1)")
    parser.add_argument("--override", action="append", default=None,
                        help="an `hsfm unmix` override KEY=VALUE for every run (repeatable)")
    parser.add_argument("--backbone", help="methods: an `hsfm export` directory for lsmm-head")
    parser.add_argument("--sizes", help="mamba-scaling: comma-separated square sizes (32,64,128,256)")
    parser.add_argument("--steps", type=int, help="mamba-scaling: timed steps per size (3)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per scaling child")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and settings (seconds)")
    parser.add_argument("--json", help="write every figure and the settings to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {"crop": None, "epochs_scale": 1.0, "sizes": "32,64,128,256", "steps": 3, "override": []}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick and key in QUICK else value)
        elif key == "override" and args.quick:
            args.override = QUICK["override"] + args.override
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(args.sections) - set(SECTIONS):
        parser.error(f"--sections: a subset of {','.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure_steps(args.size, args)))
        return 0
    import tempfile

    import torch

    results: dict[str, Any] = {
        "benchmark": "bench_unmix",
        "command": shlex.join(["python", "benchmarks/bench_unmix.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {key: value for key, value in vars(args).items() if key not in ("worker", "size", "json")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}
    runners = {"methods": run_methods, "mamba-scaling": run_scaling}
    printers = {"methods": print_methods, "mamba-scaling": print_scaling}
    with tempfile.TemporaryDirectory(prefix="bench_unmix-") as temporary:
        for section in args.sections:
            started = time.perf_counter()
            results[section] = runners[section](args, Path(temporary))
            results[section]["wall_s"] = time.perf_counter() - started
            printers[section](results[section])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
        say(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
