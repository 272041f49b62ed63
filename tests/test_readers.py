"""Scene readers against the real benchmark files, plus round trips through every writable format."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from rasterio import Affine
import scipy.io
import spectral.io.envi as envi
from PIL import Image

from hsfm_train.data.readers import read_scene, read_scenes
from hsfm_train.errors import DataFormatError, UnsafeDataError
from tests.conftest import shared_file

SAMSON_NPZ = "unmixing/samson/samson.npz"
SAMSON_MAT = "unmixing/samson/samson_1.mat"
SAMSON_GT = "unmixing/samson/end3.mat"
SAMSON_HDR = "unmixing/samson/samson_1.img.hdr"
VOLKOV_NPZ = "optical_sar/volkov_s1s2_aligned/volkov_s1s2_256.npz"
SALINAS_A_COUNTS = {0: 1790, 1: 391, 10: 1343, 11: 616, 12: 1525, 13: 674, 14: 799}


def _assert_same_scene_data(actual, expected) -> None:
    for field in ("cube", "abundances", "endmembers", "wavelengths_nm"):
        assert np.array_equal(getattr(actual, field), getattr(expected, field)), field
    assert actual.endmember_names == expected.endmember_names


def _class_counts(labels: np.ndarray) -> dict[int, int]:
    ids, counts = np.unique(labels, return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


# ------------------------------------------------------------------------------------------------ Samson


def test_samson_npz_equals_zhu_mat_with_ground_truth():
    from_npz = read_scene(shared_file(SAMSON_NPZ))
    # The sidecar samson_1.img.hdr supplies the wavelengths; end3.mat the abundances, endmembers and names.
    from_mat = read_scene(shared_file(SAMSON_MAT), ground_truth=shared_file(SAMSON_GT))
    _assert_same_scene_data(from_mat, from_npz)
    assert from_npz.shape == (95, 95, 156)
    assert from_npz.endmember_names == ["1-rock", "2-Tree", "3-water"]
    assert from_npz.sensor == from_mat.sensor == "samson"
    assert from_mat.metadata["format"] == "mat-v5" and from_mat.metadata["key"] == "V"


def test_zhu_matrix_is_reshaped_column_major(tmp_path):
    from_npz = read_scene(shared_file(SAMSON_NPZ))
    from_mat = read_scene(shared_file(SAMSON_MAT))
    band = 85
    assert np.array_equal(from_mat.cube[..., band], from_npz.cube[..., band])
    # Row-major reshaping of the same MATLAB column gives the transposed image, which must not match.
    row_major = scipy.io.loadmat(shared_file(SAMSON_MAT))["V"][band].reshape((95, 95), order="C")
    assert not np.array_equal(row_major.astype(np.float32), from_npz.cube[..., band])
    assert np.array_equal(row_major.T.astype(np.float32), from_npz.cube[..., band])

    # A non-square crop makes an axis mix-up fail on shape as well as on values.
    crop = from_npz.cube[:, :60, :]
    columns = np.stack([crop[..., b].reshape(-1, order="F") for b in range(crop.shape[2])])
    scipy.io.savemat(tmp_path / "crop.mat", {"V": columns.astype(np.float64), "nRow": np.array([[95]], np.uint8),
                                             "nCol": np.array([[60]], np.uint8)})
    assert np.array_equal(read_scene(tmp_path / "crop.mat").cube, crop)


_MATLAB_CLASS_BY_DTYPE = {"float64": "double", "float32": "single", "uint8": "uint8", "uint16": "uint16"}


def _write_matlab_v73(path: Path, variables: dict) -> None:
    """Write variables the way MATLAB's save -v7.3 lays them out: HDF5 with a 512-byte MAT-file userblock,
    arrays stored with reversed axes, a MATLAB_class attribute, and cells as references into #refs#."""
    with h5py.File(path, "w", userblock_size=512) as file:
        for name, value in variables.items():
            if isinstance(value, list):  # a column cell of strings
                references = []
                for position, text in enumerate(value):
                    chars = file.create_dataset(f"#refs#/{name}_{position}",
                                                data=np.array([[ord(c)] for c in text], dtype=np.uint16))
                    chars.attrs["MATLAB_class"] = np.bytes_("char")
                    chars.attrs["MATLAB_int_decode"] = np.int32(2)
                    references.append(chars.ref)
                dataset = file.create_dataset(name, data=np.array([references], dtype=h5py.ref_dtype))
                dataset.attrs["MATLAB_class"] = np.bytes_("cell")
            else:
                dataset = file.create_dataset(name, data=np.transpose(value))
                dataset.attrs["MATLAB_class"] = np.bytes_(_MATLAB_CLASS_BY_DTYPE[value.dtype.name])
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116) + bytes(8) + (0x0200).to_bytes(2, "little") + b"IM"
    with path.open("r+b") as file:
        file.write(header)


