"""From scores to masks: keep exactly round(n * (1 - sparsity)) weights, ties broken deterministically."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SCOPES = ("global", "layer")


def kept_count(n: int, sparsity: float) -> int:
    """Number of weights kept out of n at `sparsity` (the fraction removed)."""
    return int(round(n * (1.0 - sparsity)))


def _top_k_mask(flat_scores: Tensor, k: int) -> Tensor:
    # A stable descending sort keeps, among equal scores, the ones earlier in flat order: exact k
    # even when scores tie (a `score >= threshold` rule can keep more than k).
    order = torch.sort(flat_scores, descending=True, stable=True).indices
    mask = torch.zeros(flat_scores.numel(), dtype=torch.bool, device=flat_scores.device)
    mask[order[:k]] = True
    return mask


def masks_from_scores(scores: dict[str, Tensor], sparsity: float, scope: str = "global") -> dict[str, Tensor]:
    """Boolean masks (True = kept) with the same keys and shapes as `scores`.

    scope 'global': one ranking over all the network's weights (the paper); 'layer': each weight
    matrix keeps the same fraction. NaN scores rank lowest.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope '{scope}' (choose from {', '.join(SCOPES)})")

    def clean(s: Tensor) -> Tensor:
        return torch.nan_to_num(s.detach().float().flatten(), nan=-float("inf"))

    if scope == "layer":
        return {
            name: _top_k_mask(clean(s), kept_count(s.numel(), sparsity)).view(s.shape)
            for name, s in scores.items()
        }
    flat = torch.cat([clean(s) for s in scores.values()])
    mask = _top_k_mask(flat, kept_count(flat.numel(), sparsity))
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = mask[offset : offset + s.numel()].view(s.shape)
        offset += s.numel()
    return out


@dataclass(frozen=True)
class LayerDensity:
    network: str
    layer: str
    total: int
    kept: int

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0


def layer_densities(masks: dict[str, dict[str, Tensor]]) -> list[LayerDensity]:
    """Per-layer remaining weights (the paper's Figure 3)."""
    return [
        LayerDensity(net, layer, m.numel(), int(m.sum()))
        for net, layers in masks.items()
        for layer, m in layers.items()
    ]


def realised_sparsity(masks: dict[str, Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0
