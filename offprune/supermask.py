"""Edge-popup (Ramanujan et al. 2020) and biprop (Diffenderfer & Kailkhura 2021): the weights stay
frozen; every weight has a learned score, and each forward pass keeps the weights whose |score|
ranks in the top (1 - S) (per layer with `--scope layer`, the references' rule; `erk` and
`global` spread the kept count as they do for the other criteria).

- edge-popup: effective weight = w * m, with w frozen at the signed Kaiming constant
  sign(w0) * sqrt(2 / (fan_in * kept fraction)) (the reference's best initialisation, its fan
  scaled by the fraction a unit keeps).
- biprop: effective weight = sign(w) * alpha * m, with w frozen at its initial value and the gain
  alpha = mean |w| over the kept weights of the layer (recomputed as the mask changes).

Both pass the gradient straight through the top-k: d loss / d |score| = g * w, where g is the
gradient with respect to the effective weight (biprop: the reference's g * sign(w) * |w|, the
same product). The scores are trained by the algorithm's own losses, in a parameter group added
to the optimizer of the network they mask (same optimizer and learning rate).

What the references leave open for an agent: the pruned layers' biases are frozen at zero (the
references' layers have none); parameters outside the pruned layers train as usual. A twin
critic's Q2 shares Q1's scores (and so its mask), trained by both heads' losses; a target
network has its own copy of the scores, soft-updated from the source's as its weights would be,
so its mask follows the source's with the target's lag. Masks are dense tensors recomputed from
the scores, so these methods train on dense kernels.

A run's checkpoint keeps the modules with their effective weights (zero where pruned: storage,
export and latency read it as a statically masked run) and, under `supermask`, the frozen weights
and scores a resume needs.
"""

from __future__ import annotations

import math
from typing import Iterable, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from offprune.errors import UserError
from offprune.prune import (SUPERMASK_METHODS, PrunableNetwork, kept_count, layer_fractions, prunable_parameters,
                            split_like)

Masks = dict[str, dict[str, Tensor]]


# The ranking runs every update on every layer, so it is written for speed: on CPU it works on numpy
# views of the scores (no copy), whose comparisons and counts on float32 arrays run several times
# faster than torch's (benchmarks/README.md); other devices keep torch. The same values either
# way: only comparisons, counts and one top-k are involved.
Array = Union[Tensor, np.ndarray]


def _array(t: Tensor) -> Array:
    numpy_kind = t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)  # numpy has no bfloat16
    return t.detach().numpy() if numpy_kind else t


def _count(x: Array) -> int:
    return int(np.count_nonzero(x)) if isinstance(x, np.ndarray) else int(torch.count_nonzero(x))


def same_mask(a: Tensor, b: Tensor) -> bool:
    """torch.equal for boolean masks, via numpy on CPU (see above)."""
    if a.device.type == "cpu" and b.device.type == "cpu":
        return a.shape == b.shape and bool(np.array_equal(a.numpy(), b.numpy()))
    return torch.equal(a, b)