def test_samson_mat_v73_equals_v5(tmp_path):
    v5 = scipy.io.loadmat(shared_file(SAMSON_MAT))
    ground_truth = scipy.io.loadmat(shared_file(SAMSON_GT))
    cube_path, gt_path = tmp_path / "samson_v73.mat", tmp_path / "end3_v73.mat"
    _write_matlab_v73(cube_path, {"V": v5["V"], "nRow": v5["nRow"], "nCol": v5["nCol"]})
    _write_matlab_v73(gt_path, {"A": ground_truth["A"], "M": ground_truth["M"],
                                "cood": ["1-rock", "2-Tree", "3-water"]})
    assert h5py.is_hdf5(cube_path) and cube_path.read_bytes().startswith(b"MATLAB 7.3 MAT-file")

    from_v73 = read_scene(cube_path, ground_truth=gt_path, header=shared_file(SAMSON_HDR))
    from_v5 = read_scene(shared_file(SAMSON_MAT), ground_truth=shared_file(SAMSON_GT))
    _assert_same_scene_data(from_v73, from_v5)
    assert from_v73.metadata["format"] == "mat-v7.3"


# --------------------------------------------------------------------------------------- classification


def test_salinas_a_npz_and_mat_agree_with_manifest_counts():
    from_npz = read_scene(shared_file("classification/salinasA/salinasA.npz"))
    from_mat = read_scene(shared_file("classification/salinasA/SalinasA.mat"),
                          labels=shared_file("classification/salinasA/SalinasA_gt.mat"))
    assert _class_counts(from_npz.labels) == SALINAS_A_COUNTS
    assert _class_counts(from_mat.labels) == SALINAS_A_COUNTS
    assert np.array_equal(from_npz.cube, from_mat.cube) and from_npz.shape == (83, 86, 224)
    assert from_npz.sensor == from_mat.sensor == "aviris"
    assert from_npz.wavelengths_nm is None  # the file carries no band centres


def test_salinas_a_corrected_bands():
    path = shared_file("classification/salinasA/salinasA.npz")
    full = read_scene(path)
    corrected = read_scene(path, bands="corrected")
    keep = full.metadata["corrected_bands_1based"] - 1
    assert corrected.num_bands == 204
    assert np.array_equal(corrected.cube, full.cube[..., keep])
    with pytest.raises(DataFormatError, match="corrected_bands_1based"):
        read_scene(shared_file("classification/salinasA/SalinasA.mat"), bands="corrected")


def test_indian_pines():
    scene = read_scene(shared_file("classification/indian_pines/indian_pines.npz"))
    assert scene.shape == (145, 145, 200) and scene.cube.dtype == np.float32
    assert scene.cube.min() == 955 and scene.cube.max() == 9604  # uint16 DN kept as values
    assert scene.wavelengths_nm[0] == np.float32(400.02) and scene.wavelengths_nm[-1] == np.float32(2489.11)
    counts = _class_counts(scene.labels)
    assert len(counts) - 1 == 16 and sum(counts.values()) - counts[0] == 10249
    assert scene.sensor == "aviris"
    assert read_scene(shared_file("classification/indian_pines/indian_pines.npz"), bands="corrected").num_bands == 200


# ------------------------------------------------------------------------------------------------ Urban


def test_urban_ground_truth_only_needs_synthesize_cube():
    path = shared_file("unmixing/urban/urban_gt_end4.npz")
    with pytest.raises(DataFormatError, match="synthesize_cube") as error:
        read_scene(path)
    assert str(path) in str(error.value)
    scene = read_scene(path, synthesize_cube=True)
    assert scene.shape == (307, 307, 162) and scene.sensor == "hydice"
    assert np.abs(scene.abundances.sum(axis=2) - 1).max() < 1e-6
    assert np.allclose(scene.cube, scene.abundances @ scene.endmembers)
    assert scene.endmember_names == ["1-Asphalt Road", "2-Grass", "3-Tree", "4-Roof"]


# --------------------------------------------------------------------------------------------- optical-SAR


