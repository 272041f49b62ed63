"""The loss terms of CoDe-MAE (joint optical-SAR pretraining with one shared backbone), beside the per-modality
masked reconstruction that ``objectives/reconstruction.py`` already gives:

* cross-modal degraded reconstruction: tokens of one modality predict a spectrally degraded version of the other
  (optical -> the SAR channel mean, SAR -> optical luma 0.299 R + 0.587 G + 0.114 B), per patch, so that the model
  learns shared structure without the ill-posed full translation between modalities;
* conditioned contrastive learning: each modality's tokens cross-attend to the other's, are mean-pooled and
  projected, and the two pooled embeddings are aligned by a symmetric InfoNCE at a fixed temperature (0.07), a
  soft alignment that leaves the per-token features free. Every candidate pair (optical i, SAR j) is scored with
  each side conditioned on the other (``pairwise``): when each embedding is conditioned on its own partner only
  (``own_partner``), both embeddings of a pair see both images, and a pooling that is symmetric in its two inputs
  solves the InfoNCE without aligning anything;
* feature distillation: SmoothL1 between the student's optical tokens (through a linear projection) and a frozen
  optical teacher's, which anchors the shared backbone to optical semantics.

Every cross-modal term takes a ``paired`` mask [N]: samples without a partner contribute nothing, and a batch
with no pair gives an exact zero (with a graph, so that every parameter still receives a gradient, as DDP needs).
Images are [N, C, H, W]; patch targets are [N, P, p*p] with the P patches in raster order, as the encoder's
patch tokens are.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma of R, G, B
CONTRASTIVE_TEMPERATURE = 0.07
CONDITIONED_SCORINGS = ("pairwise", "own_partner")


def optical_luma(optical: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] of an RGB image [N, 3, H, W] (channels in R, G, B order)."""
    if optical.dim() != 4 or optical.shape[1] != 3:
        raise ValueError(f"optical luma needs an RGB image [N, 3, H, W], got {tuple(optical.shape)}")
    weights = torch.as_tensor(LUMA_WEIGHTS, dtype=optical.dtype, device=optical.device)
    return torch.einsum("nchw,c->nhw", optical, weights)[:, None]


def sar_channel_mean(sar: torch.Tensor) -> torch.Tensor:
    """The mean over polarisation channels [N, 1, H, W] of a SAR image [N, C, H, W] (C = 1: the image itself)."""
    if sar.dim() != 4:
        raise ValueError(f"SAR channel mean needs an image [N, C, H, W], got {tuple(sar.shape)}")
    return sar.mean(dim=1, keepdim=True)


def patch_targets(image: torch.Tensor, patch_size: int, standardise: bool = True) -> torch.Tensor:
    """A one-channel image [N, 1, H, W] (H, W multiples of ``patch_size``) -> per-patch targets [N, P, p*p],
    patches in raster order. ``standardise``: each patch to zero mean and unit variance (MAE's norm_pix), so that
    the target is structure, not the other sensor's brightness scale."""
    if image.dim() != 4 or image.shape[1] != 1:
        raise ValueError(f"patch targets need a one-channel image [N, 1, H, W], got {tuple(image.shape)}")
    if image.shape[-2] % patch_size or image.shape[-1] % patch_size:
        raise ValueError(f"image {tuple(image.shape[-2:])} is not a multiple of the patch size {patch_size}")
    patches = rearrange(image, "n 1 (r p) (c q) -> n (r c) (p q)", p=patch_size, q=patch_size)
    if standardise:
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True, unbiased=False)
        patches = (patches - mean) / (var + 1e-6).sqrt()
    return patches


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """0.0 that depends on every tensor given (so their parameters get a zero gradient, not none)."""
    return sum(t.sum() * 0.0 for t in tensors)


def degraded_reconstruction(prediction: torch.Tensor, target: torch.Tensor, paired: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the paired samples' patches: ``prediction`` and ``target`` [N, P, p*p], ``paired``
    [N] bool. All patches are scored (the target comes from the other modality, which the encoder never saw)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    paired = paired.to(device=prediction.device, dtype=torch.bool)
    if not paired.any():
        return _zero_like_graph(prediction)
    return F.mse_loss(prediction[paired].float(), target[paired].float())


def info_nce(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE of two [N, D] embeddings whose row i is one pair: cosine similarities / temperature, the
    mean of the cross-entropies a -> b and b -> a with the diagonal as the positives."""
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"expected two [N, D] embeddings of one shape, got {tuple(z_a.shape)}, {tuple(z_b.shape)}")
    return score_info_nce(F.normalize(z_a.float(), dim=1) @ F.normalize(z_b.float(), dim=1).t(), temperature)


def score_info_nce(scores: torch.Tensor, temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE of a square score matrix [N, N] (row i: modality a's sample i against every sample of
    modality b; the diagonal holds the true pairs): the mean of the row-wise and column-wise cross-entropies of
    ``scores / temperature``."""
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"expected a square [N, N] score matrix, got {tuple(scores.shape)}")
    logits = scores.float() / temperature
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


class ConditionedPooling(nn.Module):
    """Cross-attention pooling: the tokens of one modality [N, T, D] attend to the other's [N, T', D] (queries from
    the first, keys and values from the second), are mean-pooled and projected to [N, E]. One module serves both
    directions (the backbone is shared; so is the bridge)."""

    def __init__(self, dim: int, num_heads: int, embedding_dim: int = 128):
        super().__init__()
        self.norm_query = nn.LayerNorm(dim, eps=1e-6)
        self.norm_context = nn.LayerNorm(dim, eps=1e-6)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, embedding_dim))

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        query = self.norm_query(tokens)
        memory = self.norm_context(context)
        attended, _ = self.attention(query, memory, memory, need_weights=False)
        return self.projection((tokens + attended).mean(dim=1))


