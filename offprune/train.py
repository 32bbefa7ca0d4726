"""The generic loop: load data -> prune at initialisation -> train with frozen masks -> evaluate ->
checkpoint -> one results row per evaluation. It knows no algorithm by name.

A run lives in OUT/RUN_ID/: config.json, masks.pt, checkpoint.pt (written at every evaluation, so
an interrupted run loses at most `eval_every` updates), results.parquet and layers.parquet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import offprune
from offprune.algos import ALGOS
from offprune.config import RunConfig
from offprune.data import TransitionSampler, load_dataset
from offprune.data.d4rl import OfflineDataset
from offprune.envs import env_versions, make_env
from offprune.errors import UserError
from offprune.evaluate import returns_of, rollouts, summarize
from offprune.prune import check_sparsity_of, compute_masks, layer_densities, realised_sparsity
from offprune.results import LAYERS_FILE, RESULTS_FILE, append_rows, write_parquet_atomic
from offprune.sparse import apply_masks, choose_kernels, kernels_by_rule

CHECKPOINT_FILE = "checkpoint.pt"
MASKS_FILE = "masks.pt"
CONFIG_FILE = "config.json"


@dataclass
class RunResult:
    run_dir: Path
    rows: pd.DataFrame  # every results row of the run so far
    layers: pd.DataFrame  # per-layer kept counts


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but torch sees no CUDA GPU (use --device cpu)")
    return device


def prepare_run_dir(cfg: RunConfig, resume: bool) -> Path:
    """Create OUT/RUN_ID, refuse to clobber an existing run, check a resumed run's config."""
    run_dir = Path(cfg.out) / cfg.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"results folder {cfg.out} is not writable ({e.strerror or e})") from None
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():
        if not resume:
            raise UserError(
                f"run '{cfg.name}' already exists in {cfg.out}/; pass --resume to continue it "
                f"or --run-id NAME to start another"
            )
        saved = json.loads(config_path.read_text())
        diff = cfg.differences(saved)
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in diff)
            raise UserError(f"cannot resume '{cfg.name}': its config differs ({detail})")
    tmp = config_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
    os.replace(tmp, config_path)
    return run_dir


def save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_env_matches(dataset: OfflineDataset, env) -> float:
    """The evaluation env must take the dataset's observations and actions. Returns max |action|."""
    obs_dim = env.observation_space.shape[0]
    act_dim = env.action_space.shape[0]
    if (obs_dim, act_dim) != (dataset.obs_dim, dataset.act_dim):
        raise UserError(
            f"dataset {dataset.name} has {dataset.obs_dim}-dim observations and {dataset.act_dim}-dim actions "
            f"but {dataset.env_id} has {obs_dim} and {act_dim}; pass --env with the matching environment"
        )
    return float(np.max(np.abs(env.action_space.high)))


