"""Custom Triton kernels, installed as ``hsfm_train.kernels``.

This folder is the top-level ``kernels/`` of the repository; pyproject.toml maps it to the import name
``hsfm_train.kernels`` so that the unrelated PyPI package ``kernels`` can never shadow it. Each kernel lives
beside its PyTorch reference and a dispatcher (see the kernels issue); importing this package never imports
triton, so CPU-only code paths stay light.
"""
