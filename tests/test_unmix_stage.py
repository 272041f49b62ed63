"""`hsfm unmix` end to end on small crops of real scenes: every method writes its runs, figures and summary; the
ground truth only scores (a method's output is the same without it); semi-real scenes from ground truth alone."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hsfm_train.cli import main
from hsfm_train.errors import ConfigError
from hsfm_train.stages.unmix import UnmixConfig, UnmixStage
from hsfm_train.unmixing import METHODS
from tests.conftest import shared_file

SUMMARY_KEYS = {"method", "runs", "sad_mean", "sad_std", "sad_per_endmember", "abundance_rmse_mean",
                "abundance_rmse_std", "reconstruction_rmse_mean", "seconds_per_run"}


@pytest.fixture(scope="module")
def samson_crop(tmp_path_factory):
    """The top-left 30 x 30 pixels of Samson (all three materials are in it), as a scene file with ground truth."""
    scene = np.load(shared_file("unmixing/samson/samson.npz"))
    path = tmp_path_factory.mktemp("samson") / "samson_crop.npz"
    np.savez(path, cube=scene["cube"][:30, :30], endmembers=scene["endmembers"],
             abundances=scene["abundances"][:30, :30], wavelengths_nm=scene["wavelengths_nm"],
             endmember_names=scene["endmember_names"])
    return path


# a few seconds per method: every learned method trains briefly; lsmm-head on a random tiny backbone (no export)
QUICK = ["nmf.iterations=50", "cnnaeu.epochs=2", "cnnaeu.patches=6", "contrastive.epochs=2", "contrastive.patches=6",
         "mamba.epochs=3", "mamba.features=8", "mamba.d_state=4", "mamba.pooled_size=4", "als.iterations=5",
         "lsmm.epochs=3", "lsmm.backbone=random", "device=cpu"]


def unmix(tmp_path, *overrides: str) -> dict:
    config = UnmixStage.load_config(["runs=2", f"output_dir={tmp_path}", *QUICK, *overrides])
    return UnmixStage(config).execute()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_writes_runs_figures_and_the_summary(method, samson_crop, tmp_path, capsys):
    assert main(["unmix", f"method={method}", f"data.scene={samson_crop}", "runs=2", f"output_dir={tmp_path}",
                 *QUICK]) == 0
    assert "mean SAD" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["runs"] == 2 and summary["method"] == method
    assert len(summary["sad_per_endmember"]) == 3 and 0 <= summary["sad_mean"] < np.pi / 2
    for number in range(2):
        with np.load(tmp_path / "runs" / f"run_{number:03d}.npz", allow_pickle=False) as run:
            assert run["endmembers"].shape == (3, 156) and run["abundances"].shape == (30, 30, 3)
            assert run["abundances"].min() >= 0 and np.abs(run["abundances"].sum(-1) - 1).max() < 1e-4
        for kind in ("endmembers", "abundances"):
            assert (tmp_path / "figures" / f"run_{number:03d}_{kind}.png").stat().st_size > 0


SEMI_SUPERVISED = sorted(m for m in METHODS if METHODS[m].labelled_pixels(UnmixConfig(method=m)) > 0)
BLIND = [m for m in sorted(METHODS) if m not in SEMI_SUPERVISED] + ["mamba-semi mamba.labelled=0"]


@pytest.mark.parametrize("method", BLIND)
def test_the_ground_truth_only_scores(method, samson_crop, tmp_path):
    method, *settings = method.split()
    blind = tmp_path / "blind.npz"
    with np.load(samson_crop) as scene:
        np.savez(blind, cube=scene["cube"], wavelengths_nm=scene["wavelengths_nm"])
    with_truth = unmix(tmp_path / "truth", f"method={method}", f"data.scene={samson_crop}", *settings)
    without = unmix(tmp_path / "blind", f"method={method}", f"data.scene={blind}", "data.num_endmembers=3",
                    *settings)
    assert not without["scored"] and "sad_mean" not in without
    for number, run in enumerate(with_truth["per_run"]):
        matched = np.load(tmp_path / "truth" / "runs" / f"run_{number:03d}.npz")["endmembers"]
        unmatched = np.load(tmp_path / "blind" / "runs" / f"run_{number:03d}.npz")["endmembers"]
        # float rounding of multi-threaded reductions aside (1e-7), the output does not move
        np.testing.assert_allclose(matched[np.argsort(run["order"])], unmatched, rtol=0, atol=1e-5)


def test_a_ground_truth_file_without_a_cube_becomes_a_semi_real_scene(tmp_path):
    urban = np.load(shared_file("unmixing/urban/urban_gt_end4.npz"))
    truth = tmp_path / "urban_crop_gt.npz"
    np.savez(truth, endmembers=urban["endmembers"], abundances=urban["abundances"][:40, :40],
             endmember_names=urban["endmember_names"])
    with pytest.raises(ConfigError, match="set data.snr_db"):
        unmix(tmp_path / "none", f"data.scene={truth}")
    clean = unmix(tmp_path / "high", f"data.scene={truth}", "data.snr_db=60", "method=nfindr-fcls")
    noisy = unmix(tmp_path / "low", f"data.scene={truth}", "data.snr_db=10", "method=nfindr-fcls")
    assert clean["scene_name"] == "urban_crop_gt at 60 dB" and clean["endmembers"] == 4
    assert clean["reconstruction_rmse_mean"] < noisy["reconstruction_rmse_mean"]


def test_unknown_methods_and_missing_scenes_are_named(samson_crop):
    with pytest.raises(ConfigError, match="method 'cnnae' is not one of"):
        UnmixStage.load_config(["method=cnnae", f"data.scene={samson_crop}"])
    with pytest.raises(ConfigError, match="'data.scene' must be set"):
        UnmixStage.load_config([])


def test_the_semi_supervised_methods_are_known():
    assert SEMI_SUPERVISED == ["labelled-als", "mamba-semi"]


@pytest.mark.parametrize("method", SEMI_SUPERVISED)
def test_a_semi_supervised_method_sees_only_its_labelled_pixels(method, samson_crop, tmp_path):
    """Changing the ground-truth abundances anywhere but at the labelled pixels changes nothing but the scores."""
    from hsfm_train.stages.unmix import labelled_pixels, load_unmixing_scene

    config = UnmixStage.load_config([f"data.scene={samson_crop}", "method=mamba-semi", "mamba.labelled=10"])
    scene = load_unmixing_scene(config.data)
    chosen = labelled_pixels(scene, 10, seed=0)
    assert len(chosen.indices) == 10 and np.array_equal(chosen.abundances, scene.true_abundances[chosen.indices])
    assert not np.array_equal(chosen.indices, labelled_pixels(scene, 10, seed=1).indices)
    with np.load(samson_crop) as original:
        arrays = dict(original)
    flat = arrays["abundances"].reshape(-1, 3).copy()
    keep = np.zeros(len(flat), bool)
    keep[chosen.indices] = True
    flat[~keep] = flat[~keep][:, [1, 2, 0]]
    changed = tmp_path / "changed.npz"
    np.savez(changed, **{**arrays, "abundances": flat.reshape(arrays["abundances"].shape)})
    first = unmix(tmp_path / "a", f"method={method}", f"data.scene={samson_crop}", "runs=1")
    second = unmix(tmp_path / "b", f"method={method}", f"data.scene={changed}", "runs=1")
    assert first["labelled_pixels"] == 10
    a = np.load(tmp_path / "a" / "runs" / "run_000.npz")["abundances"]
    b = np.load(tmp_path / "b" / "runs" / "run_000.npz")["abundances"]
    order_a, order_b = first["per_run"][0]["order"], second["per_run"][0]["order"]
    np.testing.assert_allclose(a[..., np.argsort(order_a)], b[..., np.argsort(order_b)], rtol=0, atol=1e-5)


def test_labelled_pixels_need_ground_truth(samson_crop, tmp_path):
    blind = tmp_path / "blind.npz"
    with np.load(samson_crop) as scene:
        np.savez(blind, cube=scene["cube"], wavelengths_nm=scene["wavelengths_nm"])
    with pytest.raises(ConfigError, match="no ground-truth abundances"):
        unmix(tmp_path / "x", "method=mamba-semi", f"data.scene={blind}", "data.num_endmembers=3")


def test_semi_real_band_centres_come_from_a_sensor_preset(tmp_path):
    urban = np.load(shared_file("unmixing/urban/urban_gt_end4.npz"))
    truth = tmp_path / "urban_crop_gt.npz"
    np.savez(truth, endmembers=urban["endmembers"], abundances=urban["abundances"][:20, :20])
    from hsfm_train.stages.unmix import load_unmixing_scene

    config = UnmixStage.load_config([f"data.scene={truth}", "data.snr_db=30",
                                     "data.reader.sensor_preset=hydice_urban162"])
    scene = load_unmixing_scene(config.data)
    assert scene.wavelengths_nm.shape == (162,) and 430 < scene.wavelengths_nm[0] < 450
    with pytest.raises(ConfigError, match="gives 224 band centres"):
        load_unmixing_scene(UnmixStage.load_config([f"data.scene={truth}", "data.snr_db=30",
                                                    "data.reader.sensor_preset=aviris"]).data)
    with pytest.raises(ConfigError, match="data.reader.bands does not apply"):
        load_unmixing_scene(UnmixStage.load_config([f"data.scene={truth}", "data.snr_db=30",
                                                    "data.reader.bands=corrected"]).data)


def test_finished_runs_are_kept_and_reused(samson_crop, tmp_path, monkeypatch):
    """Each run is on disk when it ends; a rerun with the same settings only does the runs still missing, and a
    changed setting redoes them all."""
    import hsfm_train.stages.unmix as stage

    first = unmix(tmp_path, "method=nmf", f"data.scene={samson_crop}", "runs=2")
    assert first["complete"] and first["runs_reused"] == 0
    calls = []
    fit = stage.METHODS["nmf"].fit
    monkeypatch.setitem(stage.METHODS, "nmf", stage.METHODS["nmf"].__class__(
        lambda inputs, seed, config: calls.append(seed) or fit(inputs, seed, config)))
    more = unmix(tmp_path, "method=nmf", f"data.scene={samson_crop}", "runs=3")
    assert calls == [2] and more["runs_reused"] == 2 and more["runs"] == 3
    assert more["per_run"][:2] == json.loads(json.dumps(first["per_run"]))
    assert unmix(tmp_path, "method=nmf", f"data.scene={samson_crop}", "runs=3", "device=cpu")["runs_reused"] == 3
    assert calls == [2]  # "auto" resolves to the cpu here: the same runs
    changed = unmix(tmp_path, "method=nmf", f"data.scene={samson_crop}", "runs=3", "nmf.iterations=20")
    assert calls == [2, 0, 1, 2] and changed["runs_reused"] == 0


def test_an_interrupted_job_leaves_a_summary_of_its_finished_runs(samson_crop, tmp_path, monkeypatch):
    import hsfm_train.stages.unmix as stage

    fit = stage.METHODS["vca-fcls"].fit

    def fail_on_the_third(inputs, seed, config):
        if seed == 2:
            raise KeyboardInterrupt
        return fit(inputs, seed, config)
    monkeypatch.setitem(stage.METHODS, "vca-fcls", stage.METHODS["vca-fcls"].__class__(fail_on_the_third))
    with pytest.raises(KeyboardInterrupt):
        unmix(tmp_path, "method=vca-fcls", f"data.scene={samson_crop}", "runs=4")
    partial = json.loads((tmp_path / "summary.json").read_text())
    assert not partial["complete"] and partial["runs"] == 2 and "sad_mean" in partial
    tool = Path(__file__).resolve().parents[1] / "tools" / "unmix_table.py"
    table = subprocess.run([sys.executable, str(tool), str(tmp_path)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert table[2].startswith("| samson_crop | `vca-fcls` | 2 of 4 | ")
    assert f"{partial['sad_mean']:.4f} +- {partial['sad_std']:.4f}" in table[2]
    assert f"{partial['reconstruction_rmse_mean']:.4f} / {partial['reconstruction_rmse_scaled_mean']:.4f}" in table[2]
