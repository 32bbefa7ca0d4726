"""Pruning criteria: each maps (module, prunable weights, loss, generator) to one importance per weight.

Higher score = kept. A criterion is a small function; the rule that turns scores into masks lives in
masks.py. `loss_fn()` computes the network's own training loss on the single pruning batch.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

LossFn = Callable[[], Tensor]
Params = dict[str, nn.Parameter]
Scores = dict[str, Tensor]


def prunable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Weight matrices of Linear and GRU layers, keyed by `module.named_parameters()` names.

    Biases and normalisation parameters are never pruned.
    """
    names = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            keys = ["weight"]
        elif isinstance(sub, (nn.GRU, nn.GRUCell, nn.LSTM, nn.LSTMCell, nn.RNN, nn.RNNCell)):
            keys = [n for n, _ in sub.named_parameters(recurse=False) if n.startswith("weight_")]
        else:
            continue
        for key in keys:
            names[f"{prefix}.{key}" if prefix else key] = getattr(sub, key)
    return names


def _grads(loss: Tensor, params: list[Tensor], create_graph: bool = False) -> list[Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def snip(module: nn.Module, params: Params, loss_fn: LossFn, generator: torch.Generator) -> Scores:
    """SNIP (Lee et al. 2019): connection sensitivity |w * dL/dw|."""
    weights = list(params.values())
    grads = _grads(loss_fn(), weights)
    return {n: (w.detach() * g).abs() for n, w, g in zip(params, weights, grads)}


def grasp(module: nn.Module, params: Params, loss_fn: LossFn, generator: torch.Generator) -> Scores:
    """GraSP (Wang et al. 2020): importance w * (H g), H the loss Hessian, g the gradient.

    GraSP removes the weights with the largest -w * Hg, i.e. keeps the largest w * Hg. Hg is
    d(g_detached . g)/dw by double backprop, on ONE forward pass so that losses that sample noise
    (VAE, BCQ's target) use the same sample for g and H. The reference divides classification
    logits by T = 200; our losses are regressions with no logits, so no temperature is applied
    (T = 1). The reference's division by |sum S| is a positive constant per network and does not
    change which weights are kept, so it is left out.
    """
    weights = list(params.values())
    grads = _grads(loss_fn(), weights, create_graph=True)
    z = sum((g.detach() * g).sum() for g in grads if g.requires_grad)
    if not isinstance(z, Tensor):  # the loss is linear in every weight: H = 0
        return {n: torch.zeros_like(w) for n, w in params.items()}
    hg = _grads(z, weights)
    return {n: w.detach() * h for n, w, h in zip(params, weights, hg)}


def magnitude(module: nn.Module, params: Params, loss_fn: LossFn, generator: torch.Generator) -> Scores:
    """|w| at initialisation (no data used)."""
    return {n: w.detach().abs() for n, w in params.items()}


def random(module: nn.Module, params: Params, loss_fn: LossFn, generator: torch.Generator) -> Scores:
    """Uniform random scores: a random mask with exactly k kept."""
    return {n: torch.rand(w.shape, generator=generator).to(w.device) for n, w in params.items()}


CRITERIA: dict[str, Callable[[nn.Module, Params, LossFn, torch.Generator], Scores]] = {
    "snip": snip,
    "grasp": grasp,
    "magnitude": magnitude,
    "random": random,
}


def score(
    method: str,
    module: nn.Module,
    loss_fn: LossFn,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One importance score per prunable weight of `module` (higher = kept).

    `generator` seeds the `random` criterion (default: torch's global generator).
    """
    if method not in CRITERIA:
        raise ValueError(f"unknown pruning criterion '{method}' (choose from {', '.join(CRITERIA)})")
    return CRITERIA[method](module, prunable_parameters(module), loss_fn, generator or torch.default_generator)
