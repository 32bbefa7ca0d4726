"""How fast a pruned agent runs. Training: update throughput of one algorithm (dense unmasked,
dense masked, sparse kernels), measured interleaved in one process so the machine's noise hits
all variants alike. Inference: per-layer latency by kernel, and act() of inference copies
(`offprune storage --latency`)."""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.utils.prune
from torch import nn

from offprune import native
from offprune.algos import ALGOS
from offprune.checkpoint import stored_networks
from offprune.config import RunConfig
from offprune.data import Batch, SequenceBatch
from offprune.native import GATHER_EVENT, SAMPLED_EVENT
from offprune.prune import compute_masks
from offprune.sparse import (SparseLinear, apply_masks, has_sparse_layers, inference_copy, inference_kernel_for,
                             median_seconds, sparse_threads)

VARIANTS = ("dense_unmasked", "dense_masked", "sparse", "dense_reparam")
# dense_masked: offprune's dense training (masked gradients, pruned weights zeroed after each step);
# dense_reparam: torch.nn.utils.prune's way (weight = weight_orig * mask recomputed every forward),
# what most pruning-at-initialisation code bases do; shown for context, not used by offprune.
# sparse_python: the sparse kernels with their Python loops, what sparse training costs where the
# C++ chain loops (offprune.native) cannot be built; measured when they are there.
PYTHON_LOOPS = "sparse_python"


class PythonLoops:
    """A sparse agent whose fused chains run their Python loops (`offprune.native.python_loops`)."""

    def __init__(self, agent):
        self.agent = agent

    @property
    def modules(self) -> dict[str, nn.Module]:
        return self.agent.modules

    def update(self, batch) -> dict[str, float]:
        with native.python_loops():
            return self.agent.update(batch)


def default_variants() -> tuple[str, ...]:
    """VARIANTS, and the Python loops next to 'sparse' when the C++ loops are what 'sparse' uses."""
    return (*VARIANTS, PYTHON_LOOPS) if native.chain_kernels() is not None else VARIANTS


def random_batches(obs_dim: int, act_dim: int, size: int, count: int, seed: int = 0, seq_len: int | None = None
                   ) -> list[Batch] | list[SequenceBatch]:
    """Random transitions ([size, ...]) or, with `seq_len`, random sequences ([size, seq_len, ...])."""
    g = torch.Generator().manual_seed(seed)
    if seq_len is not None:
        shape = (size, seq_len)
        return [SequenceBatch(torch.randn(*shape, obs_dim, generator=g), torch.rand(*shape, act_dim, generator=g) * 2 - 1,
                              torch.randn(*shape, generator=g), torch.randn(*shape, obs_dim, generator=g),
                              torch.zeros(shape), torch.ones(shape))
                for _ in range(count)]
    return [
        Batch(torch.randn(size, obs_dim, generator=g), torch.rand(size, act_dim, generator=g) * 2 - 1,
              torch.randn(size, 1, generator=g), torch.randn(size, obs_dim, generator=g), torch.ones(size, 1))
        for _ in range(count)
    ]


def algo_config(algo: str, profile: str = "quick", options: tuple[tuple[str, str], ...] = ()):
    """The algorithm's Config as a run with this budget profile and these --algo-opt values has it."""
    return RunConfig.from_profile(profile, algo, tuple(options)).algo_config()


def update_batches(algo: str, config, obs_dim: int, act_dim: int, count: int, seed: int = 1):
    """Random batches shaped as this algorithm's updates take them: sequences of `config.seq_len`
    steps for a sequential algorithm (AgentBase.sequential), transitions otherwise."""
    seq_len = config.seq_len if ALGOS[algo].Agent.sequential else None
    return random_batches(obs_dim, act_dim, config.batch_size, count, seed, seq_len)


