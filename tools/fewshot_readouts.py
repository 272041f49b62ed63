"""Which readout gives label propagation the best frozen features? The study behind `readout=tile+centre`.

    python tools/fewshot_readouts.py data.target=../shared/data/classification/indian_pines/indian_pines.npz
    python tools/fewshot_readouts.py data.target=../shared/data/classification/salinasA/salinasA.npz \\
        data.target_reader.sensor_preset=aviris data.target_reader.bands=corrected

Any `hsfm fewshot` override applies (backbone=, seeds=, ...; default backbone runs/main-mae/export, 20 seeds).
The frozen backbone (``adapter.kind=linear``: no adapter; no head) gives every labelled pixel a feature from
each readout: the tile feature, the centre token of a 5 / 7 / 9 px window, the mean token of a 9 px window; the
input spectrum is the no-network row. Each feature set, and the tile feature beside each window's centre token (concatenated, no
rescaling: what `readout=tile+centre` feeds its head), is scored by the stage's own label propagation from each
seed's support over support + query: OA mean +- sample std over seeds, printed as a markdown table.

The query labels score the rows, so choosing a readout from this table is choosing on the evaluation pixels:
say so beside any number it picks.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch

from hsfm_train.fewshot.embedder import EmbeddingRunner
from hsfm_train.metrics import classification_scores
from hsfm_train.stages.fewshot import (draw_splits, load_fewshot_config, new_embedder, propagate_from_support,
                                       read_inputs)

WINDOWS = (5, 7, 9)


def frozen_features(overrides: list[str]) -> tuple[dict[str, np.ndarray], object, object, np.ndarray]:
    if not any(o.startswith("backbone=") for o in overrides):
        overrides = ["backbone=runs/main-mae/export", *overrides]
    if not any(o.startswith("seeds=") for o in overrides):
        overrides = [*overrides, "seeds=20"]
    overrides = [*overrides, "adapter.kind=linear"]  # the backbone as exported: no adapter, not even at its init
    config = load_fewshot_config(overrides)
    inputs = read_inputs(config)
    target = inputs.target
    labelled = np.flatnonzero(target.labels > 0)
    features: dict[str, np.ndarray] = {}
    device = torch.device("cpu")
    with torch.no_grad():
        for readout, window in [("tile", 9)] + [("centre", w) for w in WINDOWS] + [("mean", 9)]:
            embedder = new_embedder(inputs.backbone, load_fewshot_config(
                [*overrides, f"readout={readout}", f"patch_size={window}"]), 0)
            runner = EmbeddingRunner(embedder, device)
            if readout == "tile":
                grid = embedder.context_grid(torch.from_numpy(np.ascontiguousarray(
                    target.cube.transpose(2, 0, 1)))[None], runner.wavelengths(target))
                found = embedder.sample_grid(grid, labelled, target.shape[1])
                name = "tile"
            else:
                found = torch.cat([embedder.features(runner.inputs(target, labelled[i:i + 256]),
                                                     runner.wavelengths(target))
                                   for i in range(0, len(labelled), 256)])
                name = f"{readout} {window}x{window}"
            features[name] = found.numpy().astype(np.float64)
    features["input spectrum"] = target.cube.reshape(-1, target.cube.shape[-1])[labelled].astype(np.float64)
    for window in WINDOWS:
        features[f"tile + centre {window}x{window}"] = np.hstack([features["tile"],
                                                                  features[f"centre {window}x{window}"]])
    return features, config, target, labelled


def main(overrides: list[str]) -> None:
    started = time.perf_counter()
    torch.manual_seed(0)
    features, config, target, labelled = frozen_features(overrides)
    splits, _ = draw_splits(target, config)
    position = np.full(target.labels.size, -1)
    position[labelled] = np.arange(len(labelled))
    classes = np.asarray(target.classes)
    print(f"{target.name}: {len(labelled)} labelled pixels, {len(classes)} classes, K = {config.shots}, "
          f"{len(splits)} seeds, frozen {config.backbone}")
    print("| features | OA % (label propagation) |")
    print("|---|---|")
    for name, x in features.items():
        scores = []
        for seed, split in enumerate(splits):
            support, query = position[split.support], position[split.query]
            result, _, _ = propagate_from_support(torch.as_tensor(x[support], dtype=torch.float32),
                                                  split.support_labels,
                                                  torch.as_tensor(x[query], dtype=torch.float32), len(classes),
                                                  config.pseudo_labels, np.random.default_rng([seed, config.seed]))
            predicted = classes[result.labels[len(support):].numpy()]
            scores.append(classification_scores(target.labels[split.query], predicted, list(classes))["oa"])
        spread = f" +- {100 * np.std(scores, ddof=1):.1f}" if len(scores) > 1 else ""
        print(f"| {name} | {100 * np.mean(scores):.1f}{spread} |", flush=True)
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
