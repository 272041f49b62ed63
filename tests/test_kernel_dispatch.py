"""The one entry point per kernel picks the implementation by device and by the backend switch."""
from __future__ import annotations

import subprocess
import sys

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
