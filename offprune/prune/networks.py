"""Algorithm 1 of the paper: score each prunable network on its own loss over ONE batch, then mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from offprune.errors import UserError
from offprune.prune.masks import masks_from_scores
from offprune.prune.scores import prunable_parameters, score

METHODS = ("dense", "random", "magnitude", "snip", "grasp")

# Batch sizes of the paper (SNIP 100 samples, GraSP 200); other criteria take SNIP's.
DEFAULT_PRUNE_BATCH = {"snip": 100, "grasp": 200}


@dataclass
class PrunableNetwork:
    """One network an algorithm exposes to pruning."""

    module: nn.Module  # scored and masked; its named_parameters() names key the masks
    loss: Callable[..., Tensor]  # loss(batch) -> the network's own training loss
    mask_copies: tuple[nn.Module, ...] = field(default=())  # same-shaped modules sharing the mask


def compute_masks(
    networks: dict[str, PrunableNetwork],
    method: str,
    sparsity: float,
    scope: str,
    sample_batch: Callable[[], object],
    generator: torch.Generator,
    sparsity_of: dict[str, float] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Masks per network (True = kept), all scored at initialisation before any mask is applied.

    Each network draws its own batch from `sample_batch()`, as in Algorithm 1. 'dense' keeps all.
    `sparsity_of` sets another sparsity for the networks it names (0 keeps them dense).
    """
    sparsity_of = sparsity_of or {}
    check_sparsity_of(networks, sparsity_of)
    masks = {}
    for name, net in networks.items():
        net_sparsity = sparsity_of.get(name, sparsity)
        if method == "dense" or net_sparsity == 0:
            masks[name] = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(net.module).items()}
            continue
        batch = sample_batch()
        scores = score(method, net.module, lambda: net.loss(batch), generator=generator)
        masks[name] = masks_from_scores(scores, net_sparsity, scope)
    return masks


def check_sparsity_of(networks: dict[str, PrunableNetwork], sparsity_of: dict[str, float]) -> None:
    unknown = sorted(set(sparsity_of) - set(networks))
    if unknown:
        raise UserError(f"--sparsity-of names unknown network(s) {', '.join(unknown)} "
                        f"(this algorithm's prunable networks: {', '.join(networks)})")