def kth_largest(flat: Tensor, k: int, hint: float | None = None) -> float:
    """The k-th largest value of `flat` (1 <= k <= numel). With `hint` (the value it had one
    update ago: scores move little per update), only the values in a narrow band around the hint
    are ranked; the band widens until it holds the k-th value, else a full torch.topk."""
    n, values = flat.numel(), _array(flat)
    if hint is not None and math.isfinite(hint):
        width = max(abs(hint) * 1e-3, 1e-12)
        for _ in range(6):
            lo, hi = hint - width, hint + width
            above = _count(values > hi)
            at_least_lo = values >= lo
            if above < k <= _count(at_least_lo):
                band = torch.as_tensor(values[at_least_lo & (values <= hi)])
                if band.numel() <= max(4096, n // 8):
                    return float(torch.topk(band, k - above).values.min())
                break
            width *= 8
    return float(torch.topk(flat, k, sorted=False).values.min())


def canonical_top_k(flat: Tensor, k: int, kth: float) -> Tensor:
    """The k largest of `flat` as a bool mask, ties at the k-th value broken by position (earlier
    kept), the rule of offprune.prune.masks: the same mask however the k-th value was found."""
    values = _array(flat)
    keep = values >= kth
    if _count(keep) != k:  # a tie at the k-th value (rare): the earliest of the tied values kept
        keep = values > kth
        missing = k - _count(keep)
        tied = np.flatnonzero(values == kth) if isinstance(values, np.ndarray) else (flat == kth).nonzero().squeeze(1)
        keep[tied[:missing]] = True
    return torch.as_tensor(keep)


def top_k_masks(scores: dict[str, Tensor], sparsity: float, scope: str,
                hints: dict[str, float] | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Boolean masks keeping the largest scores: `kept_count` per layer ('layer'), the ERK
    fraction per layer ('erk') or one ranking over all layers ('global'), exact counts and ties
    broken by position; and the k-th values, hints for the next call (`kth_largest`)."""
    hints = hints or {}
    if scope == "global":
        flat = torch.cat([s.detach().flatten() for s in scores.values()])
        k = kept_count(flat.numel(), sparsity)
        kth = kth_largest(flat, k, hints.get("")) if k else math.inf
        keep = canonical_top_k(flat, k, kth) if k else torch.zeros_like(flat, dtype=torch.bool)
        return split_like(keep, scores), {"": kth}
    fractions = layer_fractions({n: tuple(s.shape) for n, s in scores.items()}, sparsity, scope)
    out, kths = {}, {}
    for name, s in scores.items():
        flat = s.detach().flatten()
        k = kept_count(flat.numel(), 1.0 - fractions[name])
        kths[name] = kth_largest(flat, k, hints.get(name)) if k else math.inf
        out[name] = (canonical_top_k(flat, k, kths[name]) if k else torch.zeros_like(flat, dtype=torch.bool)).view(s.shape)
    return out, kths


class Ranking:
    """The masks of one set of scores (a network, or its target copy), recomputed only when a
    score may have changed: a tensor's version moved (soft updates, loads) or `invalidate` was
    called (after an optimizer step: fused Adam writes without bumping versions). A layer's
    `generation` moves only when its mask does, so the effective weights built from it
    (`Supermask`) are rebuilt only then."""

    def __init__(self, scores: dict[str, nn.Parameter], sparsity: float, scope: str):
        self.scores, self.sparsity, self.scope = scores, sparsity, scope
        self._versions: tuple[int, ...] | None = None
        self._masks: dict[str, Tensor] = {}
        self._float: dict[str, Tensor] = {}
        self.generation: dict[str, int] = {name: 0 for name in scores}  # per layer: how often its mask moved
        self.changes = 0  # recomputations that moved at least one weight in or out
        self._stale = True
        self._hints: dict[str, float] = {}  # the last k-th values: where to look for the next ones

    def invalidate(self, *args) -> None:
        self._stale = True

    @torch.no_grad()
    def masks(self) -> dict[str, Tensor]:
        versions = tuple(s._version for s in self.scores.values())
        if versions != self._versions or self._stale:
            new, self._hints = top_k_masks({n: s.abs() for n, s in self.scores.items()}, self.sparsity, self.scope,
                                           self._hints)
            moved = [n for n in new if n not in self._masks or not same_mask(new[n], self._masks[n])]
            if self._masks and moved:
                self.changes += 1
            for n in moved:
                # via uint8: torch converts bool to float several times slower than uint8 on CPU
                self._masks[n], self._float[n] = new[n], new[n].view(torch.uint8).to(self.scores[n].dtype)
                self.generation[n] += 1
            self._versions, self._stale = versions, False
        return self._masks

    def float_mask(self, layer: str) -> Tensor:
        self.masks()
        return self._float[layer]


class _StraightThrough(torch.autograd.Function):
    """The effective weight (built without a graph) whose gradient passes straight through the
    top-k to the scores: d loss / d score = ((g * w) * factor) * sgn(score), g the gradient with
    respect to the effective weight, w the frozen weight as the forward multiplies it (biprop: its
    sign) and factor biprop's |w| (edge-popup: none). The same products in the same order as
    autograd takes them through weight * (base + (|s| - |s|.detach()) * factor), whose forward
    value is exactly weight * base: the same numbers with fewer full-size operations."""

    @staticmethod
    def forward(ctx, scores: Tensor, effective: Tensor, used: Tensor, factor: Tensor | None) -> Tensor:
        ctx.save_for_backward(scores, used, factor)
        return effective.view_as(effective)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        scores, used, factor = ctx.saved_tensors
        grad = grad * used
        if factor is not None:
            grad = grad * factor
        return grad * scores.sgn(), None, None, None


class Supermask(nn.Module):
    """The parametrization of one frozen weight: its effective value from the scores' mask.

    The effective weight is rebuilt only when the layer's mask or the frozen weight moved (a
    network is called several times per update; most calls see the masks of the last one)."""

    def __init__(self, ranking: Ranking, layer: str, binary: bool):
        super().__init__()
        self.scores = ranking.scores[layer]  # a registered Parameter (shared by a network's mask copies)
        self.ranking, self.layer, self.binary = ranking, layer, binary
        self._key: tuple[int, int, int] | None = None  # (weight id, weight version, mask generation) of _built
        self._built: tuple[Tensor, Tensor | None, Tensor] | None = None
        self._signs: tuple[tuple[int, int], Tensor, Tensor] | None = None  # biprop: (weight key, sign(w), |w|)

    def _build(self, weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(the frozen weight as multiplied, biprop's straight-through factor |w|, effective weight)."""
        if not self.binary:
            return weight, None, weight * mask
        key = (id(weight), weight._version)
        signs = self._signs if self._signs is not None and self._signs[0] == key else (key, weight.sign(), weight.abs())
        if not torch.is_inference_mode_enabled():  # the weight is frozen: built once (inference tensors cannot train)
            self._signs = signs
        _, used, factor = signs
        alpha = (factor * mask).sum() / mask.sum().clamp(min=1)
        return used, factor, used * (alpha * mask)

    def forward(self, weight: Tensor) -> Tensor:
        with torch.no_grad():
            mask = self.ranking.float_mask(self.layer)
            key = (id(weight), weight._version, self.ranking.generation[self.layer])
            built = self._built if key == self._key else self._build(weight, mask)
            if key != self._key and not torch.is_inference_mode_enabled():  # inference tensors cannot train later
                self._key, self._built = key, built
        used, factor, effective = built
        if torch.is_grad_enabled() and self.scores.requires_grad:
            return _StraightThrough.apply(self.scores, effective, used, factor)
        return effective


def _fan_in(weight: Tensor) -> int:
    return weight.shape[1] if weight.dim() == 2 else weight[0].numel()


def _submodule(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


class Supermasks:
    """Edge-popup or biprop installed on an agent's prunable networks (see the module docstring)."""

    def __init__(self, method: str, agent, networks: dict[str, PrunableNetwork], sparsity: float, scope: str,
                 sparsity_of: dict[str, float], seed: int):
        if method not in SUPERMASK_METHODS:
            raise ValueError(f"not a supermask method: {method}")
        self.method, self.binary = method, method == "biprop"
        self.rankings: dict[str, Ranking] = {}  # network -> the ranking of its source's scores
        self.modules: dict[str, nn.Module] = {}  # agent module name -> module holding supermask layers
        generator = torch.Generator().manual_seed(seed * 7_919 + 17)
        target_ids = {id(m) for name in agent.targets for m in agent.modules[name].modules()}
        owners = {id(p): opt for opt in agent.optimizers.values() for g in opt.param_groups for p in g["params"]}
        for name, net in networks.items():
            net_sparsity = sparsity_of.get(name, sparsity)
            if net_sparsity == 0:
                continue
            weights = prunable_parameters(net.module)
            unsupported = [n for n in weights if not isinstance(_submodule(net.module, n)[0], nn.Linear)]
            if unsupported:
                raise UserError(f"--prune {method} masks Linear layers; network {name} has other prunable weights "
                                f"({', '.join(unsupported[:3])}): keep it dense with --sparsity-of {name}=0")
            # a unit's expected kept fraction (global scope: the network's), for edge-popup's constant
            fractions = layer_fractions({n: tuple(w.shape) for n, w in weights.items()}, net_sparsity, scope)
            scores = {n: nn.Parameter(self._initial_scores(w, generator)) for n, w in weights.items()}
            ranking = Ranking(scores, net_sparsity, scope)
            target_ranking = None
            for module in (net.module, *net.mask_copies):
                in_target = id(module) in target_ids
                if in_target and target_ranking is None:  # the target's own copy of the scores
                    target_ranking = Ranking({n: nn.Parameter(s.detach().clone()) for n, s in scores.items()},
                                             net_sparsity, scope)
                self._install(module, target_ranking if in_target else ranking, fractions)
            self.rankings[name] = ranking
            opt = self._owner(net.module, weights, owners)
            if opt is None:
                raise UserError(f"--prune {method}: no optimizer trains network {name}")
            opt.add_param_group({"params": list(scores.values())})
            opt.register_step_post_hook(lambda *args, r=ranking: r.invalidate())
        for module_name, module in agent.modules.items():
            if any(parametrize.is_parametrized(m) for m in module.modules()):
                self.modules[module_name] = module

    @staticmethod
    def _owner(module: nn.Module, weights: dict[str, Tensor], owners: dict[int, torch.optim.Optimizer]):
        for n in weights:
            sub, attr = _submodule(module, n)
            original = sub.parametrizations[attr].original
            if id(original) in owners:
                return owners[id(original)]
        return None

    @staticmethod
    def _initial_scores(weight: Tensor, generator: torch.Generator) -> Tensor:
        """The references' score initialisation: Kaiming uniform with a = sqrt(5), U(+-1/sqrt(fan_in))."""
        bound = 1.0 / math.sqrt(_fan_in(weight))
        return (torch.rand(weight.shape, generator=generator) * 2 - 1).mul_(bound).to(weight.device, weight.dtype)

    @torch.no_grad()
    def _install(self, module: nn.Module, ranking: Ranking, fractions: dict[str, float]) -> None:
        for layer in ranking.scores:
            sub, attr = _submodule(module, layer)
            weight = getattr(sub, attr)
            if not self.binary:  # signed Kaiming constant, fan scaled by the kept fraction
                weight.copy_(weight.sign() * math.sqrt(2.0 / (_fan_in(weight) * fractions[layer])))
            weight.requires_grad_(False)
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()
                sub.bias.requires_grad_(False)
            parametrize.register_parametrization(sub, attr, Supermask(ranking, layer, self.binary))

    def masks(self) -> Masks:
        """Each network's current masks (its source's scores; targets lag behind)."""
        return {name: {n: m.clone() for n, m in ranking.masks().items()} for name, ranking in self.rankings.items()}

    @property
    def changes(self) -> int:
        """Updates after which some mask differed from the one before (summed over networks)."""
        return sum(r.changes for r in self.rankings.values())

    def state_dict(self) -> dict:
        return {"modules": {name: m.state_dict() for name, m in self.modules.items()},
                "changes": {name: r.changes for name, r in self.rankings.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        for name, count in state["changes"].items():
            self.rankings[name].masks()
            self.rankings[name].changes = count


@torch.no_grad()
def effective_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` with every parametrized tensor at its effective value under its plain
    name (as a module without parametrizations would have it)."""
    state = module.state_dict()
    for prefix, sub in module.named_modules():
        if not parametrize.is_parametrized(sub):
            continue
        head = f"{prefix}." if prefix else ""
        for attr in sub.parametrizations:
            for key in [k for k in state if k.startswith(f"{head}parametrizations.{attr}.")]:
                del state[key]
            state[f"{head}{attr}"] = getattr(sub, attr).detach().clone()
    return state


def parametrized(modules: Iterable[nn.Module]) -> bool:
    return any(parametrize.is_parametrized(m) for module in modules for m in module.modules())
