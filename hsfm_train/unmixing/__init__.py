"""Unmixing methods behind one signature (``base.py``), collected in ``METHODS`` for ``hsfm unmix``.

    classical.py   vca-fcls, nfindr-fcls, nmf, labelled-als
    cnnaeu.py      cnnaeu, cnnaeu-contrastive (models/unmixing_ae.py, objectives/contrastive.py)
    mamba_semi.py  mamba-semi (models/mamba.py, the selective-scan kernel)
    lsmm_head.py   lsmm-head (an exported backbone + KARMA's LSMM abundance head)
"""
from __future__ import annotations

from hsfm_train.unmixing.base import LabelledPixels, UnmixingInput, UnmixingMethod
from hsfm_train.unmixing.classical import CLASSICAL
from hsfm_train.unmixing.cnnaeu import CNNAEU_METHODS
from hsfm_train.unmixing.lsmm_head import LSMM_METHODS
from hsfm_train.unmixing.mamba_semi import MAMBA_METHODS

METHODS: dict[str, UnmixingMethod] = {**CLASSICAL, **CNNAEU_METHODS, **MAMBA_METHODS, **LSMM_METHODS}

__all__ = ["METHODS", "LabelledPixels", "UnmixingInput", "UnmixingMethod"]
