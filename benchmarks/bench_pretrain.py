"""Pretraining step cost: the KARMA objective against plain MAE, and how the step scales with bands and tile size.

What is measured (all in one run, so the ratios are robust on a noisy machine):

* KARMA vs MAE: one training step = masked forward + objective + backward + AdamW step + zero_grad, on the same
  model size, batch and data. MAE is the ``objective/mae.yaml`` preset (masked MSE, no LSMM head); KARMA is
  ``objective/karma.yaml`` (Huber + spectral angle + LSMM physics, which also turns on the model's LSMM head).
  The paper reports +31.7% per sample for KARMA (9.47 vs 7.19 ms). Gradient clipping, the scheduler and the data
  loader are left out: the trainer's step has them for both objectives alike.
* bands: the MAE step at 50..400 bands over 400-2500 nm, fixed tile.
* tile: the MAE step at several tile sizes, fixed band count.
* terms (``--sections terms``, not run by default): each objective term alone, forward + backward from a leaf
  (the model's prediction, or the LSMM abundances for the physics term) on the KARMA model's output for the
  section-1 batch, and the LSMM head; where the KARMA/MAE difference comes from.

Data are synthetic: per sample a few smooth "endmember" spectra (sums of Gaussians over wavelength) mixed by
smooth per-pixel abundances, normalised per band, as the loader delivers them. Within each section the cases are
interleaved (A B A B ...) after ``--warmup`` steps each, and medians over ``--repeats`` are reported. On CUDA the
step runs under bf16 autocast (as the trainer does), with torch.cuda.synchronize around each timing, and the
peak memory of one extra step per case is reported: "peak MB" as allocated (both section-1 models, their AdamW
states and the batches included), "step MB" above what was allocated when the step began (activations, gradients,
optimiser temporaries). "saved MB" is, on every device, the bytes autograd keeps for backward during the forward +
objective (unique storages; parameters and the input batch excluded, autocast's bf16 weight copies included).
On CPU peak memory is not reported (RSS growth is not a reliable measure); "saved MB" stands in for it.
The script always exits 0: it is a measurement, not a test.

    python benchmarks/bench_pretrain.py                    # tiny model, batch 16, tile 32, 224 bands
    python benchmarks/bench_pretrain.py --model base --batch 64 --tile 64 --json out.json
    python benchmarks/bench_pretrain.py --quick            # smoke run, < 1 min on CPU
    python benchmarks/bench_pretrain.py --model small --sections objective --repeats 30   # KARMA vs MAE only
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from hsfm_train.config import CONFIG_DIR, to_dataclass
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.objectives.pretrain import ObjectiveConfig, PretrainObjective
from hsfm_train.objectives.reconstruction import masked_huber, masked_mse
from hsfm_train.objectives.spectral import lsmm_physics, masked_spectral_angle

PAPER = {"mae_ms_per_sample": 7.19, "karma_ms_per_sample": 9.47}  # KARMA paper: +31.7%
BAND_COUNTS = (50, 100, 200, 300, 400)
DEFAULTS = {"model": "tiny", "batch": 16, "tile": 32, "bands": 224, "repeats": 10, "warmup": 3}
SECTIONS = ("objective", "bands", "tiles", "terms")
QUICK = {"model": "tiny", "batch": 4, "tile": 16, "bands": 224, "repeats": 5, "warmup": 2, "tiles": "16,32"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "small", "base", "large", "huge"), help="preset (tiny)")
    parser.add_argument("--batch", type=int, help="samples per step (16)")
    parser.add_argument("--tile", type=int, help="tile size of the KARMA/MAE and band sections (32)")
    parser.add_argument("--bands", type=int, help="bands over 380-2500 nm in the KARMA/MAE and tile sections (224)")
    parser.add_argument("--tiles", help="comma-separated tile sizes (16,32,64 on CPU; 16,32,64,128 on CUDA)")
    parser.add_argument("--repeats", type=int, help="timed steps per case (10)")
    parser.add_argument("--warmup", type=int, help="untimed steps per case first (3; at least 1)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: torch's; 1 is steadier on a busy machine)")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, tile 16, tiles 16,32, 5 repeats")
    parser.add_argument("--sections", default="objective,bands,tiles",
                        help="comma-separated sections to run (objective,bands,tiles,terms; default the first three)")
    parser.add_argument("--json", help="write all numbers to this JSON file")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown or not args.sections:
        parser.error(f"--sections takes a comma-separated subset of {', '.join(SECTIONS)}, got {args.sections}")
    return args


def load_yaml(path: Path) -> Any:
    """A config file with its ``defaults`` list resolved (other files of the same folder merged under it)."""
    config = OmegaConf.load(path)
    defaults = list(config.pop("defaults", None) or [])
    merged = OmegaConf.create()
    for entry in defaults + ([] if "_self_" in defaults else ["_self_"]):
        merged = OmegaConf.merge(merged, config if entry == "_self_" else load_yaml(path.parent / f"{entry}.yaml"))
    return merged


def presets(model_name: str) -> dict[str, tuple[ModelConfig, ObjectiveConfig]]:
    model = load_yaml(CONFIG_DIR / "model" / f"{model_name}.yaml")
    karma = load_yaml(CONFIG_DIR / "objective" / "karma.yaml")  # @package _global_: objective + model overrides
    return {"mae": (to_dataclass(ModelConfig, model, "model"),
                    to_dataclass(ObjectiveConfig, load_yaml(CONFIG_DIR / "objective" / "mae.yaml"), "objective")),
            "karma": (to_dataclass(ModelConfig, OmegaConf.merge(model, karma.model), "model"),
                      to_dataclass(ObjectiveConfig, karma.objective, "objective"))}


def synthetic_batch(n: int, bands: int, tile: int, start_nm: float, stop_nm: float, device: torch.device,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Smooth positive reflectance: 4 endmembers (3 Gaussians each over wavelength) mixed by smooth abundances."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.linspace(start_nm, stop_nm, bands)
    centres = start_nm + (stop_nm - start_nm) * torch.rand(n, 4, 3, 1, generator=g)
    widths = 50 + 300 * torch.rand(n, 4, 3, 1, generator=g)
    heights = 0.4 * torch.rand(n, 4, 3, 1, generator=g)
    spectra = 0.05 + (heights * torch.exp(-0.5 * ((lam - centres) / widths) ** 2)).sum(dim=2)  # [n, 4, B]
    coarse = torch.randn(n, 4, max(2, tile // 8), max(2, tile // 8), generator=g)
    logits = torch.nn.functional.interpolate(coarse, size=(tile, tile), mode="bilinear", align_corners=False)
    hsi = torch.einsum("nmb,nmhw->nbhw", spectra, (2 * logits).softmax(dim=1))
    mean, std = hsi.mean(dim=(0, 2, 3)), hsi.std(dim=(0, 2, 3)).clamp_min(1e-6)
    batch = {"hsi": (hsi - mean[:, None, None]) / std[:, None, None], "wavelengths": lam.expand(n, -1).clone(),
             "band_mask": torch.ones(n, bands, dtype=torch.bool),
             "band_mean": mean.expand(n, -1).clone(), "band_std": std.expand(n, -1).clone()}
    return {key: value.to(device) for key, value in batch.items()}


@dataclass
class Case:
    name: str
    model: SpectralMAE
    optimizer: torch.optim.Optimizer
    objective: PretrainObjective
    batch: dict[str, torch.Tensor]
    seconds: list[float] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)


class Runner:
    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.step_number = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def forward(self, case: Case, generator: torch.Generator):
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()
        with autocast:
            b = case.batch
            out = case.model(b["hsi"], b["wavelengths"], b["band_mask"], generator=generator)
            loss, _ = case.objective(case.model, out, b)
        return out, loss

    def step(self, case: Case) -> Any:
        self.step_number += 1  # a fresh mask every step, as in training (a CPU generator, as the trainer uses)
        out, loss = self.forward(case, torch.Generator().manual_seed(self.step_number))
        loss.backward()
        case.optimizer.step()
        case.optimizer.zero_grad(set_to_none=True)
        return out

    def timed(self, case: Case) -> float:
        self.sync()
        start = time.perf_counter()
        self.step(case)
        self.sync()
        return time.perf_counter() - start

    def saved_bytes(self, case: Case) -> int:
        """Bytes of the unique storages autograd saves for backward (parameters and input batch excluded)."""
        skip = {t.untyped_storage().data_ptr() for t in [*case.model.parameters(), *case.batch.values()]}
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in skip:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            _, loss = self.forward(case, torch.Generator().manual_seed(0))
        loss.backward()
        case.optimizer.zero_grad(set_to_none=True)
        return sum(seen.values())

    def run(self, cases: list[Case], warmup: int, repeats: int) -> None:
        for case in cases:
            for _ in range(max(1, warmup)):  # at least one: it also reads the token count
                out = self.step(case)
            case.row["tokens_per_sample"] = out.token_mask.shape[1] * out.token_mask.shape[2]
        for _ in range(repeats):  # interleaved, so a slow spell of the machine hits every case alike
            for case in cases:
                case.seconds.append(self.timed(case))
        for case in cases:
            n = case.batch["hsi"].shape[0]
            ms = 1e3 * statistics.median(case.seconds)
            case.row.update(ms_per_step=ms, ms_per_sample=ms / n, best_ms_per_step=1e3 * min(case.seconds),
                            seconds=case.seconds, saved_MB=self.saved_bytes(case) / 2**20)
            if self.cuda:
                self.sync()
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
                self.step(case)
                self.sync()
                peak = torch.cuda.max_memory_allocated(self.device)
                case.row.update(peak_MB=peak / 2**20, step_peak_MB=(peak - before) / 2**20)


def print_section(title: str, cases: list[Case], key: str, cuda: bool) -> dict[str, Any]:
    base = cases[0].row
    print(f"\n{title}")
    header = (f"{key:>8} {'tokens':>6} {'ms/step':>8} {'best':>8} {'ms/sample':>9} {'time x':>7} {'saved MB':>8} "
              f"{'saved x':>7}" + (f" {'peak MB':>8} {'step MB':>8} {'step x':>7}" if cuda else ""))
    print(header + "\n" + "-" * len(header))
    for case in cases:
        r = case.row
        r["relative_time"] = r["ms_per_step"] / base["ms_per_step"]
        r["relative_saved"] = r["saved_MB"] / base["saved_MB"]
        line = (f"{case.name:>8} {r['tokens_per_sample']:6d} {r['ms_per_step']:8.1f} {r['best_ms_per_step']:8.1f} "
                f"{r['ms_per_sample']:9.2f} {r['relative_time']:6.2f}x {r['saved_MB']:8.1f} "
                f"{r['relative_saved']:6.2f}x")
        if cuda:
            r["relative_step_peak"] = r["step_peak_MB"] / base["step_peak_MB"]
            line += f" {r['peak_MB']:8.0f} {r['step_peak_MB']:8.0f} {r['relative_step_peak']:6.2f}x"
        print(line)
    print(f"tokens: per sample; x: relative to the first row ({cases[0].name})")
    return {case.name: case.row for case in cases}


def time_terms(runner: Runner, case: Case, repeats: int) -> dict[str, dict[str, float]]:
    """Each objective term alone (forward + backward from a leaf copy of its input) on one output of the case's
    model, and the LSMM head; median and fastest of ``repeats`` after 3 untimed calls."""
    model, batch = case.model, case.batch
    with torch.no_grad():
        out = model(batch["hsi"], batch["wavelengths"], batch["band_mask"], generator=torch.Generator().manual_seed(0))
    hsi, band_mask = batch["hsi"], batch["band_mask"]
    prediction, abundances, features = out.prediction.float(), out.abundances, out.decoder_features

    def from_prediction(term):
        def call():
            out.prediction = prediction.clone().requires_grad_(True)
            term().backward()
        return call

    def physics():
        out.abundances = abundances.clone().requires_grad_(True)
        lsmm_physics(out, model.lsmm, hsi, batch["wavelengths"], batch["band_mean"], batch["band_std"],
                     band_mask).backward()

    def head():
        model.lsmm.abundances(features.clone().requires_grad_(True).mean(dim=1)).sum().backward()

    calls = {"mse": from_prediction(lambda: masked_mse(out, hsi, band_mask)),
             "huber": from_prediction(lambda: masked_huber(out, hsi, band_mask)),
             "sam": from_prediction(lambda: masked_spectral_angle(out, out.prediction, hsi, band_mask,
                                                                  batch["band_mean"], batch["band_std"])),
             "physics": physics, "lsmm head": head,
             "leaf copy": from_prediction(lambda: out.prediction.sum())}  # the copy every prediction case pays
    rows = {}
    for name, call in calls.items():
        seconds = []
        for index in range(3 + repeats):
            runner.sync()
            start = time.perf_counter()
            call()
            runner.sync()
            if index >= 3:
                seconds.append(time.perf_counter() - start)
        rows[name] = {"ms": 1e3 * statistics.median(seconds), "best_ms": 1e3 * min(seconds)}
    model.zero_grad(set_to_none=True)
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    args.tiles = args.tiles or ("16,32,64,128" if cuda else "16,32,64")
    tiles = [int(t) for t in args.tiles.split(",")]
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"device: {device} ({device_name(device)}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'bf16 autocast' if cuda else 'fp32'}")
    print(f"model {args.model}, batch {args.batch}, tile {args.tile}, bands {args.bands}, tiles {tiles}, "
          f"warm-up {args.warmup}, repeats {args.repeats} (medians; 'best' = fastest step)")
    results: dict[str, Any] = {"command": sys.argv, "device": str(device), "device_name": device_name(device),
                               "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    try:
        runner, cases = Runner(device), {}
        for name, (model_config, objective_config) in presets(args.model).items():
            torch.manual_seed(0)
            model = SpectralMAE(model_config).to(device).train()
            objective = PretrainObjective(objective_config)
            objective.check_model(model)
            cases[name] = Case(name, model, torch.optim.AdamW(model.parameters(), lr=1e-4), objective,
                               synthetic_batch(args.batch, args.bands, args.tile, 380.0, 2500.0, device))
            results.setdefault("parameters", {})[name] = sum(p.numel() for p in model.parameters())
        mae = cases["mae"]

        if "objective" in args.sections:
            runner.run(list(cases.values()), args.warmup, args.repeats)
            results["objective"] = print_section(f"1. objective ({args.bands} bands, tile {args.tile})",
                                                 list(cases.values()), "case", cuda)
            ratio = cases["karma"].row["ms_per_step"] / mae.row["ms_per_step"]
            best_ratio = cases["karma"].row["best_ms_per_step"] / mae.row["best_ms_per_step"]
            paper = PAPER["karma_ms_per_sample"] / PAPER["mae_ms_per_sample"]
            results["karma_over_mae"], results["paper_karma_over_mae"] = ratio, paper
            results["karma_over_mae_best"] = best_ratio
            print(f"KARMA costs {100 * (ratio - 1):+.1f}% per step over MAE (fastest steps: "
                  f"{100 * (best_ratio - 1):+.1f}%; paper: {100 * (paper - 1):+.1f}%, "
                  f"{PAPER['karma_ms_per_sample']} vs {PAPER['mae_ms_per_sample']} ms per sample); parameters "
                  f"MAE {results['parameters']['mae']:,}, KARMA {results['parameters']['karma']:,}")

        if "bands" in args.sections:
            band_cases = [Case(str(b), mae.model, mae.optimizer, mae.objective,
                               synthetic_batch(args.batch, b, args.tile, 400.0, 2500.0, device)) for b in BAND_COUNTS]
            runner.run(band_cases, args.warmup, args.repeats)
            results["bands"] = print_section(f"2. band count (MAE, tile {args.tile}, 400-2500 nm)", band_cases,
                                             "bands", cuda)
            print("note: the tokenizer is wavelength-conditioned (bands are integrated against learned spectral "
                  "response functions), so the token count does not depend on the band count; cost grows only "
                  "through the per-band embedding/decoding einsums and the per-band loss, which are linear in bands")

        if "tiles" in args.sections:
            tile_cases = [Case(str(t), mae.model, mae.optimizer, mae.objective,
                               synthetic_batch(args.batch, args.bands, t, 380.0, 2500.0, device)) for t in tiles]
            runner.run(tile_cases, args.warmup, args.repeats)
            results["tiles"] = print_section(f"3. tile size (MAE, {args.bands} bands)", tile_cases, "tile", cuda)
            print(f"tokens per sample = spectral groups x (tile / patch {mae.model.config.patch_size})^2; the "
                  f"encoder sees {100 * (1 - mae.model.config.mask_ratio):.0f}% of them")
        if "terms" in args.sections:
            results["terms"] = time_terms(runner, cases["karma"], args.repeats)
            print(f"\n4. objective terms alone, forward + backward (KARMA model's output, {args.bands} bands, "
                  f"tile {args.tile})\n{'term':>10} {'ms':>8} {'best':>8}\n" + "-" * 28)
            for name, row in results["terms"].items():
                print(f"{name:>10} {row['ms']:8.2f} {row['best_ms']:8.2f}")
            print("mse, huber and sam include the leaf copy of the prediction")
        if not cuda:
            print("memory: peak memory is reported on CUDA only (RSS growth on CPU is not reliable); 'saved MB' is "
                  "the activation memory autograd holds for backward")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
            print(f"wrote {args.json}")
    except Exception as error:  # a measurement: report, never fail the caller
        print(f"benchmark failed: {type(error).__name__}: {error}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
