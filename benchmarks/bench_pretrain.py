"""Pretraining step cost: the KARMA objective against plain MAE, and how the step scales with bands and tile size.

What is measured (all in one run, so the ratios are robust on a noisy machine):

* KARMA vs MAE: one training step = masked forward + objective + backward + AdamW step + zero_grad, on the same
  model size, batch and data. MAE is the ``objective/mae.yaml`` preset (masked MSE, no LSMM head); KARMA is
  ``objective/karma.yaml`` (Huber + spectral angle + LSMM physics, which also turns on the model's LSMM head).
  The paper reports +31.7% per sample for KARMA (9.47 vs 7.19 ms). Gradient clipping, the scheduler and the data
  loader are left out: the trainer's step has them for both objectives alike.
* bands: the MAE step at 50..400 bands over 400-2500 nm, fixed tile.
* tile: the MAE step at several tile sizes, fixed band count.
* activation checkpointing (``--activation-checkpointing both``): each objective case of section 1 runs twice on
  the same model, optimiser and batch, as ``mae`` and ``mae+ckpt`` (every encoder and decoder block recomputed in
  backward), interleaved like the other cases; the rows show what checkpointing costs in time and saves in memory.
  ``on`` runs every section with it, ``off`` (the default) without. ``--objectives mae`` leaves KARMA out.
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
Under checkpointing "saved MB" counts the block inputs each checkpoint keeps for the recomputation (what autograd
itself saves inside a checkpointed block is dropped after its forward).
On CPU peak memory is not reported (RSS growth is not a reliable measure); "saved MB" stands in for it.

FLOPs and MFU: "GFLOP" is the matmul/attention FLOPs of one forward + backward as torch.utils.flop_counter counts
them (checkpointing off: model FLOPs, the recomputation is not counted), so MAE's visible-token encoder and the
light decoder are measured rather than assumed; "TFLOP/s" divides it by the median step. On CUDA devices with a
known bf16 peak (hsfm_train.engine.trainer.PEAK_FLOPS) "MFU" is that against the peak, and the JSON also holds
``mfu_6n``, the trainer's logged estimate (6 x parameters x all tokens per second / peak, an upper bound).

SDPA: before the sections, one attention call of the first encoder and the first decoder block is captured from
a forward (under the same autocast) and rerun with each SDPA backend alone (flash, memory-efficient, cuDNN, math)
and with flash|efficient together, forward and backward, so the log shows which backend the model's shapes and
dtypes can use and which one PyTorch picks by default (math in bf16 on CUDA would mean the fast path is lost).
The script always exits 0: it is a measurement, not a test.

    python benchmarks/bench_pretrain.py                    # tiny model, batch 16, tile 32, 224 bands
    python benchmarks/bench_pretrain.py --model base --batch 64 --tile 64 --json out.json
    python benchmarks/bench_pretrain.py --quick            # smoke run, < 1 min on CPU
    python benchmarks/bench_pretrain.py --model small --sections objective --repeats 30   # KARMA vs MAE only
    # GPU: the large model's step time, MFU and peak memory without and with activation checkpointing
    python benchmarks/bench_pretrain.py --model large --batch 128 --tile 64 --sections objective --objectives mae \\
        --activation-checkpointing both
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from hsfm_train.config import CONFIG_DIR, to_dataclass
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.models.vit import Block
from hsfm_train.objectives.pretrain import ObjectiveConfig, PretrainObjective
from hsfm_train.objectives.reconstruction import masked_huber, masked_mse
from hsfm_train.objectives.spectral import lsmm_physics, masked_spectral_angle

PAPER = {"mae_ms_per_sample": 7.19, "karma_ms_per_sample": 9.47}  # KARMA paper: +31.7%
BAND_COUNTS = (50, 100, 200, 300, 400)
DEFAULTS = {"model": "tiny", "batch": 16, "tile": 32, "bands": 224, "repeats": 10, "warmup": 3}
SECTIONS = ("objective", "bands", "tiles", "terms")
OBJECTIVES = ("mae", "karma")
CHECKPOINTING = {"off": (False,), "on": (True,), "both": (False, True)}
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
    parser.add_argument("--objectives", default="mae,karma",
                        help="comma-separated objective cases of section 1 (mae,karma; the default both)")
    parser.add_argument("--activation-checkpointing", choices=tuple(CHECKPOINTING), default="off",
                        help="off (default), on (every section), both (section 1 runs each case without and with)")
    parser.add_argument("--json", help="write all numbers to this JSON file")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown or not args.sections:
        parser.error(f"--sections takes a comma-separated subset of {', '.join(SECTIONS)}, got {args.sections}")
    args.objectives = [name.strip() for name in args.objectives.split(",") if name.strip()]
    if set(args.objectives) - set(OBJECTIVES) or not args.objectives:
        parser.error(f"--objectives takes a comma-separated subset of {', '.join(OBJECTIVES)}, got {args.objectives}")
    needs = {"bands": "mae", "tiles": "mae", "terms": "karma"}
    missing = [f"{section} needs {needs[section]}" for section in args.sections
               if section in needs and needs[section] not in args.objectives]
    if missing:
        parser.error(f"--objectives {','.join(args.objectives)}: " + "; ".join(missing))
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
    checkpointing: bool = False  # the model's activation checkpointing while this case runs
    seconds: list[float] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)


class Runner:
    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.step_number = 0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else nullcontext()

    def forward(self, case: Case, generator: torch.Generator, checkpointing: bool | None = None):
        # cases may share a model: the setting is the case's (read by the model at every forward)
        case.model.config.activation_checkpointing = case.checkpointing if checkpointing is None else checkpointing
        with self.autocast():
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
        """Bytes of the unique storages autograd saves for backward (parameters and input batch excluded), and the
        input of every transformer block (what a checkpoint keeps; without checkpointing its first LayerNorm saves
        the same storage, so it is not counted twice)."""
        skip = {t.untyped_storage().data_ptr() for t in [*case.model.parameters(), *case.batch.values()]}
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in skip:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        def block_input(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if torch.is_grad_enabled():  # the forward, not a recomputation
                pack(inputs[0])

        hooks = [m.register_forward_pre_hook(block_input) for m in case.model.modules() if isinstance(m, Block)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                _, loss = self.forward(case, torch.Generator().manual_seed(0))
        finally:
            for hook in hooks:
                hook.remove()
        loss.backward()
        case.optimizer.zero_grad(set_to_none=True)
        return sum(seen.values())

    def flops(self, case: Case) -> float | None:
        """FLOPs of one forward + objective + backward as torch's flop counter counts them (matmuls, convolutions,
        attention), with checkpointing off: the model's FLOPs, not the recomputation's."""
        from torch.utils.flop_counter import FlopCounterMode
        try:
            counter = FlopCounterMode(display=False)
            with counter:
                _, loss = self.forward(case, torch.Generator().manual_seed(0), checkpointing=False)
                loss.backward()
            return float(counter.get_total_flops())
        except Exception as error:  # a counter gap must not cost the timings
            print(f"flop count failed for {case.name}: {type(error).__name__}: {error}")
            return None
        finally:
            case.optimizer.zero_grad(set_to_none=True)

    def run(self, cases: list[Case], warmup: int, repeats: int) -> None:
        peak = peak_flops(self.device)
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
                            seconds=case.seconds, saved_MB=self.saved_bytes(case) / 2**20,
                            activation_checkpointing=case.checkpointing)
            flops = self.flops(case)
            case.row.update(GFLOP_per_step=None if flops is None else flops / 1e9,
                            TFLOP_per_s=None if flops is None else flops / (ms / 1e3) / 1e12)
            if peak is not None:
                parameters = sum(p.numel() for p in case.model.parameters())
                tokens_per_s = n * case.row["tokens_per_sample"] / (ms / 1e3)
                case.row.update(mfu=None if flops is None else flops / (ms / 1e3) / peak,
                                mfu_6n=6 * parameters * tokens_per_s / peak, peak_TFLOP_per_s=peak / 1e12)
            if self.cuda:
                self.sync()
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
                self.step(case)
                self.sync()
                peak = torch.cuda.max_memory_allocated(self.device)
                case.row.update(peak_MB=peak / 2**20, step_peak_MB=(peak - before) / 2**20)


def _figure(value: float | None, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def print_section(title: str, cases: list[Case], key: str, cuda: bool) -> dict[str, Any]:
    base = cases[0].row
    mfu = any("mfu" in case.row for case in cases)
    print(f"\n{title}")
    header = (f"{key:>10} {'tokens':>6} {'ms/step':>8} {'best':>8} {'ms/sample':>9} {'time x':>7} {'saved MB':>8} "
              f"{'saved x':>7}" + (f" {'peak MB':>8} {'step MB':>8} {'step x':>7}" if cuda else "")
              + f" {'GFLOP':>8} {'TFLOP/s':>7}" + (f" {'MFU':>6}" if mfu else ""))
    print(header + "\n" + "-" * len(header))
    for case in cases:
        r = case.row
        r["relative_time"] = r["ms_per_step"] / base["ms_per_step"]
        r["relative_saved"] = r["saved_MB"] / base["saved_MB"]
        line = (f"{case.name:>10} {r['tokens_per_sample']:6d} {r['ms_per_step']:8.1f} {r['best_ms_per_step']:8.1f} "
                f"{r['ms_per_sample']:9.2f} {r['relative_time']:6.2f}x {r['saved_MB']:8.1f} "
                f"{r['relative_saved']:6.2f}x")
        if cuda:
            r["relative_step_peak"] = r["step_peak_MB"] / base["step_peak_MB"]
            line += f" {r['peak_MB']:8.0f} {r['step_peak_MB']:8.0f} {r['relative_step_peak']:6.2f}x"
        line += f" {_figure(r.get('GFLOP_per_step'), '.1f', 8)} {_figure(r.get('TFLOP_per_s'), '.2f', 7)}"
        if mfu:
            line += f" {_figure(None if r.get('mfu') is None else 100 * r['mfu'], '.1f', 5)}%"
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


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak (FLOP/s) from the trainer's table; None off CUDA or for an unknown device."""
    if device.type != "cuda":
        return None
    try:
        from hsfm_train.engine.trainer import PEAK_FLOPS
    except Exception:  # the table moved: report no MFU rather than fail
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def capture_attention(runner: Runner, case: Case) -> dict[str, tuple[torch.Tensor, ...]]:
    """q, k, v of the first encoder and the first decoder block's SDPA call in one forward of the case (its
    autocast, no grad), as the model makes them (dtype, strides)."""
    model, calls = case.model, {}
    original = torch.nn.functional.scaled_dot_product_attention
    blocks = {"encoder": model.blocks[0].attn, "decoder": model.decoder_blocks[0].attn}
    current: list[str] = []

    def spy(q, k, v, *args, **kwargs):
        if current and current[-1] not in calls:
            calls[current[-1]] = (q, k, v, args, kwargs)
        return original(q, k, v, *args, **kwargs)

    hooks = []
    for name, module in blocks.items():
        hooks.append(module.register_forward_pre_hook(lambda m, i, name=name: current.append(name)))
        hooks.append(module.register_forward_hook(lambda m, i, o: current.pop() and None))  # None: output kept
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            runner.forward(case, torch.Generator().manual_seed(0), checkpointing=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for hook in hooks:
            hook.remove()
    return calls


def sdpa_report(runner: Runner, case: Case) -> dict[str, Any]:
    """Which SDPA backends run the model's own attention calls (forward + backward), each alone, flash|efficient
    together, and the one PyTorch picks by default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = {getattr(SDPBackend, b).value: b.lower() for b in SDPBackend.__members__}
    trials = {"flash": [SDPBackend.FLASH_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION],
              "cudnn": [SDPBackend.CUDNN_ATTENTION] if hasattr(SDPBackend, "CUDNN_ATTENTION") else None,
              "math": [SDPBackend.MATH],
              "flash|efficient": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]}
    report = {}
    for where, (q, k, v, args, kwargs) in capture_attention(runner, case).items():
        entry: dict[str, Any] = {"shape": list(q.shape), "dtype": str(q.dtype).replace("torch.", ""),
                                 "last_dim_stride": [t.stride(-1) for t in (q, k, v)],
                                 "contiguous": all(t.is_contiguous() for t in (q, k, v)),
                                 "extra_arguments": sorted(kwargs) + ["positional"] * len(args)}
        inputs = [t.detach() for t in (q, k, v)]
        try:  # asked with inputs that require grad, as in training (some backends are chosen for inference only)
            choice = torch._fused_sdp_choice(*_strided_leaves(inputs), *args, **kwargs)
            entry["default"] = names.get(int(choice), "unknown")
        except Exception as error:
            entry["default"] = f"unknown ({type(error).__name__})"
        for label, backends in trials.items():
            if backends is None:
                entry[label] = "not in this torch"
                continue
            leaves = _strided_leaves(inputs)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel(backends):
                        out = torch.nn.functional.scaled_dot_product_attention(*leaves, *args, **kwargs)
                    out.float().sum().backward()  # the backward kernel of the same backend (chosen in forward)
                    runner.sync()
                    entry[label] = "ok"
                except Exception as error:  # RuntimeError "no viable backend" (with the reasons warned)
                    reasons = [str(w.message).splitlines()[0] for w in caught]
                    entry[label] = "no: " + "; ".join(reasons or [str(error).splitlines()[0]])[:300]
        report[where] = entry
    return report


def _strided_leaves(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the captured tensors as leaves that require grad, with their strides (SDPA's kernels check
    strides, not only shapes; clone() would make them contiguous)."""
    leaves = []
    for source in inputs:
        leaf = torch.empty_strided(source.size(), source.stride(), dtype=source.dtype, device=source.device)
        leaves.append(leaf.copy_(source).requires_grad_(True))
    return leaves


def print_sdpa(report: dict[str, Any]) -> None:
    print("\nSDPA backends for the model's attention calls (forward + backward; 'default' = PyTorch's pick)")
    for where, entry in report.items():
        print(f"  {where}: q {entry['shape']} {entry['dtype']}, last-dim strides {entry['last_dim_stride']}, "
              f"contiguous {entry['contiguous']}, extra arguments {entry['extra_arguments'] or 'none'}; "
              f"default {entry['default']}")
        for label in ("flash", "efficient", "cudnn", "math", "flash|efficient"):
            print(f"    {label:>15}: {entry[label]}")
        if entry["default"] == "math" and entry["dtype"] in ("bfloat16", "float16"):
            print(f"  WARNING: {where} attention in {entry['dtype']} runs SDPA's math fallback (no fused kernel)")


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
          f"warm-up {args.warmup}, repeats {args.repeats} (medians; 'best' = fastest step), objectives "
          f"{','.join(args.objectives)}, activation checkpointing {args.activation_checkpointing}")
    settings = CHECKPOINTING[args.activation_checkpointing]
    primary = settings[0]  # the setting of the sections after the first

    def label(objective: str, checkpointing: bool) -> str:
        return objective + ("+ckpt" if checkpointing else "")

    results: dict[str, Any] = {"command": sys.argv, "device": str(device), "device_name": device_name(device),
                               "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    try:
        runner, cases, section_cases = Runner(device), {}, []
        for name, (model_config, objective_config) in presets(args.model).items():
            if name not in args.objectives:
                continue
            torch.manual_seed(0)
            model = SpectralMAE(model_config).to(device).train()
            objective = PretrainObjective(objective_config)
            objective.check_model(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            batch = synthetic_batch(args.batch, args.bands, args.tile, 380.0, 2500.0, device)
            for checkpointing in settings:  # with "both", two cases on one model, optimiser and batch
                section_cases.append(Case(label(name, checkpointing), model, optimizer, objective, batch,
                                          checkpointing))
            cases[name] = section_cases[-len(settings)]
            results.setdefault("parameters", {})[name] = sum(p.numel() for p in model.parameters())
        first = next(iter(cases.values()))
        results["sdpa"] = sdpa_report(runner, first)
        print_sdpa(results["sdpa"])
        mae = cases.get("mae")

        if "objective" in args.sections:
            runner.run(section_cases, args.warmup, args.repeats)
            results["objective"] = print_section(f"1. objective ({args.bands} bands, tile {args.tile})",
                                                 section_cases, "case", cuda)
            if "karma" in cases and mae is not None:
                ratio = cases["karma"].row["ms_per_step"] / mae.row["ms_per_step"]
                best_ratio = cases["karma"].row["best_ms_per_step"] / mae.row["best_ms_per_step"]
                paper = PAPER["karma_ms_per_sample"] / PAPER["mae_ms_per_sample"]
                results["karma_over_mae"], results["paper_karma_over_mae"] = ratio, paper
                results["karma_over_mae_best"] = best_ratio
                print(f"KARMA costs {100 * (ratio - 1):+.1f}% per step over MAE (fastest steps: "
                      f"{100 * (best_ratio - 1):+.1f}%; paper: {100 * (paper - 1):+.1f}%, "
                      f"{PAPER['karma_ms_per_sample']} vs {PAPER['mae_ms_per_sample']} ms per sample); parameters "
                      f"MAE {results['parameters']['mae']:,}, KARMA {results['parameters']['karma']:,}")
            if len(settings) == 2:
                results["checkpointing"] = {}
                for name in cases:
                    off = results["objective"][label(name, False)]
                    on = results["objective"][label(name, True)]
                    summary = {"time_x": on["ms_per_step"] / off["ms_per_step"],
                               "saved_x": on["saved_MB"] / off["saved_MB"]}
                    text = (f"activation checkpointing ({name}): step time x{summary['time_x']:.2f} "
                            f"({off['ms_per_step']:.1f} -> {on['ms_per_step']:.1f} ms), saved activations "
                            f"x{summary['saved_x']:.2f} ({off['saved_MB']:.1f} -> {on['saved_MB']:.1f} MB)")
                    if cuda:
                        summary.update(peak_x=on["peak_MB"] / off["peak_MB"],
                                       step_peak_x=on["step_peak_MB"] / off["step_peak_MB"])
                        text += (f", peak x{summary['peak_x']:.2f} ({off['peak_MB']:.0f} -> {on['peak_MB']:.0f} MB;"
                                 f" above the step's start x{summary['step_peak_x']:.2f})")
                    results["checkpointing"][name] = summary
                    print(text)

        if "bands" in args.sections:
            band_cases = [Case(str(b), mae.model, mae.optimizer, mae.objective,
                               synthetic_batch(args.batch, b, args.tile, 400.0, 2500.0, device), primary)
                          for b in BAND_COUNTS]
            runner.run(band_cases, args.warmup, args.repeats)
            results["bands"] = print_section(f"2. band count (MAE, tile {args.tile}, 400-2500 nm)", band_cases,
                                             "bands", cuda)
            print("note: the tokenizer is wavelength-conditioned (bands are integrated against learned spectral "
                  "response functions), so the token count does not depend on the band count; cost grows only "
                  "through the per-band embedding/decoding einsums and the per-band loss, which are linear in bands")

        if "tiles" in args.sections:
            tile_cases = [Case(str(t), mae.model, mae.optimizer, mae.objective,
                               synthetic_batch(args.batch, args.bands, t, 380.0, 2500.0, device), primary)
                          for t in tiles]
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