def build(algo: str, variant: str, sparsity: float, obs_dim: int, act_dim: int, seed: int = 0, config=None):
    """An agent at initialisation: unpruned, or SNIP-pruned with one of the masked variants."""
    if variant == PYTHON_LOOPS:
        return PythonLoops(build(algo, "sparse", sparsity, obs_dim, act_dim, seed, config))
    torch.manual_seed(seed)
    module = ALGOS[algo]
    config = config if config is not None else algo_config(algo)
    agent = module.Agent(obs_dim, act_dim, 1.0, config, torch.device("cpu"))
    if variant == "dense_unmasked":
        return agent
    networks = agent.prunable_networks()
    pruning = update_batches(algo, config, obs_dim, act_dim, 1, seed)[0]
    masks = compute_masks(networks, "snip", sparsity, "global", lambda: pruning, torch.Generator().manual_seed(seed))
    if variant == "dense_reparam":
        for name, net in networks.items():
            for module in (net.module, *net.mask_copies):
                for pname, mask in masks[name].items():
                    owner, _, param = pname.rpartition(".")
                    torch.nn.utils.prune.custom_from_mask(module.get_submodule(owner), param, mask)
        return agent
    apply_masks(networks, masks, agent.optimizers.values(), "sparse" if variant == "sparse" else "dense")
    return agent


def steps_per_second(agent, batches: list[Batch]) -> float:
    start = time.perf_counter()
    for b in batches:
        agent.update(b)
    return len(batches) / (time.perf_counter() - start)


class ChangingMasks:
    """An agent whose masks SET or RigL change every `every` updates (random ERK masks at the
    start): the cost of topology changes (RigL's dense gradient, masks rebuilt, moments moved,
    sparse layers restructured) included."""

    def __init__(self, algo: str, kernels: str, sparsity: float, obs_dim: int, act_dim: int, every: int, config,
                 seed: int = 0, method: str = "set"):
        from offprune.dynamic import DropAndGrow, dense_gradients

        torch.manual_seed(seed)
        self.agent = ALGOS[algo].Agent(obs_dim, act_dim, 1.0, config, torch.device("cpu"))
        networks = self.agent.prunable_networks()
        masks = compute_masks(networks, "random", sparsity, "erk", lambda: None, torch.Generator().manual_seed(seed))
        self.holder = apply_masks(networks, masks, self.agent.optimizers.values(), kernels)
        grow_batch = update_batches(algo, config, obs_dim, act_dim, 1, seed)[0]
        gradients = dense_gradients(lambda: grow_batch) if method == "rigl" else None
        self.schedule = DropAndGrow(networks, masks, seed, end=10**9, every=every, drop_fraction=0.3,
                                    gradients=gradients)
        self.step = 0

    @property
    def modules(self) -> dict[str, nn.Module]:
        return self.agent.modules

    def update(self, batch) -> dict[str, float]:
        info = self.agent.update(batch)
        self.step += 1
        new = self.schedule.masks_at(self.step)
        if new is not None:
            self.holder.set_masks(new)
            self.schedule.changes.clear()
        return info


def measure_changing(algo: str, sparsity: float, every: int, obs_dim: int = 11, act_dim: int = 3, repeats: int = 5,
                     steps: int = 30, config=None) -> dict[str, float]:
    """Median update steps/s of SET- and RigL-changing masks on dense and on sparse kernels,
    interleaved (keys set_dense, set_sparse, rigl_dense, rigl_sparse)."""
    config = config if config is not None else algo_config(algo)
    batches = update_batches(algo, config, obs_dim, act_dim, steps)
    agents = {f"{m}_{k}": ChangingMasks(algo, k, sparsity, obs_dim, act_dim, every, config, method=m)
              for m in ("set", "rigl") for k in ("dense", "sparse")}
    return interleaved_rates(agents, batches, repeats)


def measure_learned(algo: str, sparsity: float, obs_dim: int = 11, act_dim: int = 3, repeats: int = 5,
                    steps: int = 30, config=None) -> dict[str, float]:
    """Median update steps/s of an unpruned agent and of edge-popup and biprop agents (scores over
    frozen weights, per-layer top-k masks after every update, dense kernels), interleaved (keys
    dense_unmasked, edge-popup, biprop)."""
    from offprune.supermask import Supermasks

    config = config if config is not None else algo_config(algo)
    batches = update_batches(algo, config, obs_dim, act_dim, steps)
    agents = {"dense_unmasked": build(algo, "dense_unmasked", sparsity, obs_dim, act_dim, config=config)}
    for method in ("edge-popup", "biprop"):
        agent = build(algo, "dense_unmasked", sparsity, obs_dim, act_dim, config=config)
        Supermasks(method, agent, agent.prunable_networks(), sparsity, "layer", {}, seed=0)
        agents[method] = agent
    return interleaved_rates(agents, batches, repeats)


