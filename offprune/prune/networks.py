"""Algorithm 1 of the paper: score each prunable network on its own loss over ONE batch, then mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from offprune.errors import UserError
from offprune.prune.masks import masks_from_scores
from offprune.prune.scores import PrunableNetwork, prunable_parameters, score_network

METHODS = ("dense", "random", "magnitude", "snip", "grasp", "synflow", "small-dense", "gmp", "set", "rigl", "edge-popup",
           "biprop")
# small-dense: no pruning; the networks are built narrower to the pruned size (offprune.small_dense)
UNMASKED = ("dense", "small-dense")
# learn their masks during training from frozen weights (offprune.supermask)
SUPERMASK_METHODS = ("edge-popup", "biprop")
# train on dense kernels whatever --kernels says: learned masks keep a dense score per weight
DENSE_KERNEL_METHODS = SUPERMASK_METHODS

# Batch sizes of the paper (SNIP 100 samples, GraSP 200); other criteria take SNIP's.
DEFAULT_PRUNE_BATCH = {"snip": 100, "grasp": 200}
# Scoring rounds where the criterion's reference iterates (SynFlow: 100); the others: 1 (single shot).
DEFAULT_PRUNE_ROUNDS = {"synflow": 100}


def default_scope(method: str) -> str:
    """Edge-popup and biprop rank each layer's scores (the references' rule); the others rank a
    network's weights together (the paper)."""
    return "layer" if method in SUPERMASK_METHODS else "global"


def default_prune_rounds(method: str) -> int:
    return DEFAULT_PRUNE_ROUNDS.get(method, 1)


@dataclass(frozen=True)
class ScoreMix:
    """Score transfer (FSTL; the Dreamer pruning slides): a weight is ranked by
    noise * random + omega * source + own, each term divided by its mean |value| over the
    network's prunable weights. The division makes the mix scale-free (SNIP and GraSP scores of
    different networks and runs differ by orders of magnitude) while keeping each term's ranking."""

    source: dict[str, dict[str, Tensor]]  # the source run's scores, per network and weight
    omega: float  # weight of the source's scores
    noise: float = 1.0  # weight of uniform random scores; 0: none

    def mix(self, name: str, own: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        source = self.source.get(name)
        if source is None or set(source) != set(own) or any(source[k].shape != own[k].shape for k in own):
            raise UserError(f"the transferred scores do not fit network {name} (shapes or layer names differ)")
        terms = [(1.0, own), (self.omega, source)]
        if self.noise:  # no draws from the generator when there is no random part
            terms.append((self.noise, {k: torch.rand(s.shape, generator=generator).to(s.device) for k, s in own.items()}))
        out = {k: torch.zeros_like(s, dtype=torch.float32) for k, s in own.items()}
        for weight, term in terms:
            if weight == 0:
                continue
            scale = _mean_abs(term)
            for k in out:
                out[k] += weight * term[k].float().to(out[k].device) / scale
        return out


def _mean_abs(scores: dict[str, Tensor]) -> float:
    finite = torch.cat([s.detach().float().flatten() for s in scores.values()])
    finite = finite[torch.isfinite(finite)].abs()
    mean = float(finite.mean()) if finite.numel() else 0.0
    return mean if mean > 0 else 1.0


def compute_masks(
    networks: dict[str, PrunableNetwork],
    method: str,
    sparsity: float,
    scope: str,
    sample_batch: Callable[[], object],
    generator: torch.Generator,
    sparsity_of: dict[str, float] | None = None,
    rounds: int = 1,
) -> dict[str, dict[str, Tensor]]:
    """Masks per network (True = kept), all scored at initialisation before any mask is applied.

    Each network draws its own batch from `sample_batch()`, as in Algorithm 1. 'dense' keeps all.
    `sparsity_of` sets another sparsity for the networks it names (0 keeps them dense). With
    `rounds` > 1 each network is scored again `rounds` times on the same batch, its weights masked
    by the previous round's mask, the sparsity rising on the exponential schedule
    1 - (1 - s)^(r / rounds) (iterative pruning at initialisation); the weights are restored after.
    """
    return compute_masks_and_scores(networks, method, sparsity, scope, sample_batch, generator, sparsity_of,
                                    rounds)[0]


def compute_masks_and_scores(
    networks: dict[str, PrunableNetwork],
    method: str,
    sparsity: float,
    scope: str,
    sample_batch: Callable[[], object],
    generator: torch.Generator,
    sparsity_of: dict[str, float] | None = None,
    rounds: int = 1,
    mix: ScoreMix | None = None,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]]]:
    """`compute_masks`, and the scores the masks were taken from (the last round's; none for
    networks left dense). With `mix`, each network's scores are mixed with transferred ones first."""
    sparsity_of = sparsity_of or {}
    check_sparsity_of(networks, sparsity_of)
    masks, scores = {}, {}
    for name, net in networks.items():
        net_sparsity = sparsity_of.get(name, sparsity)
        if method in UNMASKED or net_sparsity == 0:
            masks[name] = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(net.module).items()}
            continue
        if method == "synflow" and net.output is None:
            raise UserError(f"synflow needs network {name}'s output on an all-ones input, which it does not give "
                            f"(prune it with another criterion, or keep it dense: --sparsity-of {name}=0)")
        batch = sample_batch()
        masks[name], scores[name] = _scored_masks(method, net, batch, net_sparsity, scope, generator, rounds,
                                                  (lambda s, n=name: mix.mix(n, s, generator)) if mix else None)
    return masks, scores