def test_volkov_pairs_by_index():
    path = shared_file(VOLKOV_NPZ)
    scenes = list(read_scenes(path, indices=[0, 1, 5]))
    with np.load(path, allow_pickle=False) as npz:
        optical, sar, sources = npz["optical"][[0, 1, 5]], npz["sar"][[0, 1, 5]], npz["source_image"]
    assert [s.name for s in scenes] == [f"volkov_{sources[i]}_{i:03d}" for i in (0, 1, 5)]
    for scene, optical_u8, sar_u8 in zip(scenes, optical, sar):
        assert scene.shape == (256, 256, 3) and scene.pair.shape == (256, 256, 1)
        assert np.array_equal(scene.cube, optical_u8 / np.float32(255))
        assert np.array_equal(scene.pair, sar_u8 / np.float32(255))
        assert scene.sensor == "sentinel2_rgb" and scene.pair_sensor == "sentinel1_vh"
        assert np.allclose(scene.wavelengths_nm, [664.6, 559.8, 492.4])
        assert np.allclose(scene.pair_wavelengths_nm, [5.5465763e7])
    assert scenes[1].metadata["crop_offset_rc"] == (640, 640)


def test_volkov_holds_200_pairs():
    path = shared_file(VOLKOV_NPZ)
    assert sum(1 for _ in read_scenes(path)) == 200
    with pytest.raises(DataFormatError, match="found 200"):
        read_scene(path)


def test_png_pair_matches_npz(tmp_path):
    expected = next(read_scenes(shared_file(VOLKOV_NPZ), indices=[3]))
    optical_png, sar_png = tmp_path / "opt.png", tmp_path / "sar.png"
    Image.fromarray(np.round(expected.cube * 255).astype(np.uint8)).save(optical_png)
    sar_u8 = np.round(expected.pair[..., 0] * 255).astype(np.uint8)
    Image.fromarray(np.stack([sar_u8] * 3, axis=-1)).save(sar_png)  # as shipped upstream: 3 identical channels

    scene = read_scene(optical_png, pair=sar_png)
    assert np.array_equal(scene.cube, expected.cube)
    assert np.array_equal(scene.pair, expected.pair) and scene.pair.shape[2] == 1

    small_sar = tmp_path / "sar_small.png"
    Image.fromarray(sar_u8[:128, :100]).save(small_sar)
    with pytest.raises(DataFormatError) as error:
        read_scene(optical_png, pair=small_sar)
    assert str(optical_png) in str(error.value) and str(small_sar) in str(error.value)


# ------------------------------------------------------------------------------------------ ENVI, GeoTIFF


def test_envi_round_trip_with_ignore_value(tmp_path):
    samson = read_scene(shared_file(SAMSON_NPZ))
    cube = samson.cube.copy()
    cube[:3, :4, :] = -9999
    header_path = tmp_path / "samson_envi.hdr"
    envi.save_image(str(header_path), cube, dtype=np.float32, interleave="bsq", ext=".img", metadata={
        "wavelength": [str(w) for w in samson.wavelengths_nm], "wavelength units": "Nanometers",
        "data ignore value": -9999, "sensor type": "SAMSON"})

    scene = read_scene(header_path)
    assert np.array_equal(scene.cube, cube)
    assert np.array_equal(scene.wavelengths_nm, samson.wavelengths_nm)
    expected_mask = np.zeros((95, 95), bool)
    expected_mask[:3, :4] = True
    assert np.array_equal(scene.nodata_mask, expected_mask)
    assert scene.sensor == "SAMSON" and scene.name == "samson_envi"
    assert np.array_equal(read_scene(tmp_path / "samson_envi.img").cube, cube)  # the binary finds its header


@pytest.mark.parametrize("units", ["Micrometers", None])
def test_envi_wavelengths_in_micrometres(tmp_path, units):
    samson = read_scene(shared_file(SAMSON_NPZ))
    metadata = {"wavelength": [f"{w / 1000:.9f}" for w in samson.wavelengths_nm]}
    if units:
        metadata["wavelength units"] = units
    envi.save_image(str(tmp_path / "um.hdr"), samson.cube[:8, :8], dtype=np.float32, metadata=metadata)
    scene = read_scene(tmp_path / "um.hdr")
    np.testing.assert_allclose(scene.wavelengths_nm, samson.wavelengths_nm, rtol=1e-6)
    assert scene.nodata_mask is None