def interleaved_rates(agents: dict, batches: list, repeats: int,
                      threads: dict[str, int] | None = None) -> dict[str, float]:
    """Median update steps/s of each agent over `repeats` rounds, the agents' rounds interleaved
    so the machine's noise hits them alike (after a warm-up: allocator, optimizer state). Each
    runs on `threads[key]` threads (default: torch's thread count); agents with sparse layers train
    under `sparse_threads`, as a run would."""
    default = torch.get_num_threads()

    def rate(key: str, batches: list) -> float:
        agent, count = agents[key], (threads or {}).get(key, default)
        sparse = any(has_sparse_layers(m) for m in agent.modules.values())
        torch.set_num_threads(count)
        try:
            with sparse_threads(count) if sparse else contextlib.nullcontext():
                return steps_per_second(agent, batches)
        finally:
            torch.set_num_threads(default)
    for key in agents:
        rate(key, batches[:3])
    rounds: dict[str, list[float]] = {key: [] for key in agents}
    for _ in range(repeats):
        for key in agents:
            rounds[key].append(rate(key, batches))
    return {key: statistics.median(r) for key, r in rounds.items()}


def measure_threads(algo: str, sparsity: float, threads: int, obs_dim: int = 11, act_dim: int = 3, repeats: int = 5,
                    steps: int = 30, config=None) -> dict[tuple[str, int], float]:
    """Median update steps/s of dense masked and sparse agents on 1 and on `threads` threads, all
    four interleaved in one process: what more threads gain, free of the drift between runs."""
    config = config if config is not None else algo_config(algo)
    batches = update_batches(algo, config, obs_dim, act_dim, steps)
    agents = {v: build(algo, v, sparsity, obs_dim, act_dim, config=config) for v in ("dense_masked", "sparse")}
    keys = {(v, t): f"{v}@{t}" for v in agents for t in (1, threads)}
    rates = interleaved_rates({key: agents[v] for (v, _), key in keys.items()}, batches, repeats,
                              {key: t for (_, t), key in keys.items()})
    return {pair: rates[key] for pair, key in keys.items()}


def measure(algo: str, sparsity: float, obs_dim: int = 11, act_dim: int = 3, repeats: int = 5, steps: int = 30,
            variants: tuple[str, ...] | None = None, config=None) -> dict[str, float]:
    """Median update steps/s of each variant (default: `default_variants()`) over `repeats`
    interleaved rounds of `steps` updates."""
    variants = variants if variants is not None else default_variants()
    config = config if config is not None else algo_config(algo)
    batches = update_batches(algo, config, obs_dim, act_dim, steps)
    agents = {v: build(algo, v, sparsity, obs_dim, act_dim, config=config) for v in variants}
    return interleaved_rates(agents, batches, repeats)


# --- inference -------------------------------------------------------------------------------

def inference_agent(agent, rows: int, kernels: str = "auto"):
    """A shallow copy of `agent` whose stored networks are inference copies
    (`offprune.sparse.inference_copy`); the agent's own modules are left untouched."""
    fast = copy.copy(agent)
    for name, module in stored_networks(agent).items():
        setattr(fast, name, inference_copy(module, rows, kernels))
    return fast


def layer_latency_table(networks: dict[str, nn.Module], batch_sizes=(1, 10, 100), repeats: int = 50) -> pd.DataFrame:
    """Per network and batch size: milliseconds for one pass through its Linear layers on each
    kernel (dense, csr-addmm, csr), 'auto' (each layer on `inference_kernel_for`'s kernel, what
    inference copies use) and 'best' (the fastest per layer in this measurement)."""
    rows = []
    with torch.inference_mode():
        for name, module in networks.items():
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            for batch in batch_sizes:
                total = {"dense": 0.0, "csr-addmm": 0.0, "csr": 0.0, "auto": 0.0, "best": 0.0}
                for layer in linears:
                    x = torch.randn(batch, layer.in_features)
                    seconds = {"dense": median_seconds(lambda: layer(x), repeats)}
                    for kernel in ("csr-addmm", "csr"):
                        sparse = SparseLinear(layer, layer.weight != 0, kernel).freeze()
                        seconds[kernel] = median_seconds(lambda: sparse(x), repeats)
                    for kernel, s in seconds.items():
                        total[kernel] += s
                    total["auto"] += seconds[inference_kernel_for(layer.weight != 0, batch)]
                    total["best"] += min(seconds.values())
                rows.append({"network": name, "batch": batch, **{f"{k.replace('-', '_')}_ms": 1e3 * v for k, v in total.items()},
                             "speedup_auto": total["dense"] / total["auto"] if total["auto"] else float("nan")})
    return pd.DataFrame(rows)


