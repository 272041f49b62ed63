"""Build the small data assets shipped in hsfm_train/assets/ from the shared benchmark data (run once by a developer).

    python tools/make_assets.py [--shared-data ../shared/data]

Writes usgs_splib_aviris224.npz (USGS library resampled to AVIRIS' 224 bands), urban_abundances_end4.npz
(Urban's real 4-endmember abundance maps as float16) and samson_demo.npz (the whole Samson scene, cube and abundances
as float16, for the packaged demo data of `hsfm pretrain`), then prints each file's size and sha256 for
assets/README.md.
Rerunning reproduces the same bytes (same sha256), checked with numpy 2.4 (its zip entries carry a fixed date).
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import scipy.io

ASSETS = Path(__file__).resolve().parents[1] / "hsfm_train" / "assets"


def convert_usgs_library(mat_path: Path, out_path: Path) -> None:
    mat = scipy.io.loadmat(mat_path)
    datalib, name_rows = mat["datalib"], mat["names"]
    # Columns 0-2 are wavelength (µm), resolution (µm) and channel number; the spectra start at column 3.
    spectra = datalib[:, 3:].T.astype(np.float32)
    names = np.array([bytes(row).decode("ascii").strip() for row in name_rows[3:]])  # fixed-width '<U..'
    if not np.isfinite(spectra).all() or spectra.min() < 0:
        raise SystemExit(f"{mat_path}: spectra must be finite and non-negative")
    print(f"spectra {spectra.shape} min {spectra.min():.6f} max {spectra.max():.6f}")
    np.savez_compressed(
        out_path,
        spectra=spectra,
        wavelengths_nm=(datalib[:, 0] * 1000).astype(np.float32),
        fwhm_nm=(datalib[:, 1] * 1000).astype(np.float32),
        names=names,
    )


def convert_urban_abundances(npz_path: Path, out_path: Path) -> None:
    with np.load(npz_path) as urban:
        # float16 keeps ~4e-4 precision on [0, 1] and halves the file (the float32 source is ~1 MB).
        np.savez_compressed(
            out_path, abundances=urban["abundances"].astype(np.float16), endmember_names=urban["endmember_names"]
        )


def convert_samson(npz_path: Path, out_path: Path) -> None:
    with np.load(npz_path) as samson:
        cube, abundances = samson["cube"], samson["abundances"]
        # float16 halves the cube (values in [0, 1], ~2.4e-4 precision near 1, well under the sensor's own
        # quantisation of 1/1402); endmembers and wavelengths are tiny, so they stay float32.
        cube16, abundances16 = cube.astype(np.float16), abundances.astype(np.float16)
        for name, exact, stored in (("cube", cube, cube16), ("abundances", abundances, abundances16)):
            print(f"{name} {exact.shape} float16 max abs error {np.abs(stored.astype(np.float32) - exact).max():.3g}")
        np.savez_compressed(
            out_path,
            cube=cube16,
            wavelengths_nm=samson["wavelengths_nm"].astype(np.float32),
            endmembers=samson["endmembers"].astype(np.float32),
            abundances=abundances16,
            endmember_names=samson["endmember_names"],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    shared = parser.parse_args().shared_data
    outputs = {
        "usgs_splib_aviris224.npz": (convert_usgs_library, "unmixing/usgs_library/USGS_1995_Library.mat"),
        "urban_abundances_end4.npz": (convert_urban_abundances, "unmixing/urban/urban_gt_end4.npz"),
        "samson_demo.npz": (convert_samson, "unmixing/samson/samson.npz"),
    }
    ASSETS.mkdir(exist_ok=True)
    for out_name, (convert, source) in outputs.items():
        out_path = ASSETS / out_name
        convert(shared / source, out_path)
        digest = hashlib.sha256(out_path.read_bytes()).hexdigest()
        print(f"{out_path.name}: {out_path.stat().st_size:,} bytes sha256 {digest}")


if __name__ == "__main__":
    main()
