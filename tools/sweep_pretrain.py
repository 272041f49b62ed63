"""Short pretraining sweeps judged downstream: each variant is one `hsfm pretrain` run (the demo job with some
overrides), then `hsfm probe` of its export on Indian Pines and Salinas-A (neither is in the pretraining data),
beside the random-init control and the raw spectra, plus its masked reconstruction beside the nearest-visible
baseline. Writes runs/sweeps/<name>/table.md and results.json; a finished variant (summary and export written)
is not rerun, an interrupted one resumes.

    python tools/sweep_pretrain.py NAME VARIANT=OVERRIDES [VARIANT=OVERRIDES ...]
    python tools/sweep_pretrain.py masking base= ratio50=model.mask_ratio=0.5 ratio90=model.mask_ratio=0.9
    python tools/sweep_pretrain.py mix sa@ip=experiment=transfer_ip ip@sa=experiment=transfer_sa

OVERRIDES are comma-separated `hsfm pretrain` overrides (empty: the demo job as it is; commas inside [] or {}
do not split). VARIANT@ip or VARIANT@sa probes only that scene: a variant whose pretraining data holds one of
the two scenes must not be probed on it. Each variant builds its data in its own folder unless it sets
data.demo_dir. PROBE_EXTRA (environment, comma-separated) adds probe options, e.g. with_spectrum=true; its
tables are written beside the plain ones (table-with_spectrum-true.md).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "classification"
SHORT = {"ip": "Indian Pines", "sa": "Salinas-A"}
SCENES = {
    "Indian Pines": [f"data.scene={DATA / 'indian_pines' / 'indian_pines.npz'}"],
    "Salinas-A": [f"data.scene={DATA / 'salinasA' / 'salinasA.npz'}", "data.reader.sensor_preset=aviris",
                  "data.reader.bands=corrected"],
}
PROBE = ["shots=[5,10]", "seeds=10", "probes=[linear]"]


def split_overrides(text: str) -> list[str]:
    """Split on commas outside brackets and braces."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [part for part in [*parts, current] if part]


def hsfm(*args: str) -> None:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hsfm_train.cli", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"hsfm {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    print(f"  {args[0]} done in {time.perf_counter() - started:.0f} s", flush=True)


def run_variant(sweep: Path, name: str, overrides: list[str], scenes: list[str]) -> dict:
    output = sweep / name
    if not any(o.startswith("data.demo_dir=") for o in overrides):
        overrides = [*overrides, f"data.demo_dir={output / 'data'}"]
    started = time.perf_counter()
    finished = (output / "summary.json").exists() and (output / "export" / "config.json").exists()
    if not finished:
        hsfm("pretrain", *overrides, f"output_dir={output}", "trainer.wandb=false", "trainer.progress=false")
    # the first run's wall time is the one to report: a rerun of a finished variant only re-evaluates
    timing = output / "sweep_seconds.json"
    if not timing.exists():
        timing.write_text(json.dumps({"pretrain_seconds": time.perf_counter() - started}) + "\n")
    seconds = json.loads(timing.read_text())["pretrain_seconds"]
    summary = json.loads((output / "summary.json").read_text())
    trained = summary["eval"]["trained"]
    row = {"variant": name, "overrides": overrides, "pretrain_seconds": round(seconds),
           "psnr": trained["psnr"], "sam_deg": trained["sam_deg"],
           "nearest_psnr": trained["baselines"]["nearest_visible"]["psnr"],
           "nearest_sam_deg": trained["baselines"]["nearest_visible"]["sam_deg"], "probe": {}}
    extra = split_overrides(os.environ.get("PROBE_EXTRA", ""))
    suffix = "".join(f"-{o.replace('=', '-')}" for o in extra)
    for scene in scenes:
        options = SCENES[scene]
        probe_dir = output / f"probe-{scene.replace(' ', '-').lower()}{suffix}"
        if not (probe_dir / "summary.json").exists():
            hsfm("probe", f"backbone={output / 'export'}", *options, *PROBE, *extra, f"output_dir={probe_dir}")
        results = json.loads((probe_dir / "summary.json").read_text())["results"]
        row["probe"][scene] = {source: {k: (entry["oa_mean"], entry["oa_std"]) for k, entry in by_k.items()}
                               for source, by_k in results.items()}
    return row


def table(rows: list[dict]) -> str:
    header = ["variant", "overrides", "pretrain s", "PSNR / nearest", "SAM / nearest"]
    for scene in SCENES:
        header += [f"{scene} K=5: backbone / random / spectra"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        shown = [o for o in row["overrides"] if not o.startswith("data.demo_dir=/")]  # the tool's own folder
        cells = [row["variant"], " ".join(f"`{o}`" for o in shown) or "(demo)",
                 str(row["pretrain_seconds"]), f"{row['psnr']:.2f} / {row['nearest_psnr']:.2f}",
                 f"{row['sam_deg']:.2f} / {row['nearest_sam_deg']:.2f}"]
        for scene in SCENES:
            probe = row["probe"].get(scene)
            if probe is None:
                cells.append("(in the pretraining data)")
                continue
            cells.append(" / ".join(f"{100 * probe[s]['5'][0]:.1f} +- {100 * probe[s]['5'][1]:.1f}"
                                    for s in ("backbone", "random", "spectra")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in variant for variant in argv[1:]):
        sys.exit(__doc__)
    sweep = REPO / "runs" / "sweeps" / argv[0]
    sweep.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in argv[1:]:
        name, _, overrides = variant.partition("=")
        name, _, only = name.partition("@")
        scenes = [SHORT[only]] if only else list(SCENES)
        print(f"{name}: {overrides or '(demo)'}", flush=True)
        rows.append(run_variant(sweep, name, split_overrides(overrides), scenes))
        tag = "".join(f"-{o.replace('=', '-')}" for o in split_overrides(os.environ.get("PROBE_EXTRA", "")))
        (sweep / f"results{tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
        (sweep / f"table{tag}.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
