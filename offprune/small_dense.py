"""The equal-size dense control (Blalock et al. 2020's checklist): instead of pruning a network to
sparsity S, train a dense network whose hidden widths are scaled by one factor per network so it
has as many prunable weights as the pruned one would keep (within 1%)."""

from __future__ import annotations

import dataclasses
import itertools

import torch

from offprune.algos import ALGOS
from offprune.errors import UserError
from offprune.prune import prunable_parameters

TOLERANCE = 0.01  # relative difference allowed between the small network's weights and the target


def _weights(algo: str, config, obs_dim: int, act_dim: int) -> dict[str, int]:
    with torch.random.fork_rng(devices=[]):  # building a probe agent must not move the run's random stream
        agent = ALGOS[algo].Agent(obs_dim, act_dim, 1.0, config, torch.device("cpu"))
    return {name: sum(p.numel() for p in prunable_parameters(net.module).values())
            for name, net in agent.prunable_networks().items()}


def _scaled(config, fields: tuple[str, ...], factor: float):
    return dataclasses.replace(config, **{f: tuple(max(1, round(factor * w)) for w in getattr(config, f)) for f in fields})


def _nudged(algo: str, config, fields: tuple[str, ...], name: str, target: int, obs_dim: int, act_dim: int):
    """The closest count among the widths each one step up, down or unchanged."""
    base = {f: getattr(config, f) for f in fields}
    slots = [(f, i) for f in fields for i in range(len(base[f]))]
    best = None
    for steps in itertools.product((-1, 0, 1), repeat=len(slots)):
        new = {f: list(w) for f, w in base.items()}
        for (f, i), step in zip(slots, steps):
            new[f][i] = max(1, new[f][i] + step)
        candidate = dataclasses.replace(config, **{f: tuple(w) for f, w in new.items()})
        count = _weights(algo, candidate, obs_dim, act_dim)[name]
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (candidate, count)
    return best


def small_dense_config(algo: str, config, sparsity: float, obs_dim: int, act_dim: int):
    """(the algorithm's Config with scaled widths, {network: (weights of the small network, target)})."""
    widths = ALGOS[algo].Agent.widths
    if not widths:
        raise UserError(f"--prune small-dense is not available for {algo} (its Agent declares no widths)")
    full = _weights(algo, config, obs_dim, act_dim)
    counts = {}
    for name, fields in widths.items():
        target = round(full[name] * (1.0 - sparsity))
        lo, hi = 0.0, 1.0
        best = (abs(full[name] - target), 1.0, full[name])
        for _ in range(40):  # bisection on the factor; the count grows with it
            mid = (lo + hi) / 2
            count = _weights(algo, _scaled(config, fields, mid), obs_dim, act_dim)[name]
            best = min(best, (abs(count - target), mid, count))
            lo, hi = (mid, hi) if count < target else (lo, mid)
        _, factor, count = best
        config = _scaled(config, fields, factor)
        if abs(count - target) > TOLERANCE * target:  # one width step is too coarse: vary each layer by 1
            config, count = _nudged(algo, config, fields, name, target, obs_dim, act_dim)
        if abs(count - target) > TOLERANCE * target:
            raise UserError(f"--prune small-dense: no widths give {name} {target} weights within 1% "
                            f"(closest: {count}); choose a lower sparsity")
        counts[name] = (count, target)
    return config, counts
