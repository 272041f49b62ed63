"""CoDe-MAE step cost: what the conditioned contrastive term's pairwise scoring costs against own-partner scoring,
the CLIP-style term and no contrastive term, as the per-rank batch grows.

Pairwise scoring pools every (optical i, SAR j) of a rank's batch with each side attending to the other: N^2
cross-attention poolings per step against own-partner scoring's N (``hsfm_train/objectives/codemae.py``); with
``objective.conditioned_negatives=k``, N (1 + 2k). One
training step here = the joint model's masked forward of both modalities + ``JointObjective`` + backward + AdamW
step + zero_grad, on the model of ``experiment=codemae`` (tiny preset, 4 px patches, 64 px tiles, RGB + one SAR
channel; no distillation teacher, which costs the same for every case). Data are random tensors: timing does not
depend on them.

Cases are interleaved (A B C D A B C D ...) after ``--warmup`` steps each, all in one run, so the ratios are
robust on a noisy machine; medians over ``--repeats``. "saved MB" is what autograd keeps for backward during the
forward + objective (unique storages; parameters and the batch excluded): the memory that grows with N^2. The
script always exits 0: it is a measurement, not a test.

    python benchmarks/bench_codemae.py                     # batches 8, 16, 32
    python benchmarks/bench_codemae.py --batches 16,64 --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from hsfm_train.models.codemae import JointHeadsConfig, JointOpticalSAR
from hsfm_train.models.mae import ModelConfig
from hsfm_train.objectives.pretrain import JointObjective, ObjectiveConfig

RGB_NM = (664.6, 559.8, 492.4)
VH_NM = 5.5465763e7
CASES = {  # name: objective overrides on top of the joint masked MSE
    "no contrastive": {},
    "rigid (CLIP-style)": {"rigid_contrastive": 1.0},
    "conditioned, own partner": {"conditioned_contrastive": 1.0, "conditioned_scoring": "own_partner"},
    "conditioned, pairwise": {"conditioned_contrastive": 1.0, "conditioned_scoring": "pairwise"},
    "pairwise, 4 negatives": {"conditioned_contrastive": 1.0, "conditioned_negatives": 4},
}


@dataclass
class Case:
    name: str
    batch_size: int
    model: JointOpticalSAR
    objective: JointObjective
    optimizer: torch.optim.Optimizer
    batch: dict[str, torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,16,32", help="comma-separated per-rank batch sizes (8,16,32)")
    parser.add_argument("--tile", type=int, default=64, help="tile side in px (64, as experiment=codemae)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per case (5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case first (2; at least 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--json", help="write all numbers to this JSON file")
    return parser.parse_args()


def make_case(name: str, batch_size: int, tile: int) -> Case:
    torch.manual_seed(0)
    config = ModelConfig(patch_size=4)
    overrides = CASES[name]
    objective = ObjectiveConfig(name="codemae", joint=True, **overrides)
    scoring = objective.conditioned_scoring if objective.conditioned_contrastive > 0 else None
    model = JointOpticalSAR(config, JointHeadsConfig(conditioned_scoring=scoring,
                                                     conditioned_negatives=objective.conditioned_negatives)).train()
    generator = torch.Generator().manual_seed(1)
    batch = {"hsi": torch.randn(batch_size, 3, tile, tile, generator=generator),
             "wavelengths": torch.tensor(RGB_NM).expand(batch_size, -1).clone(),
             "band_mask": torch.ones(batch_size, 3, dtype=torch.bool),
             "band_mean": torch.full((batch_size, 3), 0.5), "band_std": torch.full((batch_size, 3), 0.2),
             "pair": torch.randn(batch_size, 1, tile, tile, generator=generator),
             "pair_wavelengths": torch.tensor([VH_NM]).expand(batch_size, -1).clone()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Case(name, batch_size, model, JointObjective(objective), optimizer, batch)


def loss_of(case: Case) -> torch.Tensor:
    b = case.batch
    out = case.model(b["hsi"], b["wavelengths"], b["band_mask"], b["pair"], b["pair_wavelengths"],
                     generator=torch.Generator().manual_seed(0))
    paired = torch.ones(case.batch_size, dtype=torch.bool)
    return case.objective(case.model, out, b, paired)[0]


def step(case: Case) -> float:
    started = time.perf_counter()
    loss_of(case).backward()
    case.optimizer.step()
    case.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def saved_bytes(case: Case) -> int:
    skip = {t.untyped_storage().data_ptr() for t in [*case.model.parameters(), *case.batch.values()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(case)
    loss.backward()
    case.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    results: list[dict[str, Any]] = []
    print(f"CoDe-MAE joint step, tiny model, 4 px patches, {args.tile} px tiles, CPU, {args.threads} thread(s); "
          f"medians of {args.repeats} interleaved steps")
    print(f"{'batch':>5}  {'case':<26} {'ms/step':>9} {'x no contrastive':>17} {'saved MB':>9}")
    for batch_size in batches:
        cases = [make_case(name, batch_size, args.tile) for name in CASES]
        for case in cases:
            for _ in range(max(1, args.warmup)):
                step(case)
        times: dict[str, list[float]] = {case.name: [] for case in cases}
        for _ in range(args.repeats):
            for case in cases:
                times[case.name].append(step(case))
        base = statistics.median(times["no contrastive"])
        for case in cases:
            median = statistics.median(times[case.name])
            saved = saved_bytes(case) / 1e6
            results.append({"batch": batch_size, "case": case.name, "ms_per_step": 1e3 * median,
                            "ratio_to_no_contrastive": median / base, "saved_mb": saved})
            print(f"{batch_size:>5}  {case.name:<26} {1e3 * median:>9.1f} {median / base:>17.2f} {saved:>9.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "tile": args.tile, "threads": args.threads, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
