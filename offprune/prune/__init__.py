"""Pruning at initialisation: criteria (scores.py), exact top-k masks (masks.py), enforcement."""

from offprune.prune.enforce import MaskEnforcer
from offprune.prune.masks import SCOPES, kept_count, layer_densities, masks_from_scores, realised_sparsity
from offprune.prune.networks import (DEFAULT_PRUNE_BATCH, METHODS, MaskSchedule, check_sparsity_of, compute_masks,
                                    round_sparsity)
from offprune.prune.scores import CRITERIA, PrunableNetwork, prunable_parameters, score, score_network

__all__ = [
    "CRITERIA",
    "DEFAULT_PRUNE_BATCH",
    "METHODS",
    "SCOPES",
    "MaskEnforcer",
    "MaskSchedule",
    "PrunableNetwork",
    "check_sparsity_of",
    "compute_masks",
    "kept_count",
    "layer_densities",
    "masks_from_scores",
    "prunable_parameters",
    "realised_sparsity",
    "round_sparsity",
    "score",
    "score_network",
]
