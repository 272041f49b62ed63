"""The few-shot tile readout (hsfm_train/fewshot/embedder.py): the probe's whole-scene features, now with
gradients; one encoding per scene and step; crops of a source scene addressed by the scene's own pixel indices.
A micro random backbone on a crop of real Salinas-A: these tests check the machinery, not accuracy."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from hsfm_train.data.readers import read_scene
from hsfm_train.fewshot.adapters import AdapterConfig
from hsfm_train.fewshot.embedder import Domain, EmbeddingRunner, build_embedder
from hsfm_train.fewshot.episodes import EpisodeConfig, SourceEpisodes
from hsfm_train.models.mae import ModelConfig, SpectralMAE
from hsfm_train.stages import fewshot
from hsfm_train.stages.probe import pixel_features
from tests.conftest import shared_file

MICRO = dict(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
             spectral_channels=8, spectral_basis=8, patch_size=4)


@pytest.fixture(scope="module")
def domain() -> Domain:
    """Salinas-A rows 58-79, columns 6-27 (22 x 22: not a multiple of the patch size), every 4th corrected band,
    standardised per band."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the preset's calibration note
        scene = read_scene(shared_file("classification/salinasA/salinasA.npz"), sensor_preset="aviris",
                           bands="corrected")
    cube = scene.cube[58:80, 6:28, ::4].astype(np.float32)
    cube = (cube - cube.mean(axis=(0, 1))) / cube.std(axis=(0, 1))
    return Domain(path="crop", name="salinasA_crop", kind="target", cube=np.ascontiguousarray(cube),
                  wavelengths=np.asarray(scene.wavelengths_nm[::4], dtype=np.float32),
                  labels=scene.labels[58:80, 6:28].reshape(-1).astype(np.int64), normalisation="own")


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return SpectralMAE(ModelConfig(**MICRO), with_decoder=False).eval()


def _embedder(backbone, kind: str = "linear", tile_size: int = 256, tile_overlap: int = 64):
    return build_embedder(backbone, AdapterConfig(kind=kind), 16, "tile", 9, seed=0, tile_size=tile_size,
                          tile_overlap=tile_overlap)


