"""Where does a backbone's linear-probe accuracy come from? Diagnostics beside `hsfm probe` (same scene reading,
normalisation, supports and probe), comparing an export with the same architecture at random initialisation:

* depth: the probe on the tokens after 0 (patch embedding only), 1, ..., all encoder blocks;
* swaps: the pretrained patch embedding with random blocks, and the reverse; the pretrained spectral response
  functions alone inside a random model;
* conditioning: the same features PCA-whitened (64 components fitted on all pixels, no labels) before the
  probe, which tells features that lack the information from features that hold it in weak directions.

    python tools/probe_diagnostics.py EXPORT ip|sa [--seeds 5] [--random-seed 0]

Prints linear-probe OA at K = 5 (mean +- std over support seeds). A diagnostic, not a yardstick: the probe
itself (`hsfm probe`) is what results are reported with.
"""
from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "classification"
SCENES = {
    "ip": [f"data.scene={DATA / 'indian_pines' / 'indian_pines.npz'}"],
    "sa": [f"data.scene={DATA / 'salinasA' / 'salinasA.npz'}", "data.reader.sensor_preset=aviris",
           "data.reader.bands=corrected"],
}


def main() -> None:
    from threadpoolctl import threadpool_limits
    from sklearn.decomposition import PCA

    from hsfm_train.models.registry import architecture_of
    from hsfm_train.stages import probe

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("scene", choices=sorted(SCENES))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--random-seed", type=int, default=0)
    args = parser.parse_args()

    config = probe.load_probe_config([*SCENES[args.scene], f"backbone={args.export}"])
    scene = probe._read_labelled_scene(config)
    labels = scene.labels.reshape(-1).astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone, statistics, _ = probe.load_backbone(config)
        cube, _ = probe.normalise_for_model(backbone, scene.cube, scene.wavelengths_nm, statistics)
    control = probe.random_model(backbone.config, args.random_seed, architecture_of(backbone))

    def features(model: torch.nn.Module) -> np.ndarray:
        return probe.pixel_features(model, cube, scene.wavelengths_nm)

    def score(values: np.ndarray, whiten: bool = False) -> str:
        if whiten:
            values = PCA(64, whiten=True, random_state=0).fit_transform(values)
        accuracies = []
        with threadpool_limits(limits=1):
            for seed in range(args.seeds):
                train, test = probe.sample_support(labels, 5, seed)
                fitted = probe.fit_probe("linear", values[train], labels[train])
                accuracies.append(float((fitted.predict(values[test]) == labels[test]).mean()))
        return f"{100 * np.mean(accuracies):5.1f} +- {100 * np.std(accuracies, ddof=1):.1f}"

    def truncated(model: torch.nn.Module, depth: int) -> torch.nn.Module:
        cut = copy.deepcopy(model)
        cut.blocks = torch.nn.ModuleList(list(model.blocks)[:depth])
        if depth < len(model.blocks):  # the final norm belongs to the last block's output
            cut.norm = torch.nn.LayerNorm(model.config.embed_dim, elementwise_affine=False)
        return cut

    def hybrid(base: torch.nn.Module, part: str, donor: torch.nn.Module) -> torch.nn.Module:
        mixed = copy.deepcopy(base)
        if part == "response":
            mixed.patch_embed.response = copy.deepcopy(donor.patch_embed.response)
        else:
            mixed.patch_embed = copy.deepcopy(donor.patch_embed)
        return mixed

    print(f"{args.export} on {args.scene}: linear probe OA % at K=5 over {args.seeds} support seeds")
    print(f"{'':44s} {'pretrained':>12s} {'random init':>12s}")
    for depth in range(len(backbone.blocks) + 1):
        print(f"{f'tokens after {depth} blocks':44s} {score(features(truncated(backbone, depth))):>12s} "
              f"{score(features(truncated(control, depth))):>12s}")
    print(f"{'pretrained patch embedding + random blocks':44s} {score(features(hybrid(control, 'embed', backbone))):>12s}")
    print(f"{'random patch embedding + pretrained blocks':44s} {score(features(hybrid(backbone, 'embed', control))):>12s}")
    print(f"{'pretrained response functions, rest random':44s} "
          f"{score(features(hybrid(control, 'response', backbone))):>12s}")
    print(f"{'all blocks, PCA-whitened (64)':44s} {score(features(backbone), True):>12s} "
          f"{score(features(control), True):>12s}")


if __name__ == "__main__":
    main()
