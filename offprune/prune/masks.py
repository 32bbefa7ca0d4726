"""From scores to masks: keep exactly round(n * (1 - sparsity)) weights, ties broken deterministically."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# global: one ranking over the network (the paper); layer: every weight matrix keeps the same
# fraction (uniform); erk: Erdos-Renyi-kernel densities per matrix, then top-k inside each
SCOPES = ("global", "layer", "erk")


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


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-kernel densities (Evci et al. 2020): a [n_out, n_in] matrix's density is
    proportional to (n_in + n_out) / (n_in * n_out), scaled so the matrices together keep
    `density` of their weights; a matrix that would exceed density 1 is kept dense and the
    others are rescaled (repeatedly, until none exceeds 1)."""
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (shape[0] + shape[-1]) / (shape[0] * shape[-1]) for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        scale = budget / sum(raw[n] * sizes[n] for n in raw if n not in dense)
        over = {n for n in raw if n not in dense and scale * raw[n] > 1.0}
        if not over:
            return {n: 1.0 if n in dense else scale * raw[n] for n in shapes}
        dense |= over


def layer_fractions(shapes: dict[str, tuple[int, ...]], sparsity: float, scope: str) -> dict[str, float]:
    """The fraction of each weight matrix kept: `erk_densities` under 'erk', else 1 - sparsity for
    every matrix ('layer'; under 'global', the network's average)."""
    return erk_densities(shapes, 1.0 - sparsity) if scope == "erk" else {n: 1.0 - sparsity for n in shapes}


def split_like(flat: Tensor, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """`flat` (the tensors' values concatenated in order) cut back into their shapes."""
    out, offset = {}, 0
    for name, t in tensors.items():
        out[name] = flat[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()
    return out


def masks_from_scores(scores: dict[str, Tensor], sparsity: float, scope: str = "global") -> dict[str, Tensor]:
    """Boolean masks (True = kept) with the same keys and shapes as `scores`.

    scope 'global': one ranking over all the network's weights (the paper); 'layer': each weight
    matrix keeps the same fraction; 'erk': each matrix keeps its `erk_densities` fraction (the
    network's total then differs from round(n * (1 - sparsity)) by per-matrix rounding only).
    NaN scores rank lowest.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope '{scope}' (choose from {', '.join(SCOPES)})")

    def clean(s: Tensor) -> Tensor:
        return torch.nan_to_num(s.detach().float().flatten(), nan=-float("inf"))

    if scope in ("layer", "erk"):
        fractions = layer_fractions({n: tuple(s.shape) for n, s in scores.items()}, sparsity, scope)
        return {
            name: _top_k_mask(clean(s), kept_count(s.numel(), 1.0 - fractions[name])).view(s.shape)
            for name, s in scores.items()
        }
    flat = torch.cat([clean(s) for s in scores.values()])
    return split_like(_top_k_mask(flat, kept_count(flat.numel(), sparsity)), scores)


@dataclass(frozen=True)
class LayerDensity:
    network: str
    layer: str
    total: int
    kept: int

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0


def shuffle_within_layers(masks: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """The sanity check of Frankle et al. 2021: each matrix keeps as many weights as its mask, at
    uniformly random positions (what remains of a criterion is only its per-layer densities)."""
    out = {}
    for name, m in masks.items():
        order = torch.randperm(m.numel(), generator=generator)
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[order[: int(m.sum())]] = True
        out[name] = flat.view(m.shape).to(m.device)
    return out


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
