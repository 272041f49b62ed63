"""The CoDe-MAE loss terms (hsfm_train/objectives/codemae.py): degraded targets on hand-built images, InfoNCE
against a loop-by-loop reference, the conditioned scores of every candidate pair, and the cross-modal terms
ignoring unpaired samples."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hsfm_train.objectives.codemae import (ConditionedPooling, degraded_reconstruction, feature_distillation,
                                           draw_negatives, info_nce, optical_luma, paired_score_info_nce,
                                           pairwise_conditioned_scores, patch_targets,
                                           sampled_conditioned_scores, sampled_score_info_nce, sar_channel_mean,
                                           score_info_nce)


def test_optical_luma_weights_red_green_and_blue_by_bt601():
    image = torch.zeros(2, 3, 2, 2)
    image[0, 0] = 1.0  # pure red
    image[1] = 1.0  # white
    image[1, 2, 0, 0] = 0.0  # one pixel without blue
    luma = optical_luma(image)
    assert luma.shape == (2, 1, 2, 2)
    torch.testing.assert_close(luma[0], torch.full((1, 2, 2), 0.299))
    torch.testing.assert_close(luma[1, 0], torch.tensor([[0.886, 1.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="RGB"):
        optical_luma(torch.zeros(1, 1, 2, 2))


def test_the_sar_channel_mean_averages_polarisations():
    sar = torch.stack([torch.full((2, 2), 0.2), torch.full((2, 2), 0.6)])[None]  # VV, VH
    torch.testing.assert_close(sar_channel_mean(sar), torch.full((1, 1, 2, 2), 0.4))
    single = torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(sar_channel_mean(single), single)


def test_patch_targets_are_raster_patches_standardised_each():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    raw = patch_targets(image, 2, standardise=False)
    assert raw.shape == (1, 4, 4)
    torch.testing.assert_close(raw[0, 0], torch.tensor([0.0, 1.0, 4.0, 5.0]))  # top-left
    torch.testing.assert_close(raw[0, 1], torch.tensor([2.0, 3.0, 6.0, 7.0]))  # top-right
    torch.testing.assert_close(raw[0, 2], torch.tensor([8.0, 9.0, 12.0, 13.0]))  # bottom-left
    standard = patch_targets(image, 2)
    expected = (torch.tensor([0.0, 1.0, 4.0, 5.0]) - 2.5) / math.sqrt(4.25 + 1e-6)
    torch.testing.assert_close(standard[0, 0], expected)
    flat = patch_targets(torch.ones(1, 1, 2, 2), 2)  # a flat patch has no structure: zeros, not NaN
    torch.testing.assert_close(flat, torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patch_targets(torch.zeros(1, 1, 5, 4), 2)


def test_info_nce_matches_a_loop_by_loop_reference():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator)
    an = a.numpy() / np.linalg.norm(a.numpy(), axis=1, keepdims=True)
    bn = b.numpy() / np.linalg.norm(b.numpy(), axis=1, keepdims=True)
    similarity = an @ bn.T / 0.07
    losses = []
    for i in range(5):
        losses.append(-similarity[i, i] + np.log(np.exp(similarity[i]).sum()))  # a_i against every b
        losses.append(-similarity[i, i] + np.log(np.exp(similarity[:, i]).sum()))  # b_i against every a
    assert info_nce(a, b).item() == pytest.approx(float(np.mean(losses)), rel=1e-5)
    # aligned pairs far apart from each other: a near-zero loss; a swapped pairing: a large one
    basis = torch.eye(4) * 10
    assert info_nce(basis, basis).item() < 1e-5  # log(1 + 3 exp(-1 / 0.07))
    assert info_nce(basis, basis.flip(0)).item() > 10


def test_degraded_reconstruction_scores_paired_samples_only():
    prediction = torch.randn(3, 4, 9, requires_grad=True)
    target = torch.randn(3, 4, 9)
    paired = torch.tensor([True, False, True])
    loss = degraded_reconstruction(prediction, target, paired)
    expected = ((prediction[[0, 2]] - target[[0, 2]]) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    changed = prediction.detach().clone()
    changed[1] += 100.0  # the unpaired sample's prediction does not matter
    torch.testing.assert_close(degraded_reconstruction(changed, target, paired), expected.detach())
    none = degraded_reconstruction(prediction, target, torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and prediction.grad is not None and prediction.grad.abs().sum() == 0


def test_pairwise_conditioned_scores_condition_each_candidate_on_the_query():
    torch.manual_seed(0)
    pooling = ConditionedPooling(dim=16, num_heads=2, embedding_dim=8).eval()
    optical, sar = torch.randn(3, 6, 16), torch.randn(4, 5, 16)
    scores = pairwise_conditioned_scores(pooling, optical, sar)
    assert scores.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            a = pooling(optical[i:i + 1], sar[j:j + 1])  # optical i attending to SAR j
            b = pooling(sar[j:j + 1], optical[i:i + 1])  # SAR j attending to optical i
            torch.testing.assert_close(scores[i, j], torch.cosine_similarity(a, b)[0])
    # the conditioning matters: the pooled optical embedding depends on the SAR tokens it attends to
    assert not torch.allclose(pooling(optical, sar[:3]), pooling(optical, sar[:3].flip(0)))


class _SymmetricPooling(nn.Module):
    """A pooling whose output is the same whichever input attends to which: the shortcut of own-partner scoring."""

    def __init__(self):
        super().__init__()
        self.projection = nn.Linear(16, 8)

    def forward(self, tokens, context):
        return self.projection(tokens.mean(dim=1) + context.mean(dim=1))


def test_a_symmetric_pooling_solves_own_partner_scoring_but_not_pairwise_scoring():
    """Own-partner scoring compares pool(o_i | s_i) with pool(s_j | o_j): a pooling symmetric in its inputs makes
    every positive identical without any alignment of o_i with s_i. Pairwise scoring conditions the negatives on
    the query too, so the same pooling scores every candidate alike and the InfoNCE stays at log N."""
    torch.manual_seed(0)
    pooling = _SymmetricPooling()
    optical, sar = torch.randn(8, 6, 16), torch.randn(8, 5, 16)  # unrelated: nothing to align
    own = info_nce(pooling(optical, sar), pooling(sar, optical))
    pairwise = score_info_nce(pairwise_conditioned_scores(pooling, optical, sar))
    assert own < 0.05 * math.log(8)
    torch.testing.assert_close(pairwise, torch.tensor(math.log(8)), atol=1e-4, rtol=0)


def test_sampled_negatives_are_distinct_others_and_reproducible():
    first = draw_negatives(6, 3, torch.Generator().manual_seed(4))
    assert first.shape == (6, 3)
    for i, row in enumerate(first.tolist()):
        assert len(set(row)) == 3 and i not in row
    assert torch.equal(first, draw_negatives(6, 3, torch.Generator().manual_seed(4)))
    assert not torch.equal(first, draw_negatives(6, 3, torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="0 < negatives < count"):
        draw_negatives(4, 4)


def test_sampled_conditioned_scores_are_entries_of_the_pairwise_matrix():
    """Row i against its k candidates c: (optical i, SAR c) for optical -> SAR, (optical c, SAR i) for the other
    direction; with every other sample as a candidate the InfoNCE is the full pairwise one."""
    torch.manual_seed(0)
    pooling = ConditionedPooling(dim=16, num_heads=2, embedding_dim=8).eval()
    optical, sar = torch.randn(5, 6, 16), torch.randn(5, 4, 16)
    full = pairwise_conditioned_scores(pooling, optical, sar)
    candidates = draw_negatives(5, 2, torch.Generator().manual_seed(0))
    to_sar, to_optical = sampled_conditioned_scores(pooling, optical, sar, candidates)
    assert to_sar.shape == to_optical.shape == (5, 3)
    for i in range(5):
        torch.testing.assert_close(to_sar[i, 0], full[i, i])
        torch.testing.assert_close(to_optical[i, 0], full[i, i])
        for t, c in enumerate(candidates[i].tolist()):
            torch.testing.assert_close(to_sar[i, 1 + t], full[i, c])
            torch.testing.assert_close(to_optical[i, 1 + t], full[c, i])
    everyone = draw_negatives(5, 4, torch.Generator().manual_seed(1))
    paired = torch.ones(5, dtype=torch.bool)
    torch.testing.assert_close(sampled_score_info_nce(*sampled_conditioned_scores(pooling, optical, sar, everyone),
                                                      everyone, paired), score_info_nce(full))
    # a symmetric pooling cannot tell the true pair from its k candidates either: log(1 + k)
    symmetric = _SymmetricPooling()
    loss = sampled_score_info_nce(*sampled_conditioned_scores(symmetric, optical[:, :, :16], sar, candidates),
                                  candidates, paired)
    torch.testing.assert_close(loss, torch.tensor(math.log(3)), atol=1e-4, rtol=0)
    # rows that are unpaired, or have an unpaired candidate, are left out; fewer than two rows: zero
    some = torch.tensor([True, True, True, True, False])
    keep = some & some[candidates].all(dim=1)  # sample 4 is a candidate of rows 1-3: only row 0 is left
    assert keep.tolist() == [True, False, False, False, False]
    assert sampled_score_info_nce(to_sar, to_optical, candidates, some).item() == 0.0
    some = torch.tensor([True, False, True, True, True])  # sample 1 is no row's candidate: rows 0, 2, 3, 4
    keep = some & some[candidates].all(dim=1)
    assert keep.tolist() == [True, False, True, True, True]
    expected = (torch.nn.functional.cross_entropy(to_sar[keep] / 0.07, torch.zeros(int(keep.sum()), dtype=torch.long))
                + torch.nn.functional.cross_entropy(to_optical[keep] / 0.07,
                                                    torch.zeros(int(keep.sum()), dtype=torch.long))) / 2
    torch.testing.assert_close(sampled_score_info_nce(to_sar, to_optical, candidates, some), expected)
    none = sampled_score_info_nce(to_sar, to_optical, candidates, torch.zeros(5, dtype=torch.bool))
    assert none.item() == 0.0


def test_score_info_nce_keeps_paired_rows_and_columns_and_needs_two_pairs():
    torch.manual_seed(0)
    scores = torch.randn(4, 4, requires_grad=True)
    paired = torch.tensor([True, True, False, True])
    keep = paired.nonzero().flatten()
    expected = score_info_nce(scores[keep][:, keep])
    torch.testing.assert_close(paired_score_info_nce(scores, paired), expected)
    changed = scores.detach().clone()
    changed[2] += 5.0
    changed[:, 2] -= 5.0
    torch.testing.assert_close(paired_score_info_nce(changed, paired), expected)
    # by hand: rows and columns of the kept 3 x 3 block, each a cross-entropy with the diagonal as the target
    block = scores[keep][:, keep].detach() / 0.07
    by_hand = sum(-torch.log_softmax(block, 1)[k, k] - torch.log_softmax(block, 0)[k, k] for k in range(3)) / 6
    torch.testing.assert_close(expected, by_hand)
    one_pair = paired_score_info_nce(scores, torch.tensor([True, False, False, False]))
    one_pair.backward()
    assert one_pair.item() == 0.0 and scores.grad is not None and scores.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="square"):
        score_info_nce(torch.zeros(2, 3))


def test_feature_distillation_pulls_the_student_to_the_frozen_teacher():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 12, requires_grad=True)
    student = torch.randn(2, 5, 8, requires_grad=True)
    projection = nn.Linear(8, 12)
    loss = feature_distillation(student, teacher, projection)
    normalised = torch.nn.functional.layer_norm(teacher.detach(), (12,))
    expected = torch.nn.functional.smooth_l1_loss(projection(student), normalised)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert teacher.grad is None and student.grad is not None and projection.weight.grad is not None
    exact = nn.Identity()
    assert feature_distillation(normalised, teacher, exact).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="differ"):
        feature_distillation(student, teacher, nn.Identity())