def run(cfg: RunConfig, resume: bool = False, log: Callable[[str], None] | None = None) -> RunResult:
    """Train one agent as configured; with `resume`, continue from the run's checkpoint."""
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    dataset = load_dataset(cfg.dataset, env_id=cfg.env)
    if not dataset.env_id:
        raise UserError(f"cannot tell which environment {dataset.name} comes from; pass --env (e.g. Hopper-v5)")
    env = make_env(dataset.env_id)
    max_action = check_env_matches(dataset, env)

    algo = ALGOS[cfg.algo]
    algo_config = cfg.algo_config()
    seed_everything(cfg.seed)
    agent = algo.Agent(dataset.obs_dim, dataset.act_dim, max_action, algo_config, device)
    if hasattr(agent, "prepare"):  # e.g. observation statistics
        agent.prepare(dataset)
    if hasattr(algo, "make_sampler"):  # e.g. sequences instead of transitions
        sampler = algo.make_sampler(dataset, algo_config, device, cfg.seed)
    else:
        sampler = TransitionSampler(dataset, device, cfg.seed)
    networks = agent.prunable_networks()
    sparsity_of = dict(cfg.sparsity_of)
    check_sparsity_of(networks, sparsity_of)
    run_dir = prepare_run_dir(cfg, resume)

    checkpoint_path = run_dir / CHECKPOINT_FILE
    start_step, train_seconds = 0, 0.0
    kernel_estimate = kernel_speedup = float("nan")
    ckpt = None
    if resume and checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location=device, weights_only=False)
        masks, kernels = ckpt["masks"], ckpt.get("kernels", "dense")
        kernel_speedup = ckpt.get("kernel_speedup", kernel_speedup)
        kernel_estimate = ckpt.get("kernel_estimate", kernel_estimate)
    else:
        generator = torch.Generator().manual_seed(cfg.seed)
        masks = compute_masks(
            networks,
            cfg.prune,
            cfg.sparsity,
            cfg.scope,
            lambda: sampler.sample(cfg.pruning_batch_size),
            generator,
            sparsity_of,
        )
        save_atomic(masks, run_dir / MASKS_FILE)
        # rows a layer sees per update: sequence algorithms run each layer on batch x seq_len
        rows = algo_config.batch_size * getattr(algo_config, "seq_len", 1)
        kernels, kernel_estimate, kernel_speedup = resolve_kernels(cfg, networks, masks, rows, log)
    if kernels == "sparse" and cfg.threads is None:
        torch.set_num_threads(1)  # sparse kernels run fastest single-threaded on small CPUs
    layer_kernels = apply_masks(networks, masks, agent.optimizers.values(), kernels)
    if ckpt is not None:
        for name, module in agent.modules.items():
            module.load_state_dict(ckpt["modules"][name])
        for name, opt in agent.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_step, train_seconds = ckpt["step"], ckpt["train_seconds"]
        log(f"resuming {cfg.name} from step {start_step}")

    identity = {
        "run_id": cfg.name,
        "algo": cfg.algo,
        "dataset": dataset.name,
        "env_id": dataset.env_id,
        "prune": cfg.prune,
        "scope": cfg.scope,
        "target_sparsity": float(cfg.sparsity),
        "sparsity_overrides": ",".join(f"{net}={value:g}" for net, value in cfg.sparsity_of),
        "seed": cfg.seed,
    }
    layers = pd.DataFrame(
        [{**identity, "network": d.network, "layer": d.layer, "total": d.total, "kept": d.kept, "density": d.density,
          "kernel": layer_kernels[d.network][d.layer]}
         for d in layer_densities(masks)]
    )
    write_parquet_atomic(layers, run_dir / LAYERS_FILE)
    for row in layers.itertuples():
        if row.kept == 0:
            log(f"warning: layer collapse: {row.network} {row.layer} keeps 0 of {row.total} weights")
    all_masks = {f"{net}/{layer}": m for net, layer_masks in masks.items() for layer, m in layer_masks.items()}
    sparsity_cols = {f"sparsity_{net}": realised_sparsity(m) for net, m in masks.items()}
    static = {
        **identity,
        "realised_sparsity": realised_sparsity(all_masks),
        **sparsity_cols,
        "kept_weights": int(sum(int(m.sum()) for m in all_masks.values())),
        "prunable_weights": int(sum(m.numel() for m in all_masks.values())),
        "prune_batch": cfg.pruning_batch_size if cfg.prune != "dense" else 0,
        "kernels": kernels,
        "kernels_requested": cfg.kernels,
        "sparse_kernel_speedup_estimated": kernel_estimate,
        "sparse_kernel_speedup_measured": kernel_speedup,
        "dataset_transitions": len(dataset),
        "algo_options": ",".join(f"{k}={v}" for k, v in cfg.algo_options),
        "d4rl_refs_approximate": dataset.env_id.endswith("-v5"),
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "offprune_version": offprune.__version__,
        "torch_version": torch.__version__,
        **{f"{k}_version": v for k, v in env_versions().items()},
    }

    results_path = run_dir / RESULTS_FILE
    eval_seed = 1_000_000 + 1_000 * cfg.seed  # disjoint from the seeds used to generate data
    losses: dict[str, list[float]] = defaultdict(list)
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(
        total=cfg.steps, initial=start_step, desc=cfg.name, unit="step", disable=_progress_off(cfg), dynamic_ncols=True
    )
    for step in range(start_step + 1, cfg.steps + 1):
        info = agent.update(sampler.sample(algo_config.batch_size))
        diverged = [k for k, v in info.items() if not math.isfinite(v)]
        if diverged:  # stop before a bad state is checkpointed; the last good checkpoint stays
            bar.close()
            last_good = step - window_steps - 1
            kept = f"results and checkpoint up to step {last_good} are kept" if last_good else "no checkpoint yet"
            raise UserError(f"training diverged at step {step}: {', '.join(diverged)} not finite; {kept} in {run_dir}")
        for k, v in info.items():
            losses[k].append(v)
        window_steps += 1
        bar.update(1)
        if step % cfg.eval_every and step != cfg.steps:
            continue
        mean_losses = {f"loss_{k}": float(np.mean(v)) for k, v in losses.items()}
        elapsed = time.perf_counter() - window_start
        train_seconds += elapsed
        eval_start = time.perf_counter()
        episode_rewards = rollouts(agent.act, env, cfg.eval_episodes, eval_seed, getattr(agent, "reset", None))
        returns = returns_of(episode_rewards)
        # algorithm-specific measurements, e.g. a world model's prediction errors
        extra = agent.evaluation_metrics(sampler, episode_rewards) if hasattr(agent, "evaluation_metrics") else {}
        row = {
            **static,
            "step": step,
            **summarize(returns, dataset.env_id),
            "eval_episodes": cfg.eval_episodes,
            **mean_losses,
            **extra,
            "steps_per_s": window_steps / elapsed if elapsed > 0 else float("nan"),
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - eval_start,
            "timestamp": pd.Timestamp.now(tz="UTC"),
        }
        append_rows(results_path, [row])
        save_atomic(
            {
                "step": step,
                "train_seconds": train_seconds,
                "modules": {n: m.state_dict() for n, m in agent.modules.items()},
                "optimizers": {n: o.state_dict() for n, o in agent.optimizers.items()},
                "sampler": sampler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "masks": masks,
                "kernels": kernels,
                "kernel_speedup": kernel_speedup,
                "kernel_estimate": kernel_estimate,
                "config": cfg.to_dict(),
                # what rebuilds the agent without the dataset (storage, export)
                "agent": {
                    "algo": cfg.algo,
                    "obs_dim": dataset.obs_dim,
                    "act_dim": dataset.act_dim,
                    "max_action": max_action,
                    "config": dataclasses.asdict(algo_config),
                },
            },
            checkpoint_path,
        )
        bar.set_postfix(score=f"{row['normalized_score']:.1f}", refresh=False)
        losses.clear()
        window_start, window_steps = time.perf_counter(), 0
    bar.close()
    env.close()
    rows = pd.read_parquet(results_path) if results_path.exists() else pd.DataFrame()
    return RunResult(run_dir, rows, layers)


def resolve_kernels(cfg: RunConfig, networks, masks, rows: int, log) -> tuple[str, float, float]:
    """'dense' or 'sparse' for this run; the rule's estimated sparse/dense speed ratio; and the
    measured one (NaN unless --kernels measure). Only 'measure' depends on timing."""
    nan = float("nan")
    if cfg.prune == "dense":
        return "dense", nan, nan
    rule_choice, estimate = kernels_by_rule(networks, masks, rows)
    if cfg.kernels in ("dense", "sparse"):
        return cfg.kernels, estimate, nan
    if cfg.kernels == "auto":
        log(f"kernels auto: sparse layers estimated {estimate:.2f}x dense -> {rule_choice}")
        return rule_choice, estimate, nan
    threads = torch.get_num_threads()
    if cfg.threads is None:
        torch.set_num_threads(1)  # measure as a sparse run would train
    choice, ratio = choose_kernels(networks, masks, rows)
    torch.set_num_threads(threads)
    log(f"kernels measure: sparse layers measured {ratio:.2f}x dense -> {choice}")
    return choice, estimate, ratio


def _progress_off(cfg: RunConfig) -> bool | None:
    # tqdm's None means: show the bar only on a terminal.
    return None if cfg.progress is None else not cfg.progress
