"""Building blocks of cross-domain few-shot classification on a frozen backbone (the `hsfm fewshot` stage).

    adapters.py   coalescent projection, LoRA or none on the frozen encoder; trainable-parameter reports
    episodes.py   pixel-centred patches, the K-shot target split, N-way source episodes
    transfer.py   prototypes, label-propagation pseudo-labels, label smoothing, mixup and its Wasserstein schedule
"""
from __future__ import annotations

from hsfm_train.fewshot.adapters import (ADAPTER_KINDS, AdapterConfig, CoalescentAttention, LoRAAttention,
                                         adapter_state_dict, apply_adapter, parameter_report,
                                         trainable_parameter_count)
from hsfm_train.fewshot.episodes import (Episode, EpisodeConfig, FewShotSplit, SourceEpisodes, extract_patches,
                                         patches_at, target_split)
from hsfm_train.fewshot.transfer import (MixupConfig, MixupSchedule, Propagation, PseudoLabelConfig,
                                         confident_pseudo_labels, gaussian_affinity, gaussian_wasserstein, mix,
                                         mixup, normalised_affinity, propagate_labels, prototype_logits, prototypes,
                                         sample_beta, smooth_labels)

__all__ = [
    "ADAPTER_KINDS", "AdapterConfig", "CoalescentAttention", "LoRAAttention", "adapter_state_dict", "apply_adapter",
    "parameter_report", "trainable_parameter_count",
    "Episode", "EpisodeConfig", "FewShotSplit", "SourceEpisodes", "extract_patches", "patches_at", "target_split",
    "MixupConfig", "MixupSchedule", "Propagation", "PseudoLabelConfig", "confident_pseudo_labels",
    "gaussian_affinity", "gaussian_wasserstein", "mix", "mixup", "normalised_affinity", "propagate_labels",
    "prototype_logits", "prototypes", "sample_beta", "smooth_labels",
]
