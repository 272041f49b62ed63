"""Patches, the K-shot target split and source episodes (on the real Indian Pines ground truth where cheap)."""
from __future__ import annotations

import numpy as np
import pytest

from hsfm_train.errors import ConfigError, DataFormatError
from hsfm_train.fewshot.episodes import EpisodeConfig, SourceEpisodes, extract_patches, patches_at, target_split
from hsfm_train.stages.probe import sample_support
from tests.conftest import shared_file

LABEL_MAPS = "classification/label_maps/label_maps.npz"


def _indian_pines_labels() -> np.ndarray:
    with np.load(shared_file(LABEL_MAPS), allow_pickle=False) as archive:
        return archive["Indian_pines_gt"]


def _cube(height: int = 7, width: int = 6, bands: int = 3) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(height, width, bands)).astype(np.float32)


def test_patches_are_centred_on_their_pixel():
    cube = _cube()
    rows, cols = np.array([0, 3, 6, 2]), np.array([0, 2, 5, 4])
    patches = extract_patches(cube, rows, cols, size=9)
    assert patches.shape == (4, 9, 9, 3) and patches.dtype == cube.dtype
    np.testing.assert_array_equal(patches[:, 4, 4], cube[rows, cols])


def test_patches_are_reflect_padded_at_the_borders_like_numpy():
    cube = _cube()
    size = 5
    padded = np.pad(cube, ((2, 2), (2, 2), (0, 0)), mode="reflect")
    rows, cols = np.divmod(np.arange(cube.shape[0] * cube.shape[1]), cube.shape[1])
    patches = patches_at(cube, np.arange(rows.size), size)
    for patch, row, col in zip(patches, rows, cols):
        np.testing.assert_array_equal(patch, padded[row:row + size, col:col + size])
    # the corner by hand: row/column -1 and -2 mirror rows/columns 1 and 2 (the edge is not repeated)
    corner = extract_patches(cube, [0], [0], size)[0]
    np.testing.assert_array_equal(corner[0, 0], cube[2, 2])
    np.testing.assert_array_equal(corner[1, 2], cube[1, 0])


def test_patches_wider_than_the_image_still_mirror():
    cube = _cube(3, 2, 1)
    padded = np.pad(cube, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(extract_patches(cube, [2], [1], 9)[0], padded[2:11, 1:10])


@pytest.mark.parametrize("size", [8, 0, -3, 2.0])
def test_even_or_non_positive_patch_sizes_are_refused(size):
    with pytest.raises(ConfigError, match="odd positive"):
        extract_patches(_cube(), [1], [1], size)


def test_pixels_outside_the_cube_are_refused():
    with pytest.raises(DataFormatError, match="outside"):
        extract_patches(_cube(), [7], [0], 3)


def test_target_split_on_indian_pines():
    labels = _indian_pines_labels()
    flat = labels.reshape(-1)
    split = target_split(labels, shots=5, seed=0)
    np.testing.assert_array_equal(split.classes, np.arange(1, 17))
    assert np.bincount(split.support_labels, minlength=16).tolist() == [5] * 16
    assert np.intersect1d(split.support, split.query).size == 0
    np.testing.assert_array_equal(np.union1d(split.support, split.query), np.flatnonzero(flat > 0))
    assert (flat[split.support] > 0).all() and (flat[split.query] > 0).all()
    np.testing.assert_array_equal(split.classes[split.support_labels], flat[split.support])
    np.testing.assert_array_equal(split.classes[split.query_labels], flat[split.query])
    assert split.query.size == 10249 - 80
    # the probe's draw: the same seed and K give the probe's training pixels
    np.testing.assert_array_equal(split.support, sample_support(labels, 5, seed=0)[0])
    again, other = target_split(labels, 5, seed=0), target_split(labels, 5, seed=1)
    np.testing.assert_array_equal(again.support, split.support)
    assert not np.array_equal(other.support, split.support)


def test_target_split_gives_a_small_class_half_its_pixels_and_warns():
    labels = np.zeros((6, 6), dtype=np.int16)
    labels[0, :] = 3  # 6 pixels: fewer than 2K for K = 5
    labels[1:4, :] = 7  # 18 pixels
    labels[5, 0] = 9  # 1 pixel: support only
    with pytest.warns(UserWarning) as caught:
        split = target_split(labels, shots=5, seed=0)
    messages = [str(w.message) for w in caught]
    assert any("class 3 has 6 labelled pixels" in m for m in messages)
    assert any("class 9 has 1 labelled pixels" in m for m in messages)
    assert np.bincount(split.support_labels, minlength=3).tolist() == [3, 5, 1]
    assert np.bincount(split.query_labels, minlength=3).tolist() == [3, 13, 0]
    with pytest.raises(DataFormatError, match="no labelled pixel"):
        target_split(np.zeros((3, 3), dtype=np.int16))


def test_source_episodes_on_indian_pines_have_the_right_classes_and_counts():
    labels = _indian_pines_labels()
    flat = labels.reshape(-1)
    episodes = SourceEpisodes(labels, EpisodeConfig(n_way=5, n_support=5, n_query=15))
    assert episodes.skipped == {}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        episode = episodes.sample(rng)
        assert episode.classes.size == 5 and np.unique(episode.classes).size == 5
        assert np.isin(episode.classes, np.arange(1, 17)).all()
        assert np.bincount(episode.support_labels).tolist() == [5] * 5
        assert np.bincount(episode.query_labels).tolist() == [15] * 5
        both = np.concatenate([episode.support, episode.query])
        assert np.unique(both).size == both.size  # no pixel twice within an episode
        np.testing.assert_array_equal(flat[episode.support], episode.classes[episode.support_labels])
        np.testing.assert_array_equal(flat[episode.query], episode.classes[episode.query_labels])
        seen.add(tuple(episode.classes))
    assert len(seen) > 1  # the classes are drawn, not fixed
    first = SourceEpisodes(labels, EpisodeConfig(n_way=5)).sample(np.random.default_rng(7))
    second = SourceEpisodes(labels, EpisodeConfig(n_way=5)).sample(np.random.default_rng(7))
    np.testing.assert_array_equal(first.support, second.support)
    np.testing.assert_array_equal(first.query, second.query)


def test_source_episodes_skip_small_classes_with_a_count_and_use_all_the_rest_by_default():
    labels = _indian_pines_labels()
    with pytest.warns(UserWarning, match="2 classes have fewer than"):
        episodes = SourceEpisodes(labels, EpisodeConfig(n_way=0, n_support=5, n_query=25))
    assert episodes.skipped == {7: 28, 9: 20}  # Grass-pasture-mowed and Oats
    episode = episodes.sample(np.random.default_rng(0))
    np.testing.assert_array_equal(episode.classes, [c for c in range(1, 17) if c not in (7, 9)])
    assert episode.support.size == 14 * 5 and episode.query.size == 14 * 25
    with pytest.raises(ConfigError, match="n_way=15"), pytest.warns(UserWarning, match="skipped"):
        SourceEpisodes(labels, EpisodeConfig(n_way=15, n_support=5, n_query=25))
    with pytest.raises(ConfigError, match="n_query"):
        SourceEpisodes(labels, EpisodeConfig(n_query=0))