def act_latencies(agents: dict[str, object], obs_dim: int, rounds: int = 15, calls: int = 100,
                  seed: int = 0) -> dict[str, float]:
    """Median seconds per act(obs) of each agent, over `rounds` rounds of `calls` random
    observations, the agents' rounds interleaved so the machine's noise hits them alike."""
    observations = np.random.default_rng(seed).normal(size=(calls, obs_dim)).astype(np.float32)

    def one_round(agent) -> float:
        start = time.perf_counter()
        for obs in observations:
            agent.act(obs)
        return (time.perf_counter() - start) / calls
    for agent in agents.values():
        one_round(agent)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in agents}
    for _ in range(rounds):
        for name, agent in agents.items():
            seconds[name].append(one_round(agent))
    return {name: statistics.median(s) for name, s in seconds.items()}


# --- where an update's time goes ---------------------------------------------------------------

# Phases of a training update, told apart by torch profiler op names (and, for the CSR gathers, by
# whether they run inside autograd's backward).
BREAKDOWN_PHASES = ("forward gather", "input-grad gather", "weight-grad sampled product", "dense products",
                    "optimizer step", "rest")


SAMPLED_PRODUCTS = ("aten::sparse_sampled_addmm", SAMPLED_EVENT)  # torch's and the compiled one
BACKWARD_EVENT = "autograd::engine::evaluate_function"  # the autograd engine running any backward node


def _is_gather(name: str) -> bool:
    """A CSR product: torch's embedding bag or the compiled one (offprune.native)."""
    return "embedding_bag" in name or name == GATHER_EVENT


def _phase(event, ancestors: list[str]) -> str | None:
    name = event.name
    if name.startswith("Optimizer.step"):
        return "optimizer step"
    if any(a.startswith("Optimizer.step") for a in ancestors):
        return None  # counted with its step
    if _is_gather(name):
        if any(_is_gather(a) for a in ancestors):
            return None  # an inner call of the same gather
        return "input-grad gather" if any(a.startswith(BACKWARD_EVENT) for a in ancestors) else "forward gather"
    if name in SAMPLED_PRODUCTS:
        return "weight-grad sampled product"
    if name in ("aten::addmm", "aten::mm", "aten::bmm") and not any(
            a in ("aten::addmm", "aten::mm", "aten::bmm", *SAMPLED_PRODUCTS) for a in ancestors):
        return "dense products"
    return None


def update_breakdown(agent, batches: list) -> dict[str, float]:
    """Milliseconds per update in each of BREAKDOWN_PHASES, from one profiled pass over `batches`
    (after two warm-up updates). 'rest' is the update's wall time less the named phases: Python,
    autograd's bookkeeping, element-wise ops, losses, and the profiler's own cost."""
    from torch.profiler import ProfilerActivity, profile

    # torch's profiler (kineto) logs its every start and stop on stderr unless told a level when it
    # first starts; 6 keeps it quiet (a level the user set stays)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    for b in batches[:2]:
        agent.update(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for b in batches[2:]:
            agent.update(b)
        wall = time.perf_counter() - start
    updates = len(batches) - 2
    spent = {phase: 0.0 for phase in BREAKDOWN_PHASES}
    for event in prof.events():
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        phase = _phase(event, ancestors)
        if phase is not None:
            spent[phase] += event.cpu_time_total / 1e3  # microseconds -> milliseconds
    spent["rest"] = max(0.0, wall * 1e3 - sum(spent.values()))
    return {phase: ms / updates for phase, ms in spent.items()}
