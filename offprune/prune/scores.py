"""Pruning criteria: each maps (network, prunable weights, pruning batch, generator) to one
importance per weight.

Higher score = kept. A criterion is a small function; the rule that turns scores into masks lives in
masks.py. The network is a `PrunableNetwork`: `net.loss(batch)` is its own training loss on the
pruning batch, `net.output(batch)` (where the algorithm gives it) its output, for criteria that
need the network's function rather than its loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from offprune.errors import UserError

LossFn = Callable[[], Tensor]
Params = dict[str, nn.Parameter]
Scores = dict[str, Tensor]


@dataclass
class PrunableNetwork:
    """One network an algorithm exposes to pruning."""

    module: nn.Module  # scored and masked; its named_parameters() names key the masks
    loss: Callable[..., Tensor]  # loss(batch) -> the network's own training loss
    mask_copies: tuple[nn.Module, ...] = field(default=())  # same-shaped modules sharing the mask
    # output(batch) -> the network's output before any squashing nonlinearity (tanh, clamp), for
    # data-free criteria such as SynFlow, which call it on an all-ones batch; None: not available
    output: Callable[..., Tensor] | None = None


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


def snip(net: PrunableNetwork, params: Params, batch, generator: torch.Generator) -> Scores:
    """SNIP (Lee et al. 2019): connection sensitivity |w * dL/dw|."""
    weights = list(params.values())
    grads = _grads(net.loss(batch), weights)
    return {n: (w.detach() * g).abs() for n, w, g in zip(params, weights, grads)}


def grasp(net: PrunableNetwork, params: Params, batch, generator: torch.Generator) -> Scores:
    """GraSP (Wang et al. 2020): importance w * (H g), H the loss Hessian, g the gradient.

    GraSP removes the weights with the largest -w * Hg, i.e. keeps the largest w * Hg. Hg is
    d(g_detached . g)/dw by double backprop, on ONE forward pass so that losses that sample noise
    (VAE, BCQ's target) use the same sample for g and H. The reference divides classification
    logits by T = 200; our losses are regressions with no logits, so no temperature is applied
    (T = 1). The reference's division by |sum S| is a positive constant per network and does not
    change which weights are kept, so it is left out.
    """
    weights = list(params.values())
    grads = _grads(net.loss(batch), weights, create_graph=True)
    z = sum((g.detach() * g).sum() for g in grads if g.requires_grad)
    if not isinstance(z, Tensor):  # the loss is linear in every weight: H = 0
        return {n: torch.zeros_like(w) for n, w in params.items()}
    hg = _grads(z, weights)
    return {n: w.detach() * h for n, w, h in zip(params, weights, hg)}


def magnitude(net: PrunableNetwork, params: Params, batch, generator: torch.Generator) -> Scores:
    """|w| at initialisation (no data used)."""
    return {n: w.detach().abs() for n, w in params.items()}


def random(net: PrunableNetwork, params: Params, batch, generator: torch.Generator) -> Scores:
    """Uniform random scores: a random mask with exactly k kept."""
    return {n: torch.rand(w.shape, generator=generator).to(w.device) for n, w in params.items()}


def _ones_like(batch):
    """One row of the batch with every entry 1.0 in float64 (a NamedTuple of tensors, or a tensor;
    None for a data-free call)."""
    if batch is None:
        return None
    if isinstance(batch, Tensor):
        return torch.ones_like(batch[:1], dtype=torch.float64)
    return type(batch)(*(torch.ones_like(t[:1], dtype=torch.float64) for t in batch))


def synflow(net: PrunableNetwork, params: Params, batch, generator: torch.Generator) -> Scores:
    """SynFlow (Tanaka et al. 2020): data-free. Every parameter of the network (biases too) is
    replaced by its absolute value, in float64; R = the sum of the network's output on an all-ones
    input (one row, shaped as the pruning batch); score |w * dR/dw|. Parameters are restored after.
    The reference repeats this over 100 rounds on the exponential schedule (`compute_masks`'
    rounds, DEFAULT_PRUNE_ROUNDS); one round is SynFlow without iteration."""
    if net.output is None:
        raise UserError("synflow needs the network's output on an all-ones input, and this network does not give "
                        "one (its algorithm's prunable_networks() sets PrunableNetwork.output)")
    module = net.module
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    dtype = next(iter(params.values())).dtype
    try:
        module.double()
        with torch.no_grad():
            for p in module.parameters():
                p.abs_()
        weights = list(params.values())
        grads = _grads(net.output(_ones_like(batch)).sum(), weights)
        return {n: (w.detach() * g).abs().to(dtype) for n, w, g in zip(params, weights, grads)}
    finally:
        module.to(dtype)
        module.load_state_dict(saved)


Criterion = Callable[[PrunableNetwork, Params, object, torch.Generator], Scores]
CRITERIA: dict[str, Criterion] = {
    "snip": snip,
    "grasp": grasp,
    "magnitude": magnitude,
    "random": random,
    "synflow": synflow,
}


def score_network(method: str, net: PrunableNetwork, batch, generator: torch.Generator | None = None) -> Scores:
    """One importance score per prunable weight of `net.module` on the pruning `batch` (higher = kept).

    `generator` seeds the `random` criterion (default: torch's global generator)."""
    if method not in CRITERIA:
        raise ValueError(f"unknown pruning criterion '{method}' (choose from {', '.join(CRITERIA)})")
    return CRITERIA[method](net, prunable_parameters(net.module), batch, generator or torch.default_generator)


def score(method: str, module: nn.Module, loss_fn: LossFn, generator: torch.Generator | None = None) -> Scores:
    """`score_network` for a bare module and a loss closure on the pruning batch."""
    return score_network(method, PrunableNetwork(module, lambda _batch: loss_fn()), None, generator)
