"""The one place where pruned weights are held at zero during training.

Hooks on each optimizer's `step`: before it, gradients at pruned positions are zeroed (so Adam's
moment estimates stay exactly 0 there); after it, pruned weights are zeroed again (so any
optimizer, e.g. one with weight decay or momentum, cannot revive them). Target copies are updated
by soft updates from masked sources and so stay exactly zero without a hook.

`set_masks` replaces the masks during training (schedules, regrowth): newly pruned positions get
zero weights (in the network and its mask copies) and zero optimizer moments; newly kept ones
start from their zero weight, as RigL and SET regrow.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from offprune.prune.networks import PrunableNetwork


class MaskEnforcer:
    def __init__(
        self,
        networks: dict[str, PrunableNetwork],
        masks: dict[str, dict[str, Tensor]],
        optimizers: Iterable[torch.optim.Optimizer],
    ):
        self.networks = networks
        self.optimizers = list(optimizers)
        self.pairs: list[tuple[Tensor, Tensor]] = []  # (parameter, float mask), fully dense masks left out
        self._by_optimizer: dict[int, list[tuple[Tensor, Tensor]]] = {id(opt): [] for opt in self.optimizers}
        self._lists: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self._handles = []
        self._add(masks)
        self.zero_pruned_weights()

    def _add(self, masks: dict[str, dict[str, Tensor]]) -> None:
        """Enforce the masks that keep less than everything on parameters not enforced yet."""
        known = {id(p) for p, _ in self.pairs}
        owner = {id(p): opt for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
        for name, net in self.networks.items():
            for module in (net.module, *net.mask_copies):
                params = dict(module.named_parameters())
                for pname, mask in masks.get(name, {}).items():
                    p = params[pname]
                    if bool(mask.all()) or id(p) in known:
                        continue
                    pair = (p, mask.to(device=p.device, dtype=p.dtype))
                    self.pairs.append(pair)
                    known.add(id(p))
                    if id(p) in owner:
                        opt = owner[id(p)]
                        pairs = self._by_optimizer[id(opt)]
                        if not pairs:  # hooks only where something is masked (dense runs get none)
                            weights, float_masks = [], []  # the post-step hook's foreach lists, kept in step
                            self._lists[id(opt)] = (weights, float_masks)
                            self._handles.append(opt.register_step_pre_hook(_mask_grads_hook(pairs)))
                            self._handles.append(opt.register_step_post_hook(_mask_weights_hook(weights, float_masks)))
                        pairs.append(pair)
                        self._lists[id(opt)][0].append(pair[0])
                        self._lists[id(opt)][1].append(pair[1])

    @torch.no_grad()
    def set_masks(self, masks: dict[str, dict[str, Tensor]]) -> None:
        """Replace the masks of the networks named in `masks` (see the module docstring)."""
        self._add(masks)
        current = {id(p): m for p, m in self.pairs}
        for name, net in self.networks.items():
            if name not in masks:
                continue
            for module in (net.module, *net.mask_copies):
                params = dict(module.named_parameters())
                for pname, mask in masks[name].items():
                    p = params[pname]
                    if id(p) in current:
                        current[id(p)].copy_(mask.to(device=p.device, dtype=p.dtype))  # hooks see it in place
        for opt in self.optimizers:
            for p, m in self._by_optimizer[id(opt)]:
                for value in opt.state.get(p, {}).values():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        value.masked_fill_(m == 0, 0.0)  # moments at newly pruned positions
        self.zero_pruned_weights()

    @torch.no_grad()
    def zero_pruned_weights(self) -> None:
        # masked_fill gives +0.0; multiplying by the mask would leave -0.0 where weights were
        # negative. Later updates keep +0.0 (p - lr * 0 = +0.0), so stored zeros are all +0.0.
        for p, m in self.pairs:
            p.masked_fill_(m == 0, 0.0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _mask_grads_hook(pairs: list[tuple[Tensor, Tensor]]):
    # `pairs` is the enforcer's own list: masks added later by set_masks are seen here
    @torch.no_grad()
    def hook(optimizer, args, kwargs):
        with_grad = [(p.grad, m) for p, m in pairs if p.grad is not None]
        if with_grad:
            torch._foreach_mul_([g for g, _ in with_grad], [m for _, m in with_grad])

    return hook


def _mask_weights_hook(params: list[Tensor], masks: list[Tensor]):
    # the enforcer's own lists (grown by set_masks), not rebuilt at every step
    @torch.no_grad()
    def hook(optimizer, args, kwargs):
        torch._foreach_mul_(params, masks)

    return hook
