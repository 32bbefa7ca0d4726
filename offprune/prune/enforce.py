"""The one place where pruned weights are held at zero during training.

Hooks on each optimizer's `step`: before it, gradients at pruned positions are zeroed (so Adam's
moment estimates stay exactly 0 there); after it, pruned weights are zeroed again (so any
optimizer, e.g. one with weight decay or momentum, cannot revive them). Target copies are updated
by soft updates from masked sources and so stay exactly zero without a hook.
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
        self.pairs: list[tuple[Tensor, Tensor]] = []  # (parameter, float mask), fully dense masks left out
        for name, net in networks.items():
            for module in (net.module, *net.mask_copies):
                params = dict(module.named_parameters())
                for pname, mask in masks[name].items():
                    if not bool(mask.all()):
                        p = params[pname]
                        self.pairs.append((p, mask.to(device=p.device, dtype=p.dtype)))
        self.zero_pruned_weights()

        mask_of = {id(p): m for p, m in self.pairs}
        self._handles = []
        for opt in optimizers:
            pairs = [(p, mask_of[id(p)]) for g in opt.param_groups for p in g["params"] if id(p) in mask_of]
            if pairs:
                self._handles.append(opt.register_step_pre_hook(_mask_grads_hook(pairs)))
                self._handles.append(opt.register_step_post_hook(_mask_weights_hook(pairs)))

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
    @torch.no_grad()
    def hook(optimizer, args, kwargs):
        with_grad = [(p.grad, m) for p, m in pairs if p.grad is not None]
        if with_grad:
            torch._foreach_mul_([g for g, _ in with_grad], [m for _, m in with_grad])

    return hook


def _mask_weights_hook(pairs: list[tuple[Tensor, Tensor]]):
    params, masks = [p for p, _ in pairs], [m for _, m in pairs]

    @torch.no_grad()
    def hook(optimizer, args, kwargs):
        torch._foreach_mul_(params, masks)

    return hook
