"""Losses of the CNNAEU unmixing methods: the SAD reconstruction loss, NT-Xent (SimCLR) and a blind
kernel-weighted contrastive loss (y-aware InfoNCE, Dufumier et al. 2021, with the abundances as the metadata).

Both contrastive losses take two views' embeddings z1, z2 [N, D] (row i of each: the same sample) and work on the
2N embeddings together: anchor a is compared with every other embedding b != a by cosine similarity / tau.
NT-Xent's target for an anchor is its other view alone; the kernel-weighted loss spreads the target over all
b != a in proportion to an RBF kernel between the samples' abundance vectors, so that samples of similar
composition count as soft positives. With a vanishing bandwidth it is NT-Xent again.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from hsfm_train.kernels import spectral_angle_loss


def sad_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean spectral angle (radians) between each pixel of ``target`` and its reconstruction, images
    [N, B, H, W]. The cosine is clamped below 1 so that a perfect pixel has a finite (zero) gradient."""
    bands = target.shape[1]
    return spectral_angle_loss(reconstruction.movedim(1, -1).reshape(-1, bands),
                               target.movedim(1, -1).reshape(-1, bands))


def _pair_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """[2N, 2N] cosine similarities / tau with the self-similarities masked out (-inf)."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two [N, D] embeddings of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / temperature
    return logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over the 2N views: mean over anchors of -log softmax (over b != a) at the anchor's other view."""
    count = len(z1)
    logits = _pair_logits(z1, z2, temperature)
    positives = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(logits.device)
    return F.cross_entropy(logits, positives)


def kernel_weights(labels: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """[N, N] RBF kernel between rows of ``labels`` [N, R]: the product over r of exp(-(y_ir - y_jr)^2 / 2 s^2),
    i.e. exp(-|y_i - y_j|^2 / 2 s^2). Row i of the result belongs to sample i: it follows the batch order."""
    labels = labels.float()
    squared = (labels[:, None, :] - labels[None, :, :]).square().sum(-1)  # exact zeros on the diagonal
    return torch.exp(-squared / (2.0 * bandwidth ** 2))


def kernel_contrastive(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                       bandwidth: float = 1.0) -> torch.Tensor:
    """Kernel-weighted InfoNCE: mean over anchors a of -sum_{b != a} p_ab log softmax_{b != a}(logits)_ab, with
    p_ab = w(y_a, y_b) / sum_{c != a} w(y_a, y_c). ``labels`` [N, R] describe sample i (both its views) in the
    order of z1 and z2; for a blind method they must be the model's own (detached) estimates."""
    if labels.shape[0] != z1.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {z1.shape[0]} samples")
    logits = _pair_logits(z1, z2, temperature)
    weights = kernel_weights(labels.detach(), bandwidth).repeat(2, 2)  # both views of a sample share its label
    self_pair = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    weights = weights.to(logits.device).masked_fill(self_pair, 0.0)
    target = weights / weights.sum(dim=1, keepdim=True)
    log_probabilities = torch.log_softmax(logits, dim=1).masked_fill(self_pair, 0.0)  # -inf * 0 would be NaN
    return -(target * log_probabilities).sum(dim=1).mean()
