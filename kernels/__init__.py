"""Custom Triton kernels, installed as ``hsfm_train.kernels``, each beside its PyTorch reference.

This folder is the top-level ``kernels/`` of the repository; pyproject.toml maps it to the import name
``hsfm_train.kernels`` so that the unrelated PyPI package ``kernels`` can never shadow it. Importing this package
never imports triton: the Triton modules are loaded on first use, so CPU-only code paths stay light.

Dispatch (one entry point per kernel, the only one the rest of the project calls):

    spectral_angle_loss(...)          rows [N, B]. CUDA: the fused Triton kernel (sam_triton.py); CPU: the
                                      PyTorch reference (sam_loss.py)
    grouped_spectral_angle_loss(...)  images [N, B, H, W] with spectral groups; the same choice
    selective_scan_fn(...)     CUDA: the chunked Triton scan; CPU: the parallel (log-depth) PyTorch scan

``HSFM_KERNELS=reference`` (or ``set_backend("reference")``) forces the PyTorch references everywhere (the
sequential scan for the selective scan); ``triton`` forces the Triton kernels, which on CPU tensors only runs
under ``TRITON_INTERPRET=1`` (tests); ``auto`` (default) picks by device.
"""
from __future__ import annotations

import os

from hsfm_train.kernels.sam_loss import grouped_spectral_angle_reference, spectral_angle_reference

BACKENDS = ("auto", "reference", "triton")
_override: str | None = None


def set_backend(backend: str | None) -> None:
    """Force a backend for this process (None: back to ``$HSFM_KERNELS`` or "auto")."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    global _override
    _override = backend


def backend_for(tensor) -> str:
    """"triton" or "reference" for a tensor on its device, after the override and ``$HSFM_KERNELS``."""
    choice = _override or os.environ.get("HSFM_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"HSFM_KERNELS must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if tensor.is_cuda else "reference"
    return choice


def spectral_angle_loss(prediction, target, weight=None, reduction="mean", eps=1e-8):
    """Spectral angle (radians) of rows [N, B]; see sam_loss.py for the conventions (clamp, zero rows, mean).

    The fused kernel returns a gradient for ``prediction`` only (the objectives never differentiate the target);
    the reference differentiates both."""
    if backend_for(prediction) == "triton":
        from hsfm_train.kernels.sam_triton import fused_spectral_angle

        return fused_spectral_angle(prediction, target, weight, reduction, eps)
    return spectral_angle_reference(prediction, target, weight, reduction, eps)


def grouped_spectral_angle_loss(prediction, target, membership, weight=None, reduction="mean", eps=1e-8,
                                scale=None, offset=None):
    """Spectral angle (radians) per (sample, group, pixel) of images [N, B, H, W], each group's bands only;
    membership [N, B, G] bool, weight [N, G, H, W], optional per-band affine map ``x * scale + offset`` [N, B]
    applied first. See ``grouped_spectral_angle_reference`` in sam_loss.py.

    As ``spectral_angle_loss``: the fused kernel differentiates ``prediction`` only, the reference everything."""
    if backend_for(prediction) == "triton":
        from hsfm_train.kernels.sam_triton import fused_grouped_spectral_angle

        return fused_grouped_spectral_angle(prediction, target, membership, weight, reduction, eps, scale, offset)
    return grouped_spectral_angle_reference(prediction, target, membership, weight, reduction, eps, scale, offset)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """Mamba-1 selective scan with the public reference's signature; see selective_scan.py. (Not named
    ``selective_scan``: that is the submodule's name, and importing it would replace the function.)"""
    from hsfm_train.kernels import selective_scan as scan

    choice = backend_for(u)
    if choice == "triton":
        function = scan.selective_scan_triton
    elif _override == "reference" or os.environ.get("HSFM_KERNELS") == "reference":
        function = scan.selective_scan_reference
    else:
        function = scan.selective_scan_parallel
    return function(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