@pytest.mark.parametrize("tile_size, tile_overlap", [(256, 64), (12, 4)])
def test_tile_features_are_the_probes_features_averaged_over_groups(domain, backbone, tile_size, tile_overlap):
    """Whole scene in one tile, and 3 x 3 patch tiles overlapping by one patch: the differentiable readout gives
    exactly what `hsfm probe` reads (its groups concatenated; here averaged) at every pixel."""
    embedder = _embedder(backbone, tile_size=tile_size, tile_overlap=tile_overlap)
    height, width, _ = domain.cube.shape
    image = torch.from_numpy(domain.cube.transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        grid = embedder.context_grid(image, torch.as_tensor(domain.wavelengths))
        ours = embedder.sample_grid(grid, np.arange(height * width), width).numpy()
    probe = pixel_features(backbone, domain.cube, domain.wavelengths, tile_size=tile_size, tile_overlap=tile_overlap)
    groups = probe.shape[1] // MICRO["embed_dim"]
    assert groups == 2  # VNIR and SWIR bands
    expected = probe.reshape(len(probe), groups, MICRO["embed_dim"]).mean(axis=1)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_the_tile_readout_trains_the_adapter_and_sees_the_whole_scene(domain, backbone):
    embedder = _embedder(backbone, kind="cp")
    runner = EmbeddingRunner(embedder, torch.device("cpu"))
    pixel = np.array([0])  # the top-left corner
    embedded = runner.embed(domain, pixel)
    embedded.pow(2).sum().backward()
    coalescent = [p for n, p in embedder.named_parameters() if "coalescent" in n]
    assert coalescent and all(p.grad is not None and p.grad.abs().sum() > 0 for p in coalescent)
    assert all(p.grad is None for n, p in embedder.named_parameters() if not p.requires_grad)
    # a pixel on the far side of the scene changes the corner's embedding: attention spans the scene
    far = Domain(**{**domain.__dict__, "cube": domain.cube.copy()})
    far.cube[-1, -1] += 5.0
    with torch.no_grad():
        assert not torch.allclose(runner.embed_all(domain, pixel), EmbeddingRunner(embedder, runner.device)
                                  .embed_all(far, pixel))


def test_a_scene_is_encoded_once_per_step(domain, backbone, monkeypatch):
    embedder = _embedder(backbone)
    calls = []
    encode = embedder.backbone.encode
    monkeypatch.setattr(embedder.backbone, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    runner = EmbeddingRunner(embedder, torch.device("cpu"))
    first = runner.embed(domain, np.arange(10))
    second = runner.embed(domain, np.arange(10, 30))
    assert len(calls) == 1 and first.requires_grad and second.requires_grad
    with torch.no_grad():
        runner.embed(domain, np.arange(5))  # no-grad reads are encoded apart: a grad-free grid cannot train
    assert len(calls) == 2
    runner.forget()
    runner.embed(domain, np.arange(10))
    assert len(calls) == 3


def test_a_crop_is_read_with_the_scenes_own_pixel_indices(domain, backbone):
    """Embedding pixels of a crop through their scene indices equals embedding the crop as a scene of its own."""
    runner = EmbeddingRunner(_embedder(backbone), torch.device("cpu"))
    r0, c0, h, w = window = (5, 7, 12, 10)
    width = domain.shape[1]
    local = np.array([0, 3, 11, 57, h * w - 1])
    rows, cols = np.divmod(local, w)
    scene_indices = (rows + r0) * width + (cols + c0)
    crop = Domain(**{**domain.__dict__, "cube": np.ascontiguousarray(domain.cube[r0:r0 + h, c0:c0 + w])})
    with torch.no_grad():
        through_scene = runner.embed(domain, scene_indices, window)
        alone = EmbeddingRunner(runner.embedder, runner.device).embed(crop, local)
    torch.testing.assert_close(through_scene, alone)


def test_source_episodes_of_the_tile_readout_lie_in_one_crop(domain):
    config = fewshot.FewshotConfig(readout="tile", source_crop=14,
                                   episodes=EpisodeConfig(n_support=2, n_query=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = SourceEpisodes(domain.labels, config.episodes)
    rng = np.random.default_rng(0)
    height, width = domain.shape
    labels = domain.labels
    for _ in range(10):
        draw = fewshot.crop_source_episode(domain, sampler, config, rng)
        r0, c0, h, w = draw.window
        assert (h, w) == (14, 14) and 0 <= r0 <= height - h and 0 <= c0 <= width - w
        pixels = np.concatenate([draw.episode.support, draw.episode.query])
        rows, cols = np.divmod(pixels, width)
        assert ((rows >= r0) & (rows < r0 + h) & (cols >= c0) & (cols < c0 + w)).all()
        assert draw.n_way >= 2 and len(draw.episode.support) == 2 * draw.n_way
        # one local label per class, the same on support and query
        local = np.concatenate([draw.episode.support_labels, draw.episode.query_labels])
        for position in range(draw.n_way):
            assert len(np.unique(labels[pixels[local == position]])) == 1


def test_the_joint_readout_is_the_tile_feature_beside_the_window_centre(domain, backbone):
    """readout=tile+centre: the head reads [tile feature, window centre token] of the same adapted backbone,
    each exactly what its own readout gives; both blocks train the adapter; a crop addresses windows in the
    whole scene (a window near the crop's edge still sees the pixels beyond it)."""
    joint = build_embedder(backbone, AdapterConfig(kind="cp"), 16, "tile+centre", 5, seed=0)
    tile = build_embedder(backbone, AdapterConfig(kind="cp"), 16, "tile", 5, seed=0)
    centre = build_embedder(backbone, AdapterConfig(kind="cp"), 16, "centre", 5, seed=0)
    assert joint.head.in_features == 2 * backbone.config.embed_dim and joint.reads_tiles and joint.reads_windows
    pixels = np.array([0, 23, 250, domain.shape[0] * domain.shape[1] - 1])
    features = {}
    for name, embedder in (("joint", copy.deepcopy(joint)), ("tile", tile), ("centre", centre)):
        embedder.head = torch.nn.Identity()  # the features the head reads
        features[name] = EmbeddingRunner(embedder, torch.device("cpu")).embed_all(domain, pixels)
    torch.testing.assert_close(features["joint"], torch.cat([features["tile"], features["centre"]], dim=1))
    runner = EmbeddingRunner(joint, torch.device("cpu"))
    runner.embed(domain, pixels).pow(2).sum().backward()
    coalescent = [p for n, p in joint.named_parameters() if "coalescent" in n]
    assert coalescent and all(p.grad is not None and p.grad.abs().sum() > 0 for p in coalescent)
    # inside a crop: the tile block reads the crop alone, the window block the scene around the pixel
    window = (5, 7, 12, 10)
    inside = np.array([5 * domain.shape[1] + 7])  # the crop's top-left pixel
    joint.head = torch.nn.Identity()
    with torch.no_grad():
        cropped = EmbeddingRunner(joint, runner.device).embed(domain, inside, window)
        whole = EmbeddingRunner(joint, runner.device).embed(domain, inside)
    d = backbone.config.embed_dim
    torch.testing.assert_close(cropped[:, d:], whole[:, d:])  # the same window
    assert not torch.allclose(cropped[:, :d], whole[:, :d])  # a different context