def paired_info_nce(z_a: torch.Tensor, z_b: torch.Tensor, paired: torch.Tensor,
                    temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """:func:`info_nce` over the paired rows only; fewer than two pairs: zero (InfoNCE needs a negative)."""
    paired = paired.to(device=z_a.device, dtype=torch.bool)
    if int(paired.sum()) < 2:
        return _zero_like_graph(z_a, z_b)
    return info_nce(z_a[paired], z_b[paired], temperature)


def pairwise_conditioned_scores(pooling: ConditionedPooling, optical_tokens: torch.Tensor,
                                sar_tokens: torch.Tensor) -> torch.Tensor:
    """Scores [M, N] of every candidate pair: entry (i, j) is the cosine between pool(optical_i | SAR_j) and
    pool(SAR_j | optical_i), so a negative is conditioned on the query it is scored against (M * N poolings)."""
    m, n = len(optical_tokens), len(sar_tokens)
    optical = optical_tokens.repeat_interleave(n, dim=0)  # row i * n + j: optical i
    sar = sar_tokens.repeat(m, 1, 1)  # row i * n + j: SAR j
    return conditioned_pair_scores(pooling, optical, sar).view(m, n)


def sampled_conditioned_scores(pooling: ConditionedPooling, optical_tokens: torch.Tensor, sar_tokens: torch.Tensor,
                               candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise conditioned scores against sampled negatives only: ``candidates`` [N, k] holds, per row i, the k
    other samples it is contrasted with. Returns (optical -> SAR, SAR -> optical) [N, 1 + k]: column 0 the true
    pair (i, i), column 1 + t the pair (optical i, SAR c_it), respectively (optical c_it, SAR i). N (1 + 2k)
    poolings instead of N^2."""
    n, k = candidates.shape
    rows = torch.arange(n, device=candidates.device)
    flat = candidates.reshape(-1)
    repeated = rows.repeat_interleave(k)
    optical_ids = torch.cat([rows, repeated, flat])  # the true pairs, then (i, c), then (c, i)
    sar_ids = torch.cat([rows, flat, repeated])
    scores = conditioned_pair_scores(pooling, optical_tokens[optical_ids], sar_tokens[sar_ids])
    positive = scores[:n, None]
    to_sar = torch.cat([positive, scores[n:n + n * k].view(n, k)], dim=1)
    to_optical = torch.cat([positive, scores[n + n * k:].view(n, k)], dim=1)
    return to_sar, to_optical


def conditioned_pair_scores(pooling: ConditionedPooling, optical: torch.Tensor,
                                   sar: torch.Tensor) -> torch.Tensor:
    """The conditioned score [M] of each given pair (optical row m with SAR row m), each side attending to the
    other."""
    return F.cosine_similarity(pooling(optical, sar).float(), pooling(sar, optical).float(), dim=1)


def draw_negatives(count: int, negatives: int, generator: torch.Generator | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """[count, negatives] indices: for each row i, ``negatives`` distinct others drawn uniformly (from
    ``generator``, so that a resumed run draws the same)."""
    if not 0 < negatives < count:
        raise ValueError(f"need 0 < negatives < count, got {negatives} negatives of {count} samples")
    noise = torch.rand(count, count, generator=generator)
    noise.fill_diagonal_(float("inf"))  # never the sample itself
    return noise.argsort(dim=1)[:, :negatives].to(device)


def sampled_score_info_nce(to_sar: torch.Tensor, to_optical: torch.Tensor, candidates: torch.Tensor,
                           paired: torch.Tensor, temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """InfoNCE over sampled negatives (column 0 the positive): the mean of both directions' cross-entropies,
    over the rows that are paired and whose every candidate is; fewer than two such rows: zero."""
    paired = paired.to(device=to_sar.device, dtype=torch.bool)
    keep = paired & paired[candidates].all(dim=1)
    if int(keep.sum()) < 2:
        return _zero_like_graph(to_sar, to_optical)
    targets = torch.zeros(int(keep.sum()), dtype=torch.long, device=to_sar.device)
    return (F.cross_entropy(to_sar[keep].float() / temperature, targets)
            + F.cross_entropy(to_optical[keep].float() / temperature, targets)) / 2


def paired_score_info_nce(scores: torch.Tensor, paired: torch.Tensor,
                          temperature: float = CONTRASTIVE_TEMPERATURE) -> torch.Tensor:
    """:func:`score_info_nce` over the paired rows and columns only; fewer than two pairs: zero."""
    paired = paired.to(device=scores.device, dtype=torch.bool)
    if int(paired.sum()) < 2:
        return _zero_like_graph(scores)
    return score_info_nce(scores[paired][:, paired], temperature)


def feature_distillation(student: torch.Tensor, teacher: torch.Tensor, projection: nn.Module,
                         beta: float = 1.0) -> torch.Tensor:
    """SmoothL1 between the projected student tokens and the frozen teacher's [N, T, D_teacher] (no gradient into
    the teacher). The teacher's features are standardised per token (layer norm without parameters), so that the
    target's scale is the teacher's structure, not its raw activation size."""
    target = F.layer_norm(teacher.detach().float(), teacher.shape[-1:])
    predicted = projection(student).float()
    if predicted.shape != target.shape:
        raise ValueError(f"projected student {tuple(predicted.shape)} and teacher {tuple(target.shape)} differ")
    return F.smooth_l1_loss(predicted, target, beta=beta)
