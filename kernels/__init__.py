"""Custom Triton kernels, installed as ``hsfm_train.kernels``.

This folder is the top-level ``kernels/`` of the repository; pyproject.toml maps it to the import name
``hsfm_train.kernels`` so that the unrelated PyPI package ``kernels`` can never shadow it. Each kernel lives
beside its PyTorch reference and a dispatcher (see the kernels issue); importing this package never imports
triton, so CPU-only code paths stay light.
"""

from hsfm_train.kernels.sam_loss import spectral_angle_reference


def spectral_angle_loss(prediction, target, weight=None, reduction="mean", eps=1e-8):
    """The one entry point the objectives call for the spectral-angle loss of rows [N, B].

    Today this is the PyTorch reference on every device; the kernels issue routes CUDA tensors to the fused Triton
    kernel here, without changing any caller."""
    return spectral_angle_reference(prediction, target, weight, reduction, eps)