def round_sparsity(sparsity: float, r: int, rounds: int) -> float:
    """The exponential schedule of iterative pruning: sparsity after round r of `rounds`."""
    return 1.0 - (1.0 - sparsity) ** (r / rounds)


def _scored_masks(method: str, net: PrunableNetwork, batch, sparsity: float, scope: str,
                  generator: torch.Generator, rounds: int, mix=None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    def scored() -> dict[str, Tensor]:
        scores = score_network(method, net, batch, generator)
        return mix(scores) if mix else scores

    if rounds == 1:
        scores = scored()
        return masks_from_scores(scores, sparsity, scope), scores
    params = prunable_parameters(net.module)
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        mask = None
        for r in range(1, rounds + 1):
            scores = scored()
            if mask is not None:  # a weight pruned in an earlier round stays pruned
                scores = {n: s.masked_fill(~mask[n], -float("inf")) for n, s in scores.items()}
            mask = masks_from_scores(scores, round_sparsity(sparsity, r, rounds), scope)
            with torch.no_grad():
                for n, p in params.items():
                    p.mul_(mask[n])
        return mask, scores
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


class MaskSchedule(Protocol):
    """Masks that change during training (gradual pruning, regrowth): the training loop asks after
    every update; None keeps the current masks."""

    def masks_at(self, step: int) -> dict[str, dict[str, Tensor]] | None: ...


def check_transferable(masks: dict[str, dict[str, Tensor]], networks: dict[str, PrunableNetwork], source: str) -> None:
    """One line naming every layer whose mask from `source` does not fit these networks."""
    bad = []
    for name, net in networks.items():
        params = prunable_parameters(net.module)
        theirs = masks.get(name, {})
        for pname, p in params.items():
            m = theirs.get(pname)
            if m is None or tuple(m.shape) != tuple(p.shape):
                bad.append(f"{name}/{pname} {tuple(p.shape)} vs {'missing' if m is None else tuple(m.shape)}")
        bad += [f"{name}/{pname} not in this network" for pname in theirs if pname not in params]
    bad += [f"{name} not a prunable network here" for name in masks if name not in networks]
    if bad:
        raise UserError(f"the masks of {source} do not fit this run's networks: {'; '.join(bad)}")


def check_sparsity_of(networks: dict[str, PrunableNetwork], sparsity_of: dict[str, float]) -> None:
    unknown = sorted(set(sparsity_of) - set(networks))
    if unknown:
        raise UserError(f"--sparsity-of names unknown network(s) {', '.join(unknown)} "
                        f"(this algorithm's prunable networks: {', '.join(networks)})")
