"""The spectral MAE and its parts: one backbone for every band set (hyperspectral, RGB, SAR), padding that does not
leak, band-density-independent quadrature, masking, encoder-only builds, config validation, the LSMM head's
wavelength grid, and endmember starts (USGS library, VCA on the real Samson scene)."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from hsfm_train.errors import ConfigError, DataFormatError
from hsfm_train.spectra import library_endmembers, vca
from hsfm_train.models.heads import LSMMHead
from hsfm_train.models.mae import LSMMConfig, ModelConfig, SpectralMAE
from hsfm_train.models.tokenizers import band_groups, check_wavelengths, quadrature_weights
from tests.conftest import shared_file

EDGES = [1000.0, 100000.0]  # the default VNIR | SWIR | microwave edges
SAMSON_NM = np.linspace(400.93872, 899.07458, 156)
AVIRIS_NM = np.linspace(365.0, 2500.0, 224)
# water-absorption bands removed as in the public AVIRIS benchmarks (Salinas-like 204, a wider cut for 188)
AVIRIS_204 = np.delete(AVIRIS_NM, np.r_[107:112, 153:167, 223])
AVIRIS_188 = np.delete(AVIRIS_NM, np.r_[104:116, 150:170, 220:224])

# name -> (wavelengths nm, expected present group ids)
BAND_SETS = {
    "samson156": (SAMSON_NM, [0]),
    "urban162": (np.linspace(400.0, 2500.0, 162), [0, 1]),
    "aviris224": (AVIRIS_NM, [0, 1]),
    "aviris204": (AVIRIS_204, [0, 1]),
    "aviris188": (AVIRIS_188, [0, 1]),
    "enmap218": (np.linspace(420.0, 2450.0, 218), [0, 1]),
    "rgb3": (np.array([490.0, 560.0, 665.0]), [0]),
    "sar_c_band1": (np.array([5.55e7]), [2]),  # Sentinel-1 C-band, 5.55 cm
}


def _wavelengths(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float32))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def shared_model() -> tuple[SpectralMAE, dict[str, torch.Size]]:
    """ONE model for every band set; the shapes of its parameters are recorded to show nothing is re-created."""
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig())
    return model, {name: p.shape for name, p in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- any band set


@pytest.mark.parametrize("name", list(BAND_SETS))
def test_one_model_tokenizes_and_reconstructs_every_band_set(shared_model, name):
    model, shapes_at_build = shared_model
    wavelengths_np, expected_groups = BAND_SETS[name]
    wavelengths = _wavelengths(wavelengths_np)
    bands, n, size = wavelengths.numel(), 2, 16
    patches = (size // model.config.patch_size) ** 2
    groups = len(expected_groups)
    torch.manual_seed(1)
    hsi = torch.randn(n, bands, size, size)

    model.train()
    model.zero_grad(set_to_none=True)
    out = model(hsi, wavelengths, generator=_generator(0))
    assert out.prediction.shape == hsi.shape
    assert out.token_mask.shape == (n, groups, patches) and out.token_mask.dtype == torch.bool
    assert out.present.tolist() == expected_groups
    assert out.membership.shape == (n, bands, 3)
    # every band is in exactly one group, and it is the expected one
    assert (out.membership.sum(dim=-1) == 1).all()
    assert set(out.membership.nonzero()[:, 2].tolist()) == set(expected_groups)
    # 75 % masking: exactly int(G*P/4) tokens visible per sample
    keep = int(groups * patches * (1 - model.config.mask_ratio))
    assert (out.token_mask.flatten(1).sum(dim=1) == groups * patches - keep).all()
    assert out.token_mask.float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert out.latent.shape == (n, 1 + keep, model.config.embed_dim)

    encoded = model.encode(hsi, wavelengths)
    assert encoded.shape == (n, 1 + groups * patches, model.config.embed_dim)
    assert torch.isfinite(encoded).all()

    out.prediction.square().mean().backward()
    embed = model.patch_embed
    for group in range(embed.num_groups):
        grad = embed.projections[group].weight.grad
        if group in expected_groups:
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, group
        else:
            assert grad is None, f"group {group} has no bands in {name} but its projection got a gradient"
    response_grad = embed.response.mlp[0].weight.grad
    assert response_grad is not None and torch.isfinite(response_grad).all() and response_grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    # nothing was (re)built for this band count
    assert {k: p.shape for k, p in model.state_dict().items()} == shapes_at_build


def test_samples_of_a_batch_are_encoded_independently(shared_model):
    """A 1-D wavelength vector is broadcast over the batch, and each sample's encoding does not depend on the
    others (no cross-sample mixing in a homogeneous batch)."""
    model, _ = shared_model
    model.eval()
    wavelengths = _wavelengths(BAND_SETS["enmap218"][0])
    torch.manual_seed(2)
    hsi = torch.randn(3, wavelengths.numel(), 16, 16)
    with torch.no_grad():
        together = model.encode(hsi, wavelengths)
        alone = model.encode(hsi[1:2], wavelengths.expand(1, -1))
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ padding


def _samson_tiles() -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(shared_file("unmixing/samson/samson.npz"))
    cube = torch.from_numpy(data["cube"]).permute(2, 0, 1)  # [156, 95, 95]
    tiles = torch.stack([cube[:, :16, :16], cube[:, 40:56, 60:76]])
    mean, std = tiles.mean(dim=(0, 2, 3), keepdim=True), tiles.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    return (tiles - mean) / std, torch.from_numpy(data["wavelengths_nm"].astype(np.float32))


@pytest.mark.parametrize("pad_wavelength", [float("nan"), 0.0, 2000.0],
                         ids=["nan_like_collate", "zero", "swir_value"])
def test_padded_bands_do_not_leak_into_the_real_bands(shared_model, pad_wavelength):
    model, _ = shared_model
    model.eval()
    hsi, wavelengths = _samson_tiles()
    n, bands = hsi.shape[:2]
    extra = 44
    torch.manual_seed(3)
    padded_hsi = torch.cat([hsi, 100 * torch.randn(n, extra, 16, 16)], dim=1)  # garbage in the padding
    padded_wavelengths = torch.cat([wavelengths.expand(n, -1), torch.full((n, extra), pad_wavelength)], dim=1)
    band_mask = torch.zeros(n, bands + extra, dtype=torch.bool)
    band_mask[:, :bands] = True
    with torch.no_grad():
        plain = model(hsi, wavelengths, generator=_generator(7))
        padded = model(padded_hsi, padded_wavelengths, band_mask=band_mask, generator=_generator(7))
    assert padded.present.tolist() == plain.present.tolist() == [0]  # a padded SWIR wavelength adds no group
    assert torch.equal(padded.token_mask, plain.token_mask)
    assert not padded.membership[:, bands:].any()
    torch.testing.assert_close(padded.prediction[:, :bands], plain.prediction, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(padded_hsi, padded_wavelengths, band_mask),
                                   model.encode(hsi, wavelengths), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ quadrature


def _weights(wavelengths: torch.Tensor, band_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if band_mask is None:
        band_mask = torch.ones(wavelengths.shape, dtype=torch.bool)
    membership = band_groups(wavelengths, band_mask, EDGES)
    return quadrature_weights(wavelengths, membership), membership


def test_quadrature_weights_sum_to_one_per_sample_and_group():
    # sample 0: AVIRIS with water-band gaps (VNIR + SWIR); sample 1: Samson padded with NaN; sample 2: RGB + SAR
    width = AVIRIS_188.size
    wavelengths = torch.full((3, width), float("nan"))
    band_mask = torch.zeros(3, width, dtype=torch.bool)
    wavelengths[0] = _wavelengths(AVIRIS_188)
    band_mask[0] = True
    wavelengths[1, :156] = _wavelengths(SAMSON_NM)
    band_mask[1, :156] = True
    wavelengths[2, :4] = torch.tensor([490.0, 560.0, 665.0, 5.55e7])
    band_mask[2, :4] = True
    weights, membership = _weights(wavelengths, band_mask)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert (weights[~band_mask] == 0).all()
    sums = torch.einsum("nb,nbg->ng", weights, membership.float())
    has_bands = membership.any(dim=1)
    torch.testing.assert_close(sums[has_bands], torch.ones(int(has_bands.sum())))
    assert (sums[~has_bands] == 0).all()
    assert has_bands.tolist() == [[True, True, False], [True, False, False], [True, False, True]]
    assert weights[2, 3].item() == pytest.approx(1.0)  # the lone SAR band


def test_uniform_grid_gives_equal_weights_and_half_weights_at_the_ends():
    wavelengths = torch.linspace(400.0, 900.0, 51)[None]  # 10 nm: width 10 inside, 5 at each end, total 500
    weights, _ = _weights(wavelengths)
    torch.testing.assert_close(weights[0, 1:-1], torch.full((49,), 0.02))
    torch.testing.assert_close(weights[0, [0, -1]], torch.full((2,), 0.01))
    # the order of the bands does not matter
    permutation = torch.randperm(51, generator=_generator(0))
    shuffled, _ = _weights(wavelengths[:, permutation])
    torch.testing.assert_close(shuffled, weights[:, permutation])


def test_one_band_group_gets_weight_one_and_two_bands_share_it():
    wavelengths = torch.tensor([[450.0, 550.0, 650.0, 1600.0, 5.55e7]])
    weights, _ = _weights(wavelengths)
    torch.testing.assert_close(weights[0, 3:], torch.ones(2))  # a one-band SWIR group, a one-band SAR group
    torch.testing.assert_close(weights[0, :3], torch.tensor([0.25, 0.5, 0.25]))
    two, _ = _weights(torch.tensor([[500.0, 700.0]]))
    torch.testing.assert_close(two[0], torch.tensor([0.5, 0.5]))


def test_virtual_channels_do_not_depend_on_band_density():
    """v_k = sum_b r_k(lambda_b) w_b I(lambda_b) for a smooth spectrum and smooth responses: a 3 nm grid and a
    10 nm grid (3x fewer bands) give the same virtual channels, and both match the continuous average."""

    def spectrum(lam):
        return 0.3 + 0.2 * torch.sin(lam / 90.0) + 0.1 * torch.exp(-(((lam - 700.0) / 40.0) ** 2))

    centres = torch.linspace(420.0, 880.0, 8)

    def responses(lam):
        return torch.exp(-(((lam[..., None] - centres) / 60.0) ** 2))

    def virtual(grid):
        weights, _ = _weights(grid[None])
        return torch.einsum("nbk,nb->nk", responses(grid[None]) * weights[..., None], spectrum(grid[None]))[0]

    fine, coarse = torch.arange(400.0, 900.5, 3.0), torch.linspace(400.0, 900.0, 51)
    v_fine, v_coarse = virtual(fine), virtual(coarse)
    assert (v_fine - v_coarse).norm() / v_fine.norm() < 0.01  # measured 0.0044
    dense = torch.linspace(400.0, 900.0, 20001, dtype=torch.float64)
    continuous = (torch.trapezoid(responses(dense) * spectrum(dense)[:, None], dense, dim=0) / 500.0).float()
    for v in (v_fine, v_coarse):
        assert (v - continuous).norm() / continuous.norm() < 0.01
    # what the weights buy: unweighted sums differ by the band-count ratio (167 vs 51 bands)
    raw_fine = (responses(fine) * spectrum(fine)[:, None]).sum(0)
    raw_coarse = (responses(coarse) * spectrum(coarse)[:, None]).sum(0)
    assert (raw_fine - raw_coarse).norm() / raw_fine.norm() > 0.5


def test_a_band_beside_a_gap_does_not_dominate():
    """Water-band gaps: a band whose neighbour is far away counts that side as at most twice the near side."""
    wavelengths = torch.cat([torch.arange(1000.0, 1300.0, 10.0), torch.arange(1600.0, 1900.0, 10.0)])[None]
    weights, _ = _weights(wavelengths + 1.0)  # all SWIR
    interior = weights[0, 10]
    assert weights.max().item() == pytest.approx(1.5 * interior.item(), rel=1e-5)  # (10 + 2 x 10) / 2 nm
    assert weights[0].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_a_change_of_sampling_density_stays_local():
    """2.5 nm bands up to 600 nm, 10 nm beyond: the average of a smooth spectrum matches the continuous one."""
    grid = torch.cat([torch.arange(400.0, 600.0, 2.5), torch.arange(600.0, 900.5, 10.0)])
    weights, _ = _weights(grid[None])
    spectrum = 0.3 + 0.2 * torch.sin(grid / 90.0)
    dense = torch.linspace(400.0, 900.0, 20001, dtype=torch.float64)
    continuous = float(torch.trapezoid(0.3 + 0.2 * torch.sin(dense / 90.0), dense) / 500.0)
    assert float((weights[0] * spectrum).sum()) == pytest.approx(continuous, rel=0.01)


# ----------------------------------------------------------------------------------------- wavelengths


def test_nan_wavelength_on_a_real_band_is_named():
    wavelengths = torch.tensor([[500.0, 600.0, 700.0], [500.0, float("nan"), 700.0]])
    band_mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(DataFormatError, match=r"band 1 of sample 1 .*nan.*wavelengths_nm"):
        check_wavelengths(wavelengths, band_mask)
    with pytest.raises(DataFormatError, match="band 2 of sample 0"):
        check_wavelengths(torch.tensor([[500.0, 600.0, -1.0]]), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(DataFormatError, match="band 0 of sample 0"):
        check_wavelengths(torch.tensor([[0.0, 600.0]]), torch.ones(1, 2, dtype=torch.bool))


def test_nan_wavelength_on_a_padded_band_is_fine(shared_model):
    wavelengths = torch.tensor([[500.0, 600.0, float("nan")]])
    check_wavelengths(wavelengths, torch.tensor([[True, True, False]]))  # no error
    model, _ = shared_model
    hsi = torch.randn(1, 3, 16, 16)
    with pytest.raises(DataFormatError, match="band 2 of sample 0"):
        model(hsi, wavelengths)
    out = model(hsi, wavelengths, band_mask=torch.tensor([[True, True, False]]))
    assert torch.isfinite(out.prediction[:, :2]).all()


# --------------------------------------------------------------------------------------------- masking


def test_random_masking_keeps_exactly_the_budget_and_is_seeded():
    count, groups, patches = 4, 2, 16
    kept, mask, restore = SpectralMAE.random_masking(count, groups, patches, 0.75, _generator(5), torch.device("cpu"))
    keep = int(groups * patches * 0.25)
    assert kept.shape == (count, keep) and mask.shape == (count, groups * patches)
    assert (mask.sum(dim=1) == groups * patches - keep).all()
    assert not mask.gather(1, kept).any()  # the kept ids are exactly the unmasked tokens
    assert (kept.sort(dim=1).values == (~mask).nonzero()[:, 1].view(count, keep)).all()
    # restore undoes the shuffle
    shuffle = restore.argsort(dim=1)
    assert torch.equal(shuffle[:, :keep], kept)
    again = SpectralMAE.random_masking(count, groups, patches, 0.75, _generator(5), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip((kept, mask, restore), again))
    other = SpectralMAE.random_masking(count, groups, patches, 0.75, _generator(6), torch.device("cpu"))[1]
    assert not torch.equal(other, mask)
    assert len({tuple(row.tolist()) for row in mask}) == count  # different per sample
    # extremes: at least one token is kept; ratio 0 keeps all
    assert SpectralMAE.random_masking(2, 1, 4, 0.99, _generator(0), torch.device("cpu"))[0].shape == (2, 1)
    assert not SpectralMAE.random_masking(2, 1, 4, 0.0, _generator(0), torch.device("cpu"))[1].any()


def test_spatial_masking_masks_the_same_patches_in_every_group():
    count, groups, patches = 3, 3, 16
    kept, mask, _ = SpectralMAE.random_masking(count, groups, patches, 0.75, _generator(1), torch.device("cpu"),
                                               spatial=True)
    per_group = mask.view(count, groups, patches)
    assert (per_group == per_group[:, :1]).all()
    assert (per_group[:, 0].sum(dim=1) == patches - 4).all()
    assert kept.shape == (count, groups * 4)
    # independent masking (the default) does not align the groups
    independent = SpectralMAE.random_masking(count, groups, patches, 0.75, _generator(1), torch.device("cpu"))[1]
    assert not (independent.view(count, groups, patches) == independent.view(count, groups, patches)[:, :1]).all()


def test_band_mask_of_the_output_follows_the_token_mask(shared_model):
    model, _ = shared_model
    wavelengths = torch.tensor([450.0, 600.0, 800.0, 1200.0, 1600.0, 2200.0])
    out = model(torch.randn(2, 6, 16, 16), wavelengths, generator=_generator(4))
    pixel_mask = out.band_mask()
    assert pixel_mask.shape == (2, 6, 16, 16) and pixel_mask.dtype == torch.bool
    p, cols = model.config.patch_size, 2
    for n in range(2):
        for band in range(6):
            slot = out.present.tolist().index(int(out.membership[n, band].nonzero()))
            for row in range(16):
                for col in range(16):
                    token = (row // p) * cols + col // p
                    assert pixel_mask[n, band, row, col] == out.token_mask[n, slot, token]
    spatial = model(torch.randn(2, 6, 16, 16), wavelengths, generator=_generator(4), spatial_masking=True)
    spatial_pixels = spatial.band_mask()
    assert (spatial_pixels == spatial_pixels[:, :1]).all()  # a masked pixel has no band left visible
    assert spatial_pixels[:, 0].float().mean().item() == pytest.approx(0.75)


def test_tile_not_divisible_by_the_patch_size_names_crop_size(shared_model):
    model, _ = shared_model
    with pytest.raises(DataFormatError, match="crop_size"):
        model(torch.randn(1, 3, 20, 16), torch.tensor([490.0, 560.0, 665.0]))
    with pytest.raises(DataFormatError, match="20x16"):
        model.encode(torch.randn(1, 3, 20, 16), torch.tensor([490.0, 560.0, 665.0]))


# ------------------------------------------------------------------------------------------ encoder only


def test_encoder_only_model_is_a_subset_that_loads_the_full_weights():
    torch.manual_seed(0)
    full = SpectralMAE(ModelConfig(lsmm=LSMMConfig(num_endmembers=3)))
    encoder = SpectralMAE(ModelConfig(lsmm=LSMMConfig(num_endmembers=3)), with_decoder=False)
    full_keys, encoder_keys = set(full.state_dict()), set(encoder.state_dict())
    assert encoder_keys < full_keys
    assert not any(k.startswith(("decoder", "mask_token", "lsmm")) for k in encoder_keys)
    assert encoder.lsmm is None
    encoder.load_state_dict({k: v for k, v in full.state_dict().items() if k in encoder_keys})
    wavelengths = torch.tensor([490.0, 560.0, 665.0])
    hsi = torch.randn(2, 3, 16, 16)
    with pytest.raises(RuntimeError, match="encode"):
        encoder(hsi, wavelengths)
    full.eval()
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(hsi, wavelengths), full.encode(hsi, wavelengths))


# ------------------------------------------------------------------------------------------------ config


def test_model_config_rejects_impossible_values():
    with pytest.raises(ConfigError, match=r"embed_dim/num_heads: 130 is not divisible by 4"):
        ModelConfig(embed_dim=130)
    with pytest.raises(ConfigError, match="decoder_embed_dim/decoder_num_heads"):
        ModelConfig(decoder_embed_dim=96, decoder_num_heads=5)
    with pytest.raises(ConfigError, match="lsmm.resolution.*'voxel'"):
        ModelConfig(lsmm=LSMMConfig(resolution="voxel"))
    with pytest.raises(ConfigError, match="lsmm.resolution"):
        ModelConfig(lsmm={"num_endmembers": 3, "resolution": "band"})  # dicts (from YAML) are validated too
    with pytest.raises(ConfigError, match="mask_ratio"):
        ModelConfig(mask_ratio=1.0)
    config = ModelConfig(lsmm={"num_endmembers": 4, "resolution": "pixel"})
    assert isinstance(config.lsmm, LSMMConfig) and config.lsmm.num_endmembers == 4


# ------------------------------------------------------------------------------------------------- LSMM


def _head(resolution: str = "patch", count: int = 3) -> LSMMHead:
    torch.manual_seed(0)
    return LSMMHead(32, count, LSMMConfig().grid(), patch_size=8, resolution=resolution)


def test_endmembers_are_exact_on_the_grid_and_linear_between_points():
    head = _head()
    grid, table = head.grid_nm, head.endmembers.detach().t()  # [L, M]
    assert grid[0].item() == 350.0 and grid[-1].item() == 2550.0 and grid.numel() == 221
    with torch.no_grad():
        at_grid, valid = head.endmembers_at(grid.expand(2, -1))
        torch.testing.assert_close(at_grid[1], table, rtol=0, atol=0)
        assert valid.all()
        for t in (0.25, 0.5, 0.9):
            between = grid[:-1] + t * (grid[1:] - grid[:-1])
            values, _ = head.endmembers_at(between[None])
            torch.testing.assert_close(values[0], (1 - t) * table[:-1] + t * table[1:], rtol=1e-5, atol=1e-6)


def test_bands_outside_the_grid_are_invalid_and_zero():
    head = _head()
    wavelengths = torch.tensor([[5.55e7, 300.0, float("nan"), 349.9, 350.0, 2550.0, 2551.0]])
    with torch.no_grad():
        values, valid = head.endmembers_at(wavelengths)
    assert valid.tolist() == [[False, False, False, False, True, True, False]]
    assert (values[~valid] == 0).all()
    assert (values[valid] > 0).all()  # the random start is reflectance-like, in [0.05, 0.6]


def test_set_endmembers_round_trips_library_spectra():
    spectra, wavelengths = library_endmembers(3, 350.0, 2550.0)
    head = _head()
    head.set_endmembers(torch.from_numpy(spectra), torch.from_numpy(wavelengths))
    with torch.no_grad():
        values, valid = head.endmembers_at(torch.from_numpy(wavelengths)[None])
    assert valid.all()
    back, truth = values[0].t().double(), torch.from_numpy(spectra).double()
    # two linear interpolations (10 nm library -> 10 nm grid -> back): exact up to curvature at sharp features
    relative = (back - truth).norm(dim=1) / truth.norm(dim=1)
    assert (relative < 3e-3).all(), relative  # measured <= 1.8e-3
    # spectra that are linear in wavelength survive exactly, whatever the order and spacing they come in
    lam = torch.tensor([2400.0, 400.0, 1234.5, 800.0, 1800.0])
    linear = torch.stack([0.1 + 1e-4 * lam, 0.5 - 1e-4 * lam, torch.full_like(lam, 0.3)])
    head.set_endmembers(linear, lam)
    with torch.no_grad():
        values, _ = head.endmembers_at(lam[None])
    torch.testing.assert_close(values[0].t(), linear, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("resolution", ["patch", "pixel"])
def test_abundances_are_a_convex_combination(resolution):
    head = _head(resolution, count=4)
    abundances = head.abundances(3 * torch.randn(2, 5, 32))
    expected = (2, 5, 4) if resolution == "patch" else (2, 5, 64, 4)
    assert abundances.shape == expected
    assert (abundances >= 0).all()
    torch.testing.assert_close(abundances.sum(dim=-1), torch.ones(expected[:-1]))


@pytest.mark.parametrize("resolution", ["patch", "pixel"])
def test_model_with_lsmm_outputs_abundances(resolution):
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig(lsmm=LSMMConfig(num_endmembers=3, resolution=resolution)))
    out = model(torch.randn(2, 6, 16, 16), torch.tensor([450.0, 600.0, 800.0, 1200.0, 1600.0, 2200.0]))
    expected = (2, 4, 3) if resolution == "patch" else (2, 4, 64, 3)
    assert out.abundances.shape == expected
    assert (out.abundances >= 0).all()
    torch.testing.assert_close(out.abundances.sum(dim=-1), torch.ones(expected[:-1]))
    assert model.lsmm.endmembers.shape == (3, 221)


# ------------------------------------------------------------------------------------------- endmembers


def _angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.degrees(np.arccos(np.clip(a @ b.T, -1.0, 1.0)))


def test_vca_finds_the_samson_endmembers():
    data = np.load(shared_file("unmixing/samson/samson.npz"))
    pixels = data["cube"].reshape(-1, data["cube"].shape[-1])
    found = vca(pixels, 3, seed=0)
    assert found.shape == (3, 156) and found.dtype == np.float32
    # VCA returns actual pixels of the scene
    assert all(np.any(np.all(pixels == row, axis=1)) for row in found)
    angles = _angles_deg(found, data["endmembers"])
    rows, cols = linear_sum_assignment(angles)
    assert angles[rows, cols].mean() < 8.0, angles[rows, cols]  # measured 5.1 degrees
    assert angles[rows, cols].max() < 12.0
    np.testing.assert_array_equal(vca(pixels, 3, seed=0), found)  # seeded
    with pytest.raises(ValueError, match="at least 3 pixels"):
        vca(pixels[:2], 3)


def test_library_endmembers_are_distinct_and_deterministic():
    spectra, wavelengths = library_endmembers(5, 400.0, 2500.0)
    assert spectra.shape == (5, wavelengths.size) and wavelengths.size == 224
    assert (np.diff(wavelengths) >= 0).all()
    inside = (wavelengths >= 400.0) & (wavelengths <= 2500.0)
    angles = _angles_deg(spectra[:, inside], spectra[:, inside])[np.triu_indices(5, k=1)]
    assert angles.min() > 20.0, angles  # measured ~37 degrees
    again, _ = library_endmembers(5, 400.0, 2500.0)
    np.testing.assert_array_equal(again, spectra)
    # farthest-point selection: the first three of five are the three chosen for count=3
    three, _ = library_endmembers(3, 400.0, 2500.0)
    np.testing.assert_array_equal(three, spectra[:3])


def test_group_masking_masks_one_whole_group_first_and_keeps_the_budget():
    count, groups, patches = 64, 2, 16
    kept, mask, _ = SpectralMAE.random_masking(count, groups, patches, 0.75, _generator(3), torch.device("cpu"),
                                               group_mask_prob=1.0)
    per_group = mask.view(count, groups, patches).sum(dim=2)
    assert kept.shape == (count, 8) and (mask.sum(dim=1) == 24).all()  # the budget is unchanged
    assert ((per_group == patches).sum(dim=1) == 1).all()  # exactly one group fully masked in every sample
    assert set(per_group.max(dim=1).indices.tolist()) == {0, 1}  # either group can be the one
    half = SpectralMAE.random_masking(count, groups, patches, 0.75, _generator(3), torch.device("cpu"),
                                      group_mask_prob=0.5)[1].view(count, groups, patches).sum(dim=2)
    whole = int(((half == patches).any(dim=1)).sum())
    assert 16 < whole < 56  # about half the samples (independent masking almost never masks a whole group)
    # one group: nothing to predict from, masked as usual
    single = SpectralMAE.random_masking(4, 1, 16, 0.75, _generator(3), torch.device("cpu"), group_mask_prob=1.0)
    plain = SpectralMAE.random_masking(4, 1, 16, 0.75, _generator(3), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(single, plain))


def test_group_masking_applies_in_training_only(shared_model):
    model = SpectralMAE(ModelConfig(group_mask_prob=1.0, patch_size=8))
    hsi, lam = torch.randn(4, 224, 32, 32), _wavelengths(AVIRIS_NM)
    model.train()
    trained = model(hsi, lam, generator=_generator(0)).token_mask.sum(dim=2)
    assert ((trained == 16).sum(dim=1) == 1).all()
    model.eval()
    evaluated = model(hsi, lam, generator=_generator(0), spatial_masking=True).token_mask
    assert (evaluated[:, 0] == evaluated[:, 1]).all()


def test_decoder_features_are_the_unmasked_forward_pass():
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig()).eval()
    hsi, lam = torch.randn(2, 224, 32, 32), _wavelengths(AVIRIS_NM)
    features = model.decoder_features(hsi, lam)
    with torch.no_grad():
        out = model(hsi, lam, mask_ratio=0.0, generator=_generator(0))
    assert features.shape == (2, 2 * 16, model.config.decoder_embed_dim)
    torch.testing.assert_close(features, out.decoder_features.flatten(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="encoder-only"):
        SpectralMAE(ModelConfig(), with_decoder=False).decoder_features(hsi, lam)


# -------------------------------------------------------------------------------- activation checkpointing


def _step(checkpointing: bool, autocast: bool = False, drop_path: float = 0.3):
    """One seeded training forward + backward of a tiny model: (prediction, loss, gradients, the next global
    random number). The weights, the masking generator and the global seed are the same for every call."""
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig(drop_path=drop_path, activation_checkpointing=checkpointing)).train()
    wavelengths = _wavelengths(BAND_SETS["aviris224"][0])
    hsi = torch.randn(4, wavelengths.numel(), 16, 16)
    torch.manual_seed(1)  # stochastic depth draws from the global generator
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with context:
        out = model(hsi, wavelengths, generator=_generator(0))
        loss = (out.prediction.float() - hsi).square().mean()
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.prediction.detach(), loss.detach(), gradients, torch.rand(1)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(autocast):
    """Recomputing the blocks in backward changes nothing: same prediction, loss and gradients (stochastic depth
    draws the same per-sample masks when recomputed: the RNG state is kept), and the global RNG ends where it
    would without checkpointing, so a run's later random draws do not depend on the option either."""
    prediction, loss, gradients, after = _step(False, autocast)
    prediction_ckpt, loss_ckpt, gradients_ckpt, after_ckpt = _step(True, autocast)
    tight = {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(prediction_ckpt, prediction, **tight)
    torch.testing.assert_close(loss_ckpt, loss, **tight)
    assert set(gradients_ckpt) == set(gradients) and len(gradients) > 0
    for name, grad in gradients.items():
        assert torch.allclose(gradients_ckpt[name], grad, **tight), name
    assert torch.equal(after_ckpt, after)
    # not vacuous: stochastic depth is in effect (another global seed drops other samples' branches)
    torch.manual_seed(0)
    model = SpectralMAE(ModelConfig(drop_path=0.3)).train()
    wavelengths = _wavelengths(BAND_SETS["aviris224"][0])
    hsi = torch.randn(4, wavelengths.numel(), 16, 16)
    torch.manual_seed(2)
    with torch.no_grad():  # no grad: no checkpointing either way; the draws are the same as in training
        other = model(hsi, wavelengths, generator=_generator(0)).prediction
    assert not torch.allclose(other, prediction.float(), atol=1e-3)


def test_activation_checkpointing_runs_only_when_training_with_grad(monkeypatch):
    """Each encoder and decoder block goes through torch.utils.checkpoint (non-reentrant) in a training forward
    with grad; evaluation, no_grad and the default config run the blocks directly."""
    import hsfm_train.models.vit as vit

    calls = []
    real = vit.checkpoint

    def spy(function, *args, **kwargs):
        calls.append(kwargs)
        return real(function, *args, **kwargs)

    monkeypatch.setattr(vit, "checkpoint", spy)
    config = ModelConfig(activation_checkpointing=True)
    torch.manual_seed(0)
    model = SpectralMAE(config)
    wavelengths = _wavelengths(BAND_SETS["aviris224"][0])
    hsi = torch.randn(2, wavelengths.numel(), 16, 16)

    model.train()
    model(hsi, wavelengths, generator=_generator(0))
    assert len(calls) == config.depth + config.decoder_depth
    assert all(kw.get("use_reentrant") is False and kw.get("preserve_rng_state", True) for kw in calls)
    calls.clear()
    with torch.no_grad():
        model(hsi, wavelengths, generator=_generator(0))
    model.eval()
    model(hsi, wavelengths, generator=_generator(0))
    model.encode(hsi, wavelengths)
    assert calls == []
    plain = SpectralMAE(ModelConfig()).train()
    plain(hsi, wavelengths, generator=_generator(0))
    assert calls == []


def _saved_for_backward(model: SpectralMAE, hsi: torch.Tensor, wavelengths: torch.Tensor) -> tuple[int, int]:
    """(tensors autograd saves while a block's forward runs, bytes of the unique storages held for backward
    over the whole forward: what autograd saves plus each block's input, which a checkpoint keeps)."""
    from hsfm_train.models.vit import Block

    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), hsi, wavelengths]}
    held: dict[int, int] = {}
    inside = [0]
    in_blocks = [0]

    def remember(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            held[storage.data_ptr()] = storage.nbytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        remember(tensor)
        in_blocks[0] += inside[0] > 0
        return tensor

    def enter(module, inputs):
        remember(inputs[0])
        inside[0] += 1

    def leave(module, inputs, output):
        inside[0] -= 1

    hooks = [hook for m in model.modules() if isinstance(m, Block)
             for hook in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(hsi, wavelengths, generator=_generator(0))
    finally:
        for hook in hooks:
            hook.remove()
    out.prediction.square().mean().backward()  # the graph is usable
    return in_blocks[0], sum(held.values())


def test_activation_checkpointing_keeps_fewer_activations_for_backward():
    """With checkpointing nothing is saved for backward inside a block (only its input is kept), so the
    activation memory of one training forward shrinks; measured with saved-tensor hooks, not timed."""
    wavelengths = _wavelengths(np.linspace(420.0, 2450.0, 24))
    torch.manual_seed(0)
    hsi = torch.randn(4, wavelengths.numel(), 32, 32)
    counts = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SpectralMAE(ModelConfig(activation_checkpointing=checkpointing, drop_path=0.1)).train()
        counts[checkpointing] = _saved_for_backward(model, hsi, wavelengths)
    (inside_off, bytes_off), (inside_on, bytes_on) = counts[False], counts[True]
    assert inside_off > 0 and inside_on == 0
    assert bytes_on < 0.7 * bytes_off, counts  # 0.53x with torch 2.13 (the rest: tokenizer, decoder head)


# ------------------------------------------------------------------------------------- attention in bf16


def test_attention_in_bf16_autocast_is_bf16_and_matches_fp32():
    from hsfm_train.models.vit import Attention

    torch.manual_seed(0)
    attention = Attention(128, 4)
    x = torch.randn(3, 65, 128)
    with torch.no_grad():
        expected = attention(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attention(x)
    assert got.dtype == torch.bfloat16
    scale = expected.abs().max()
    torch.testing.assert_close(got.float(), expected, rtol=0.0, atol=float(3e-2 * scale))
    assert (got.float() - expected).abs().mean() < 5e-3 * scale


def test_every_sdpa_call_gets_what_the_fused_kernels_accept(monkeypatch):
    """Under bf16 autocast the model's attention calls SDPA with bf16 q, k, v of one dtype, the head dim
    innermost (stride 1) and no mask, dropout or other argument: nothing that forces the math fallback (the GPU
    suite's bench_pretrain.py reports the backend the GPU actually picks)."""
    from torch.nn import functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q, k, v, args, kwargs))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    config = ModelConfig()
    torch.manual_seed(0)
    model = SpectralMAE(config).train()
    wavelengths = _wavelengths(BAND_SETS["aviris224"][0])
    hsi = torch.randn(2, wavelengths.numel(), 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(hsi, wavelengths, generator=_generator(0))
    assert out.prediction.dtype == torch.bfloat16
    assert len(seen) == config.depth + config.decoder_depth
    for q, k, v, args, kwargs in seen:
        assert {t.dtype for t in (q, k, v)} == {torch.bfloat16}
        assert [t.stride(-1) for t in (q, k, v)] == [1, 1, 1]
        assert q.dim() == 4 and q.shape[-1] % 8 == 0  # [N, heads, tokens, head dim]; head dim a multiple of 8
        assert args == () and kwargs == {}
