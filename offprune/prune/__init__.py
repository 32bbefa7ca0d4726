"""Pruning at initialisation: criteria (scores.py), exact top-k masks (masks.py), enforcement."""

from offprune.prune.enforce import MaskEnforcer
from offprune.prune.masks import (SCOPES, erk_densities, kept_count, layer_densities, layer_fractions, masks_from_scores,
                                 realised_sparsity, shuffle_within_layers, split_like)
from offprune.prune.networks import (DEFAULT_PRUNE_BATCH, DEFAULT_PRUNE_ROUNDS, DENSE_KERNEL_METHODS, METHODS, UNMASKED, MaskSchedule,
                                    SUPERMASK_METHODS, ScoreMix, check_sparsity_of, check_transferable, compute_masks,
                                    compute_masks_and_scores, default_prune_rounds, default_scope, round_sparsity)
from offprune.prune.scores import CRITERIA, PrunableNetwork, prunable_parameters, score, score_network

__all__ = [
    "CRITERIA",
    "DEFAULT_PRUNE_BATCH",
    "DEFAULT_PRUNE_ROUNDS",
    "DENSE_KERNEL_METHODS",
    "METHODS",
    "SCOPES",
    "SUPERMASK_METHODS",
    "UNMASKED",
    "MaskEnforcer",
    "MaskSchedule",
    "PrunableNetwork",
    "check_sparsity_of",
    "check_transferable",
    "ScoreMix",
    "compute_masks",
    "compute_masks_and_scores",
    "erk_densities",
    "default_prune_rounds",
    "default_scope",
    "kept_count",
    "layer_densities",
    "layer_fractions",
    "masks_from_scores",
    "prunable_parameters",
    "realised_sparsity",
    "round_sparsity",
    "score",
    "score_network",
    "shuffle_within_layers",
    "split_like",
]
