"""`offprune sweep --plan`: how many runs a sweep still has, and how long they will take here.

Each kind of run (algorithm, kernels, sparsity, evaluation environment) is probed once on this
machine: a few updates of a freshly pruned agent on random batches, a few act() calls, a few
environment steps. A run's estimate is its updates at the probed rate plus its evaluations at
the longest episode length (1,000 steps), so evaluation time is an upper bound: episodes that end
early (a robot that falls) are cheaper.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from dataclasses import dataclass

import numpy as np
import torch

from offprune.algos import ALGOS
from offprune.config import RunConfig
from offprune.data.d4rl import env_from_name
from offprune.dynamic import change_steps, gmp_sparsity
from offprune.envs import make_env
from offprune.prune import DENSE_KERNEL_METHODS, SUPERMASK_METHODS, compute_masks
from offprune.sparse import apply_masks, kernels_by_rule
from offprune.speed import update_batches

MAX_EPISODE_STEPS = 1_000  # gymnasium MuJoCo locomotion time limit


@dataclass(frozen=True)
class Kind:
    algo: str
    # what the run trains with: 'dense', 'sparse' or 'auto' (the rule decides); 'gmp': dense, then
    # sparse once the auto rule picks it; 'edge-popup' / 'biprop': masks learned by scores (dense);
    # 'small-dense': the narrower dense networks of the equal-size control
    kernels: str
    sparsity: float
    env_id: str


@dataclass
class Probe:
    update_s: float  # seconds per update
    act_s: float  # seconds per act() call
    env_step_s: float  # seconds per environment step


def env_id_of(cfg: RunConfig) -> str:
    return cfg.env or env_from_name(cfg.dataset) or "Hopper-v5"


def _agent(cfg: RunConfig, obs_dim: int, act_dim: int) -> tuple[object, str]:
    """A fresh agent pruned as `cfg` would be (SNIP masks stand in for every fixed-mask criterion:
    speed depends on how many weights are kept, not which; edge-popup and biprop are installed as
    they train; small-dense builds its narrower networks), and the kernels its run would use."""
    from offprune.small_dense import small_dense_config
    from offprune.supermask import Supermasks

    config = cfg.algo_config()
    if cfg.prune == "small-dense":
        config, _ = small_dense_config(cfg.algo, config, cfg.sparsity, obs_dim, act_dim)
    torch.manual_seed(0)
    agent = ALGOS[cfg.algo].Agent(obs_dim, act_dim, 1.0, config, torch.device("cpu"))
    if cfg.prune in ("dense", "small-dense"):
        return agent, "dense"
    networks = agent.prunable_networks()
    if cfg.prune in SUPERMASK_METHODS:
        Supermasks(cfg.prune, agent, networks, cfg.sparsity, cfg.scope, dict(cfg.sparsity_of), cfg.seed)
        return agent, "dense"
    batch = update_batches(cfg.algo, config, obs_dim, act_dim, 1)[0]
    masks = compute_masks(networks, "snip", cfg.sparsity, cfg.scope, lambda: batch, torch.Generator().manual_seed(0),
                          dict(cfg.sparsity_of))
    rows = agent.rows_per_update
    kernels = cfg.kernels if cfg.kernels in ("dense", "sparse") else kernels_by_rule(networks, masks, rows)[0]
    kernels = "dense" if cfg.prune in DENSE_KERNEL_METHODS else kernels
    apply_masks(networks, masks, agent.optimizers.values(), kernels)
    return agent, kernels


def kind_of(cfg: RunConfig) -> Kind:
    kernels = "dense"
    if cfg.prune in SUPERMASK_METHODS or cfg.prune == "small-dense":
        kernels = cfg.prune
    elif cfg.prune == "gmp" and cfg.kernels == "auto":
        kernels = "gmp"
    elif cfg.prune in DENSE_KERNEL_METHODS:
        kernels = "dense"
    elif cfg.prune != "dense":
        kernels = "sparse" if cfg.kernels == "sparse" else ("dense" if cfg.kernels == "dense" else "auto")
    return Kind(cfg.algo, kernels, cfg.sparsity, env_id_of(cfg))


def gmp_dense_updates(cfg: RunConfig, obs_dim: int, act_dim: int) -> int:
    """Updates a gmp run under --kernels auto trains on dense kernels: until the first mask change
    at whose sparsity the auto rule picks sparse kernels (the rule asked, as in training, of
    magnitude masks; here of the initial weights')."""
    torch.manual_seed(0)
    agent = ALGOS[cfg.algo].Agent(obs_dim, act_dim, 1.0, cfg.algo_config(), torch.device("cpu"))
    networks = agent.prunable_networks()
    start, end = cfg.schedule_window
    for step in change_steps(cfg.steps, start, end, cfg.prune_every):
        overrides = {name: gmp_sparsity(step, s, start, end) for name, s in cfg.sparsity_of}
        masks = compute_masks(networks, "magnitude", gmp_sparsity(step, cfg.sparsity, start, end), cfg.scope,
                              lambda: None, torch.Generator().manual_seed(0), overrides)
        if kernels_by_rule(networks, masks, agent.rows_per_update)[0] == "sparse":
            return step
    return cfg.steps


def probe(cfg: RunConfig, updates: int = 8, acts: int = 50) -> tuple[Probe, str]:
    """Time this run's kind here; returns the probe and the kernels it would train with. A gmp run
    under auto is timed dense and sparse (at its final masks), its update time the mix of the two
    over the updates it spends on each."""
    if kind_of(cfg).kernels == "gmp":
        dense, _ = probe(dataclasses.replace(cfg, prune="dense", sparsity=0.0, sparsity_of=()), updates, acts)
        sparse, kernels = probe(dataclasses.replace(cfg, prune="snip"), updates, acts)
        if kernels == "dense":
            return dense, "dense"
        env = make_env(env_id_of(cfg))
        dense_share = gmp_dense_updates(cfg, env.observation_space.shape[0], env.action_space.shape[0]) / cfg.steps
        env.close()
        return Probe(dense_share * dense.update_s + (1 - dense_share) * sparse.update_s, sparse.act_s,
                     sparse.env_step_s), "gmp"
    env = make_env(env_id_of(cfg))
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or 1)
    try:
        with torch.random.fork_rng(devices=[]):
            agent, kernels = _agent(cfg, obs_dim, act_dim)
            batches = update_batches(cfg.algo, cfg.algo_config(), obs_dim, act_dim, updates + 2)
            for b in batches[:2]:  # warm-up
                agent.update(b)
            start = time.perf_counter()
            for b in batches[2:]:
                agent.update(b)
            update_s = (time.perf_counter() - start) / updates
            obs = np.zeros(obs_dim, np.float32)
            agent.reset()
            for _ in range(5):  # warm-up: the first calls allocate
                agent.act(obs)
            start = time.perf_counter()
            for _ in range(acts):
                agent.act(obs)
            act_s = (time.perf_counter() - start) / acts
    finally:
        torch.set_num_threads(threads)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(200):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    env_step_s = (time.perf_counter() - start) / 200
    env.close()
    return Probe(update_s, act_s, env_step_s), kernels


