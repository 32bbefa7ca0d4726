"""Pruning at initialisation: criteria (scores.py), exact top-k masks (masks.py), enforcement."""

from offprune.prune.enforce import MaskEnforcer
from offprune.prune.masks import SCOPES, kept_count, layer_densities, masks_from_scores, realised_sparsity
from offprune.prune.networks import DEFAULT_PRUNE_BATCH, METHODS, PrunableNetwork, check_sparsity_of, compute_masks
from offprune.prune.scores import CRITERIA, prunable_parameters, score

__all__ = [
    "CRITERIA",
    "DEFAULT_PRUNE_BATCH",
    "METHODS",
    "SCOPES",
    "MaskEnforcer",
    "PrunableNetwork",
    "check_sparsity_of",
    "compute_masks",
    "kept_count",
    "layer_densities",
    "masks_from_scores",
    "prunable_parameters",
    "realised_sparsity",
    "score",
]
