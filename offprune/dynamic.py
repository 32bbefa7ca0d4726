"""Masks that change during training (`--prune gmp | set | rigl`): schedules the training loop asks
after every update (`offprune.prune.MaskSchedule`). In between changes training is exactly the
static-mask path; at a change `MaskHolder.set_masks` zeroes newly pruned weights and their Adam
moments, starts regrown weights at zero and rebuilds sparse layers.

- gmp (Zhu & Gupta 2017): dense at first; between `prune_start` and `prune_end` (fractions of the
  run's updates) every `prune_every` updates the weights of smallest magnitude are pruned, the
  sparsity rising on the cubic schedule s_t = s (1 - (1 - (t - t0) / (t1 - t0))^3).
- set (Mocanu et al. 2018): start from random masks (spread by --scope; the reference: erk);
  every `prune_every` updates until `prune_end`, each matrix drops the fraction zeta_t of its kept
  weights with the smallest magnitude and regrows as many at random positions that were not kept
  (new weights 0); zeta_t = drop_fraction * (1 + cos(pi t / t_end)) / 2.
- rigl (Evci et al. 2020): as set, but regrows where the magnitude of the dense gradient of the
  network's own loss (one batch) is largest; the dense gradient is computed at changes only, so
  between them rigl trains on sparse kernels like any static mask.

Every change is a pure function of the step, the weights, the run's seed and (rigl) the sampled
batch, so a resumed run changes its masks exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from offprune.prune import PrunableNetwork, masks_from_scores, prunable_parameters
from offprune.sparse import SparseLinear, dense_view

DYNAMIC_METHODS = ("gmp", "set", "rigl")

Masks = dict[str, dict[str, Tensor]]


def gmp_sparsity(step: int, final: float, start: int, end: int) -> float:
    """The cubic schedule of gradual magnitude pruning: 0 before `start`, `final` from `end` on."""
    if step <= start:
        return 0.0
    if step >= end:
        return final
    return final * (1.0 - (1.0 - (step - start) / (end - start)) ** 3)


def drop_fraction_at(step: int, initial: float, end: int) -> float:
    """SET's / RigL's cosine decay of the fraction of kept weights replaced at a change."""
    return 0.0 if step >= end else initial * (1.0 + math.cos(math.pi * step / end)) / 2.0


def current_weights(net: PrunableNetwork) -> dict[str, Tensor]:
    """The network's prunable weight matrices as dense tensors, whatever its kernels."""
    weights = {name: p.detach() for name, p in prunable_parameters(net.module).items()}
    for prefix, module in net.module.named_modules():
        if isinstance(module, SparseLinear):
            weights[f"{prefix}.weight" if prefix else "weight"] = module.dense_weight(module.values.detach())
    return weights


def is_change_step(step: int, start: int, end: int, every: int) -> bool:
    """Whether the masks change after update `step`: every `every` updates from `start` to `end`."""
    return step >= max(start, every) and step <= end and step % every == 0


def change_steps(total: int, start: int, end: int, every: int) -> list[int]:
    """The updates after which the masks change, up to `total`."""
    return [t for t in range(every, min(total, end) + 1, every) if is_change_step(t, start, end, every)]


def change_rows(step: int, old: Masks, new: Masks) -> list[dict]:
    """One row per layer of `new`: step, network, layer, kept, grown and dropped since `old`."""
    return [dict(step=step, network=name, layer=layer, kept=int(m.sum()), grown=int((m & ~old[name][layer]).sum()),
                 dropped=int((old[name][layer] & ~m).sum()))
            for name, layers in new.items() for layer, m in layers.items()]


class Schedule:
    """Common bookkeeping: which updates change the masks, and the masks now."""

    def __init__(self, networks: dict[str, PrunableNetwork], masks: Masks, start: int, end: int, every: int,
                 seed: int):
        self.networks, self.masks, self.seed = networks, masks, seed
        self.start, self.end, self.every = start, end, every
        self.changes: list[dict] = []  # per layer and change: step, kept, grown, dropped (written by the loop)

    def changes_until(self, step: int) -> int:
        """How many changes the masks have had after `step` updates."""
        return sum(1 for t in range(self.every, min(step, self.end) + 1, self.every)
                   if is_change_step(t, self.start, self.end, self.every))

    def masks_at(self, step: int) -> Masks | None:
        if not is_change_step(step, self.start, self.end, self.every):
            return None
        new = {name: self.change(step, name, net, self.masks[name]) for name, net in self.networks.items()}
        self.changes += change_rows(step, self.masks, new)
        self.masks = new
        return new

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def change(self, step: int, name: str, net: PrunableNetwork, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError


class GradualMagnitude(Schedule):
    def __init__(self, networks, masks, seed: int, final: dict[str, float], start: int, end: int, every: int,
                 scope: str):
        super().__init__(networks, masks, start, end, every, seed)
        self.final, self.scope = final, scope

    def change(self, step, name, net, masks):
        sparsity = gmp_sparsity(step, self.final[name], self.start, self.end)
        scores = {k: w.abs().masked_fill(~masks[k], -1.0) for k, w in current_weights(net).items()}
        return masks_from_scores(scores, sparsity, self.scope)


class DropAndGrow(Schedule):
    """SET (grow at random) and RigL (grow where the dense gradient is largest)."""

    def __init__(self, networks, masks, seed: int, end: int, every: int, drop_fraction: float,
                 gradients: Callable[[str, PrunableNetwork], dict[str, Tensor]] | None = None):
        super().__init__(networks, masks, 0, end, every, seed)
        self.drop_fraction, self.gradients = drop_fraction, gradients

    def change(self, step, name, net, masks):
        zeta = drop_fraction_at(step, self.drop_fraction, self.end)
        weights = current_weights(net)
        grads = self.gradients(name, net) if self.gradients else None
        g = self.generator(step)
        new = {}
        for layer, m in masks.items():
            kept = int(m.sum())
            k = min(round(zeta * kept), int((~m).sum()))
            flat = m.flatten().clone()
            if k == 0:
                new[layer] = m.clone()
                continue
            magnitude = weights[layer].abs().flatten().masked_fill(~flat, math.inf)
            drop = torch.sort(magnitude, stable=True).indices[:k]  # the k smallest kept weights
            grow_score = (grads[layer].abs().flatten() if grads is not None
                          else torch.rand(flat.numel(), generator=g).to(flat.device))
            grow_score = grow_score.masked_fill(flat, -math.inf)  # only positions not kept before the drop
            grow = torch.sort(grow_score, descending=True, stable=True).indices[:k]
            flat[drop] = False
            flat[grow] = True
            new[layer] = flat.view(m.shape)
        return new


def dense_gradients(loss_batch: Callable[[], object]) -> Callable[[str, PrunableNetwork], dict[str, Tensor]]:
    """RigL's grow signal: the gradient of the network's own loss on a fresh batch with respect to
    every weight, pruned ones included. On dense kernels pruned weights are stored zeros; sparse
    layers are seen densely for this one gradient (`offprune.sparse.dense_view`), so RigL trains on
    sparse kernels between changes."""
    def gradients(name: str, net: PrunableNetwork) -> dict[str, Tensor]:
        with dense_view(net.module):
            params = prunable_parameters(net.module)
            grads = torch.autograd.grad(net.loss(loss_batch()), list(params.values()), allow_unused=True)
        return {k: torch.zeros_like(p) if gr is None else gr for (k, p), gr in zip(params.items(), grads)}
    return gradients