def run_seconds(cfg: RunConfig, p: Probe, start_step: int = 0) -> float:
    """Estimated wall time of a run (from `start_step`): updates plus evaluations at full length."""
    evaluations = len([s for s in range(start_step + 1, cfg.steps + 1) if s % cfg.eval_every == 0 or s == cfg.steps])
    per_evaluation = cfg.eval_episodes * MAX_EPISODE_STEPS * (p.act_s + p.env_step_s)
    return (cfg.steps - start_step) * p.update_s + evaluations * per_evaluation


def wall_seconds(durations: list[float], jobs: int) -> float:
    """Wall time of running `durations` in order on `jobs` workers (each takes the next run when free)."""
    workers = [0.0] * max(1, min(jobs, len(durations)))
    for d in durations:
        heapq.heappush(workers, heapq.heappop(workers) + d)
    return max(workers) if durations else 0.0


def plan(runs: list[RunConfig], done: set[str], jobs: int, log=print,
         started: dict[str, int] | None = None) -> list[str]:
    """Lines of the plan: runs per kind with their probed time, totals, wall time for `jobs`.
    `started`: updates already trained by interrupted runs (they continue from there)."""
    started = started or {}
    todo = [cfg for cfg in runs if cfg.name not in done]
    continuing = sum(1 for cfg in todo if started.get(cfg.name, 0) > 0)
    lines = [f"{len(runs)} runs in the sweep: {len(runs) - len(todo)} done, {len(todo)} to run "
             f"({jobs} at a time)" + (f", {continuing} of them continuing from a checkpoint" if continuing else "")]
    if not todo:
        return lines
    probes: dict[Kind, tuple[Probe, str]] = {}
    for cfg in todo:
        kind = kind_of(cfg)
        if kind not in probes:
            log(f"probing {cfg.algo} {'dense' if cfg.prune == 'dense' else f'{cfg.sparsity:g}'} on {kind.env_id} ...")
            probes[kind] = probe(cfg)
    durations = [run_seconds(cfg, probes[kind_of(cfg)][0], started.get(cfg.name, 0)) for cfg in todo]
    lines.append(f"{'algo':<8} {'sparsity':>8} {'kernels':>10} {'env':<16} {'runs':>5} {'updates/s':>9} "
                 f"{'min/run':>8} {'min total':>9}")
    for kind, (p, kernels) in probes.items():
        of_kind = [d for cfg, d in zip(todo, durations) if kind_of(cfg) == kind]
        # edge-popup, biprop: dense + scores; small-dense: narrower dense networks
        shown = kind.kernels if kind.kernels in (*SUPERMASK_METHODS, "small-dense") else kernels
        lines.append(f"{kind.algo:<8} {kind.sparsity:>8g} {shown:>10} {kind.env_id:<16} {len(of_kind):>5} "
                     f"{1 / p.update_s:>9.1f} {np.mean(of_kind) / 60:>8.1f} {sum(of_kind) / 60:>9.1f}")
    total = sum(durations)
    lines.append(f"total {total / 3600:.2f} h of run time; wall time with --jobs {jobs}: "
                 f"~{wall_seconds(durations, jobs) / 3600:.2f} h (evaluations counted at the full "
                 f"{MAX_EPISODE_STEPS} steps per episode: an upper bound)")
    return lines
