"""Does CoDe-MAE's conditioned contrastive term align the two modalities, or can it be solved without them?

    python tools/codemae_shortcut.py runs/codemae-ablation/codemae-s0 [--tiles 96]

Reads a joint run's last checkpoint (the backbone and its conditioning head, which the export leaves out) and
the held-out Volkov pairs cut into 64 px tiles, encodes each tile unmasked, and prints:

* the cosine between the two conditioned embeddings of a true pair, pool(optical_i | SAR_i) and
  pool(SAR_i | optical_i) (what the training InfoNCE raises), and of a false pair (optical_i with SAR_j);
* Recall@1 of retrieval by those conditioned scores, s(i, j) = cos(pool(optical_j | SAR_i), pool(SAR_i | optical_j));
* Recall@1 of the plain embeddings (modality-centred mean tokens, as ``hsfm eval-pairs`` scores them).

Each conditioned embedding sees both images of the pair it scores; if a false pair scores as high as a true one,
the term was solved by that shortcut and says nothing about alignment (what ``objective.conditioned_scoring=
own_partner`` allows; the default ``pairwise`` trains on exactly these scores, false pairs included).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from hsfm_train.data.pairs import read_pairs, select_split
from hsfm_train.engine.export import load_pretrained
from hsfm_train.models.codemae import JointHeadsConfig, JointOpticalSAR
from hsfm_train.objectives.codemae import pairwise_conditioned_scores
from hsfm_train.stages.eval_pairs import prepare_modality, recall_at_k, tile_pairs

PAIRS = "../shared/data/optical_sar/volkov_s1s2_aligned/volkov_s1s2_256.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--pairs", default=PAIRS)
    parser.add_argument("--tiles", type=int, default=96, help="held-out tile pairs scored (evenly spaced)")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = load_pretrained(args.run / "export")
    checkpoint = sorted((args.run / "checkpoints").glob("step_*"))[-1]
    weights = load_file(checkpoint / "model.safetensors")
    heads = JointHeadsConfig(embedding_dim=weights["pooling.projection.2.weight"].shape[0],
                             teacher_dim=weights["distillation.weight"].shape[0] if "distillation.weight" in weights
                             else 0)
    model = JointOpticalSAR(backbone.config, heads)
    model.load_state_dict(weights)  # the backbone, decoder and heads as trained
    model.eval()
    statistics = json.loads((args.run / "export" / "config.json").read_text()).get("normalization") or {}
    pairs = tile_pairs(select_split(read_pairs(args.pairs, {}), "held_out", 0.2), 64)
    pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, min(args.tiles, len(pairs))).astype(int)]
    tokens, pooled = {}, {}
    with torch.no_grad():
        for modality in ("optical", "sar"):
            data = prepare_modality(backbone, pairs, modality, 0, statistics)
            encoded = model.backbone.encode(torch.from_numpy(data.images), torch.as_tensor(data.wavelengths))[:, 1:]
            tokens[modality] = encoded
            pooled[modality] = encoded.mean(dim=1)
        count = len(pairs)
        optical, sar = tokens["optical"], tokens["sar"]
        # row i: SAR i against every optical j (one SAR at a time bounds the memory)
        scores = torch.cat([pairwise_conditioned_scores(model.pooling, optical, sar[i:i + 1]).T
                            for i in range(count)])
        plain_o = F.normalize(pooled["optical"] - pooled["optical"].mean(0), dim=1)
        plain_s = F.normalize(pooled["sar"] - pooled["sar"].mean(0), dim=1)
        plain = (plain_s @ plain_o.T).numpy()
    true = scores.diag()
    false = scores[~torch.eye(count, dtype=torch.bool)]
    print(f"{args.run}: {count} held-out 64 px tile pairs, checkpoint {checkpoint.name}")
    print(f"  conditioned cosine, true pairs {true.mean():.3f} +- {true.std():.3f}; "
          f"false pairs {false.mean():.3f} +- {false.std():.3f}")
    print(f"  retrieval R@1 SAR -> optical: conditioned scores {100 * recall_at_k(scores.numpy(), [1])[1]:.1f} %, "
          f"plain embeddings {100 * recall_at_k(plain, [1])[1]:.1f} % (chance {100 / count:.1f} %)")


if __name__ == "__main__":
    main()
