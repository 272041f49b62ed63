"""Prototypes, label propagation, pseudo-label selection, label smoothing, mixup and the lambda schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hsfm_train.errors import ConfigError, DataFormatError
from hsfm_train.fewshot.transfer import (MixupConfig, MixupSchedule, PseudoLabelConfig, confident_pseudo_labels,
                                         gaussian_affinity, gaussian_wasserstein, mix, mixup, normalised_affinity,
                                         propagate_labels, prototype_logits, prototypes, sample_beta, smooth_labels)


def _two_clusters(per_cluster: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two tight clusters far apart; one labelled point in each (labels 1 and 0: not the cluster order)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 10.0, 0.0]])
    points = torch.cat([centre + 0.5 * torch.randn(per_cluster, 3, generator=generator) for centre in centres])
    truth = torch.tensor([1] * per_cluster + [0] * per_cluster)
    given = torch.full((2 * per_cluster,), -1)
    given[0], given[per_cluster] = 1, 0
    return points, truth, given


def test_prototypes_and_logits_by_hand():
    embeddings = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [3.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    centres = prototypes(embeddings, labels, 2)
    torch.testing.assert_close(centres, torch.tensor([[1.0, 0.0], [2.0, 4.0]]))
    logits = prototype_logits(torch.tensor([[1.0, 1.0]]), centres)
    torch.testing.assert_close(logits, torch.tensor([[-1.0, -(1.0 + 9.0)]]))
    with pytest.raises(DataFormatError, match="without a sample"):
        prototypes(embeddings, torch.tensor([0, 0, 2, 2]), 3)


@pytest.mark.parametrize("knn", [0, 8])
def test_label_propagation_gives_every_point_its_cluster_label(knn):
    points, truth, given = _two_clusters()
    config = PseudoLabelConfig(sigma=2.0, knn=knn)
    result = propagate_labels(points, given, 2, config)
    assert torch.equal(result.labels, truth)
    assert ((result.confidence > 0.5) & (result.confidence <= 1.0)).all()


def test_the_closed_form_and_the_iteration_agree():
    points, _, given = _two_clusters(seed=1)
    points = points + 2.0 * torch.randn(points.shape, generator=torch.Generator().manual_seed(5))  # overlap
    for knn in (0, 6):
        exact = propagate_labels(points, given, 2, PseudoLabelConfig(sigma=3.0, knn=knn, solver="solve"))
        iterated = propagate_labels(points, given, 2, PseudoLabelConfig(sigma=3.0, knn=knn, solver="iterate"))
        torch.testing.assert_close(iterated.scores.double(), exact.scores, rtol=1e-4, atol=1e-5)
        # and both are the fixed point F = alpha S F + Y
        graph = normalised_affinity(gaussian_affinity(points.double(), 3.0, knn))
        graph = graph.to_dense() if graph.is_sparse else graph
        y = torch.nn.functional.one_hot(given.clamp_min(0), 2).double() * (given >= 0)[:, None]
        torch.testing.assert_close(0.9 * graph @ exact.scores + y, exact.scores)


def test_affinity_is_gaussian_with_a_zero_diagonal_and_knn_keeps_k_per_row():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], dtype=torch.float64)
    weights = gaussian_affinity(x, sigma=5.0)
    assert torch.equal(weights.diagonal(), torch.zeros(3, dtype=torch.float64))
    assert weights[0, 1].item() == pytest.approx(math.exp(-25.0 / 50.0))
    assert weights[0, 2].item() == pytest.approx(math.exp(-100.0 / 50.0))
    sparse = gaussian_affinity(x, sigma=5.0, knn=1).to_dense()
    torch.testing.assert_close(sparse, sparse.T)
    assert sparse[0, 2] == 0 and sparse[0, 1] > 0  # 2 is not 0's nearest neighbour, nor 0 its


def test_confident_pseudo_labels_keep_the_top_k_per_class_among_candidates():
    labels = torch.tensor([0, 0, 0, 1, 1, 0, 1, 2])
    confidence = torch.tensor([0.9, 0.5, 0.7, 0.6, 0.95, 0.99, 0.0, 0.8])
    candidates = torch.tensor([True, True, True, True, True, False, True, True])
    index, label = confident_pseudo_labels(labels, confidence, 3, top_k=2, candidates=candidates)
    assert index.tolist() == [0, 2, 4, 3, 7]  # 5 is not a candidate, 6 has no confidence
    assert label.tolist() == [0, 0, 1, 1, 2]


def test_label_smoothing_rows_sum_to_one_and_keep_the_class():
    smoothed = smooth_labels(torch.tensor([2, 0]), 4, epsilon=0.2)
    torch.testing.assert_close(smoothed.sum(1), torch.ones(2))
    torch.testing.assert_close(smoothed[0], torch.tensor([0.05, 0.05, 0.85, 0.05]))
    with pytest.raises(ConfigError):
        smooth_labels(torch.tensor([0]), 2, epsilon=1.0)


def test_mixup_mixes_samples_and_soft_labels_with_one_lambda():
    xs, xt = torch.ones(3, 2, 9, 9), torch.zeros(3, 2, 9, 9)
    ys, yt = smooth_labels(torch.tensor([0, 1, 2]), 3, 0.0), smooth_labels(torch.tensor([1, 1, 1]), 3, 0.0)
    x, y = mixup(xs, ys, xt, yt, 0.3)
    torch.testing.assert_close(x, torch.full_like(xs, 0.3))
    torch.testing.assert_close(y[0], torch.tensor([0.3, 0.7, 0.0]))
    torch.testing.assert_close(y.sum(1), torch.ones(3))
    per_sample = mix(xs, xt, torch.tensor([0.0, 0.5, 1.0]))
    assert per_sample[0].max() == 0 and per_sample[1].unique().tolist() == [0.5] and per_sample[2].min() == 1
    with pytest.raises(DataFormatError, match="differ in shape"):
        mix(torch.ones(2, 50), torch.ones(2, 40), 0.5)


def test_beta_draws_lie_in_the_open_interval_with_mean_one_half():
    draws = sample_beta(np.random.default_rng(0), 2.0, 2.0, size=4000)
    assert ((draws > 0) & (draws < 1)).all()
    assert draws.mean() == pytest.approx(0.5, abs=0.02)
    assert draws.var() == pytest.approx(1 / 20, abs=0.005)  # Beta(2, 2): ab / ((a+b)^2 (a+b+1))
    assert sample_beta(np.random.default_rng(3)) == sample_beta(np.random.default_rng(3))


def test_gaussian_wasserstein_is_zero_for_one_set_and_the_mean_gap_for_a_shift():
    points = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    assert gaussian_wasserstein(points, points) == pytest.approx(0.0, abs=1e-5)
    shift = torch.tensor([3.0, -1.0, 0.0, 2.0, 0.0, 0.5])
    assert gaussian_wasserstein(points, points + shift) == pytest.approx(float(shift.norm()), rel=1e-5)
    # one-dimensional Gaussians: W2 = sqrt((mu1 - mu2)^2 + (s1 - s2)^2)
    line = points[:, :1]
    scaled = 3.0 * line + 1.0
    s1, s2 = line.double().std(unbiased=False), scaled.double().std(unbiased=False)
    mu1, mu2 = line.double().mean(), scaled.double().mean()
    assert gaussian_wasserstein(line, scaled) == pytest.approx(float(((mu1 - mu2) ** 2 + (s1 - s2) ** 2).sqrt()),
                                                               rel=1e-6)


def test_the_schedule_leans_target_while_far_and_moves_to_the_source_as_the_domains_close():
    schedule = MixupSchedule(MixupConfig(temperature=0.05, perturbation=0.2))
    shifts = []
    for distance in (8.0, 6.0, 4.0, 2.0, 0.5):  # the first distance is the reference
        schedule.update(distance)
        shifts.append(schedule.shift())
    assert shifts[0] == pytest.approx(-0.2, abs=1e-6)  # as far apart as at the start: lean to the target
    assert shifts[2] == pytest.approx(0.0, abs=1e-9)  # half the starting distance
    assert shifts[-1] == pytest.approx(0.2, abs=1e-4)
    assert all(a <= b for a, b in zip(shifts, shifts[1:]))
    far, near = MixupSchedule(), MixupSchedule()
    far.update(8.0)
    near.update(8.0)
    near.update(1.0)
    far_draws, near_draws = far.sample(np.random.default_rng(0), 2000), near.sample(np.random.default_rng(0), 2000)
    assert far_draws.mean() == pytest.approx(0.3, abs=0.02) and near_draws.mean() == pytest.approx(0.7, abs=0.02)
    assert far_draws.min() >= 0.0 and near_draws.max() <= 1.0
    restored = MixupSchedule()
    restored.load_state_dict(near.state_dict())
    assert restored.shift() == near.shift()
    with pytest.raises(ConfigError, match="temperature"):
        MixupSchedule(MixupConfig(temperature=0.0))