def test_geotiff_round_trip(tmp_path):
    samson = read_scene(shared_file(SAMSON_NPZ))
    crop = samson.cube[10:50, 20:60].copy()
    crop[:2, :3, :] = -9999
    path = tmp_path / "samson_crop.tif"
    # Samson's ENVI map info: UTM zone 10N, 1 m pixels.
    profile = {"driver": "GTiff", "height": 40, "width": 40, "count": crop.shape[2], "dtype": "float32",
               "nodata": -9999, "crs": "EPSG:32610", "transform": Affine(1, 0, 612730.91, 0, -1, 4074488.708)}
    with rasterio.open(path, "w", **profile) as destination:
        destination.write(np.transpose(crop, (2, 0, 1)))
        destination.update_tags(sensor="samson_geotiff")
        for band, centre in enumerate(samson.wavelengths_nm, start=1):
            destination.update_tags(band, wavelength=str(centre), wavelength_units="Nanometers")

    scene = read_scene(path)
    assert np.array_equal(scene.cube, crop)
    assert np.array_equal(scene.wavelengths_nm, samson.wavelengths_nm)
    assert scene.nodata_mask.sum() == 6 and scene.nodata_mask[:2, :3].all()
    assert scene.sensor == "samson_geotiff" and scene.metadata["crs"] == "EPSG:32610"


def test_geotiff_imagery_domain_wavelengths(tmp_path):
    path = tmp_path / "rgb.tif"
    with rasterio.open(path, "w", driver="GTiff", height=4, width=5, count=3, dtype="uint8",
                       crs="EPSG:32610", transform=Affine(10, 0, 0, 0, -10, 0)) as destination:
        destination.write(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
        for band, micrometres in enumerate(("0.6646", "0.5598", "0.4924"), start=1):
            destination.update_tags(band, ns="IMAGERY", CENTRAL_WAVELENGTH_UM=micrometres)
    scene = read_scene(path)
    assert scene.shape == (4, 5, 3) and scene.nodata_mask is None and scene.sensor == "unknown"
    np.testing.assert_allclose(scene.wavelengths_nm, [664.6, 559.8, 492.4], rtol=1e-6)


def test_options_shared_by_every_format():
    path = shared_file("classification/salinasA/SalinasA.mat")
    plain = read_scene(path)
    labels = np.arange(83 * 86, dtype=np.int16).reshape(83, 86) % 3
    scene = read_scene(path, scale=1e-4, sensor="aviris_salinas", name="salinas_a", labels=labels,
                       wavelengths_nm=np.linspace(400, 2500, 224))
    assert np.array_equal(scene.cube, plain.cube * np.float32(1e-4))
    assert (scene.sensor, scene.name) == ("aviris_salinas", "salinas_a")
    assert np.array_equal(scene.labels, labels) and scene.wavelengths_nm[-1] == 2500


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_suffix_and_directory(tmp_path):
    odd = tmp_path / "scene.xyz"
    odd.write_bytes(b"x")
    for path in (odd, tmp_path):
        with pytest.raises(DataFormatError, match=r"\.npz") as error:
            read_scene(path)
        assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here.npz"):
        read_scenes(tmp_path / "nothing_here.npz")


def test_content_that_does_not_match_its_suffix(tmp_path):
    path = tmp_path / "fake.png"
    path.write_bytes(b"not an image")
    with pytest.raises(DataFormatError, match="fake.png"):
        read_scene(path)


def test_npz_object_array_is_refused(tmp_path):
    path = tmp_path / "unsafe.npz"
    np.savez(path, cube=np.zeros((2, 2, 3), np.float32), endmember_names=np.array(["soil", 1], dtype=object))
    with pytest.raises(UnsafeDataError, match="endmember_names") as error:
        read_scene(path)
    assert str(path) in str(error.value)


def test_wavelength_count_mismatch():
    path = shared_file(SAMSON_NPZ)
    with pytest.raises(DataFormatError, match="10 entries for 156 bands") as error:
        read_scene(path, wavelengths_nm=np.linspace(400, 900, 10))
    assert str(path) in str(error.value)


def test_truncated_mat(tmp_path):
    path = tmp_path / "truncated.mat"
    path.write_bytes(shared_file(SAMSON_MAT).read_bytes()[:1000])
    with pytest.raises(DataFormatError, match="truncated.mat"):
        read_scene(path)


def test_option_that_does_not_apply(tmp_path):
    with pytest.raises(TypeError, match="pair"):
        read_scene(shared_file(SAMSON_NPZ), pair=tmp_path / "sar.png")
