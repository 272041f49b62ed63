"""The one entry point per kernel picks the implementation by device and by the backend switch."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import hsfm_train.kernels as kernels


def test_importing_the_kernels_package_does_not_import_triton():
    code = "import sys, hsfm_train.kernels, hsfm_train.objectives.pretrain; print('triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_cpu_tensors_use_pytorch_and_the_switch_is_validated(monkeypatch):
    tensor = torch.zeros(1)
    assert kernels.backend_for(tensor) == "reference"
    monkeypatch.setenv("HSFM_KERNELS", "triton")
    assert kernels.backend_for(tensor) == "triton"
    kernels.set_backend("reference")
    try:
        assert kernels.backend_for(tensor) == "reference"  # the override wins over the environment
    finally:
        kernels.set_backend(None)
    monkeypatch.setenv("HSFM_KERNELS", "fast")
    with pytest.raises(ValueError, match="HSFM_KERNELS must be one of"):
        kernels.backend_for(tensor)
    with pytest.raises(ValueError, match="kernel backend must be one of"):
        kernels.set_backend("cuda")


def test_spectral_angle_entry_point_is_the_reference_on_cpu():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.rand(8, 30, generator=generator), torch.rand(8, 30, generator=generator)
    assert torch.equal(kernels.spectral_angle_loss(prediction, target),
                       kernels.spectral_angle_reference(prediction, target))


def test_grouped_spectral_angle_entry_point_is_the_grouped_reference_on_cpu():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.rand(2, 6, 2, 3, generator=generator), torch.rand(2, 6, 2, 3, generator=generator)
    membership = torch.zeros(2, 6, 2, dtype=torch.bool)
    membership[:, :3, 0] = membership[:, 3:5, 1] = True
    weight = torch.rand(2, 2, 2, 3, generator=generator)
    assert torch.equal(kernels.grouped_spectral_angle_loss(prediction, target, membership, weight),
                       kernels.grouped_spectral_angle_reference(prediction, target, membership, weight))


@pytest.mark.parametrize("backend,expected", [("auto", "reference"), ("reference", "reference"),
                                              ("triton", "triton")])
def test_row_and_grouped_spectral_angle_are_routed_alike(monkeypatch, backend, expected):
    """Both entry points follow backend_for: a stand-in Triton module (no triton import, no GPU) records calls."""
    calls = []
    fake = types.ModuleType("hsfm_train.kernels.sam_triton")
    fake.fused_spectral_angle = lambda *args: calls.append(("triton", "rows", args)) or torch.tensor(0.0)
    fake.fused_grouped_spectral_angle = lambda *args: calls.append(("triton", "grouped", args)) or torch.tensor(0.0)
    monkeypatch.setitem(sys.modules, "hsfm_train.kernels.sam_triton", fake)
    monkeypatch.setattr(kernels, "spectral_angle_reference",
                        lambda *args: calls.append(("reference", "rows", args)) or torch.tensor(0.0))
    monkeypatch.setattr(kernels, "grouped_spectral_angle_reference",
                        lambda *args: calls.append(("reference", "grouped", args)) or torch.tensor(0.0))
    monkeypatch.setenv("HSFM_KERNELS", backend)
    rows = torch.rand(4, 5)
    kernels.spectral_angle_loss(rows, rows, None, "sum", 1e-6)
    images, membership = torch.rand(1, 5, 2, 2), torch.ones(1, 5, 1, dtype=torch.bool)
    scale, offset, weight = torch.ones(1, 5), torch.zeros(1, 5), torch.ones(1, 1, 2, 2)
    kernels.grouped_spectral_angle_loss(images, images, membership, weight, "none", 1e-6, scale, offset)
    assert [call[:2] for call in calls] == [(expected, "rows"), (expected, "grouped")]
    assert calls[0][2][2:] == (None, "sum", 1e-6)
    grouped_args = calls[1][2]
    assert grouped_args[2] is membership and grouped_args[3] is weight and grouped_args[4:6] == ("none", 1e-6)
    assert grouped_args[6] is scale and grouped_args[7] is offset


def test_selective_scan_entry_point_survives_the_submodule_import(monkeypatch):
    from hsfm_train.kernels import selective_scan as module

    assert callable(kernels.selective_scan_fn) and module is not kernels.selective_scan_fn
    generator = torch.Generator().manual_seed(0)
    u, delta = torch.randn(1, 3, 20, generator=generator), torch.rand(1, 3, 20, generator=generator)
    A, B, C = -torch.rand(3, 4, generator=generator), torch.randn(1, 4, 20, generator=generator), torch.randn(
        1, 4, 20, generator=generator)
    parallel = kernels.selective_scan_fn(u, delta, A, B, C)
    monkeypatch.setenv("HSFM_KERNELS", "reference")
    reference = kernels.selective_scan_fn(u, delta, A, B, C)
    torch.testing.assert_close(parallel, reference, rtol=6e-4, atol=2e-3)
    assert torch.equal(reference, module.selective_scan_reference(u, delta, A, B, C))
