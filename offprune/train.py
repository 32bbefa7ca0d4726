"""The generic loop: load data -> prune at initialisation -> train with frozen masks -> evaluate ->
checkpoint -> one results row per evaluation. It knows no algorithm by name.

A run lives in OUT/RUN_ID/ (offprune.checkpoint names its files). The checkpoint is written at
every evaluation (an interrupted run loses at most `eval_every` updates) and before the results
row it describes, which it also carries, so a crash between the two loses no row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
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
from offprune import atomic, checkpoint
from offprune.algos import ALGOS
from offprune.algos.base import copy_sources_to_targets
from offprune.config import SCHEDULE_FIELDS, SCHEDULE_OPTIONS, RunConfig
from offprune.data import load_dataset
from offprune.data.d4rl import OfflineDataset
from offprune.envs import cpu_model, env_versions, make_env
from offprune.errors import UserError
from offprune.evaluate import returns_of, rollouts, summarize
from offprune.prune import (DENSE_KERNEL_METHODS, SUPERMASK_METHODS, UNMASKED, ScoreMix, check_sparsity_of, check_transferable, compute_masks_and_scores,
                            layer_densities,
                            realised_sparsity, shuffle_within_layers)
from offprune.dynamic import DYNAMIC_METHODS, DropAndGrow, GradualMagnitude, Schedule, change_rows, dense_gradients
from offprune.small_dense import small_dense_config
from offprune.results import LAYERS_FILE, RESULTS_FILE, append_rows, read_parquet, read_rows, write_parquet_atomic
from offprune.prune import MaskSchedule
from offprune.sparse import MaskHolder, apply_masks, choose_kernels, kernels_by_rule, sparse_threads
from offprune.supermask import Supermasks

# file names of a run folder (kept here too: tools import them from train)
CHECKPOINT_FILE, MASKS_FILE, CONFIG_FILE = checkpoint.CHECKPOINT_FILE, checkpoint.MASKS_FILE, checkpoint.CONFIG_FILE
CHANGES_FILE = checkpoint.CHANGES_FILE


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
    """Create OUT/RUN_ID, refuse to clobber an existing run, check a resumed run's config.
    Writes nothing else: config.json is written once the run has started or resumed cleanly."""
    run_dir = Path(cfg.out) / cfg.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / f".write-test-{id(cfg)}", "", fsync=False).unlink()
    except (OSError, atomic.WriteError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e).rpartition(": ")[2]
        raise UserError(f"results folder {cfg.out} is not writable ({reason})") from None
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():
        if not resume:
            raise UserError(
                f"run '{cfg.name}' already exists in {cfg.out}/; pass --resume to continue it "
                f"or --run-id NAME to start another"
            )
        try:
            saved = json.loads(config_path.read_text())
        except ValueError:
            raise UserError(f"{config_path} is not valid JSON; delete it to let --resume rewrite it") from None
        diff = cfg.differences(saved)
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in diff)
            raise UserError(f"cannot resume '{cfg.name}': its config differs ({detail})")
    return run_dir


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


@dataclass
class Setup:
    """What a run is built from: data, evaluation env, agent, its sampler and prunable networks."""

    dataset: OfflineDataset
    env: object
    max_action: float
    algo_config: object
    agent: object
    sampler: object
    networks: dict


@dataclass
class Progress:
    """Where training stands: restored from a checkpoint or fresh."""

    masks: dict
    kernels: str
    kernel_estimate: float
    kernel_speedup: float
    step: int = 0
    train_seconds: float = 0.0


def run(cfg: RunConfig, resume: bool = False, log: Callable[[str], None] | None = None,
        wait_for_lock: bool = False) -> RunResult:
    """Train one agent as configured; with `resume`, continue from the run's checkpoint.

    Steps: build data, agent and sampler; take the run's lock; restore the checkpoint or prune
    at initialisation and choose kernels; apply the masks (and restore weights and optimizers);
    write config.json, layers.parquet and the static result columns; then train, evaluating and
    checkpointing every `eval_every` updates, the results row written after its checkpoint."""
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup = build_setup(cfg, device)
    run_dir = prepare_run_dir(cfg, resume)
    with checkpoint.locked(run_dir, wait=wait_for_lock):
        ckpt = checkpoint.load(run_dir, device, log) if resume else None
        if resume and ckpt is None:
            log(f"{cfg.name}: no checkpoint in {run_dir} to resume from; starting at step 0")
        progress = restore(ckpt, cfg, setup, run_dir, log) if ckpt else start(cfg, setup, run_dir, log)
        dense_layout = ckpt is not None and ckpt.get("layout") == checkpoint.LAYOUT
        if dense_layout:  # weights before the kernels: a sparse conversion reads them
            load_module_states(ckpt, setup)
        learned = cfg.prune in SUPERMASK_METHODS  # masks learned by scores: nothing for the enforcer to hold
        enforced = {n: {k: torch.ones_like(m) for k, m in layers.items()} for n, layers in progress.masks.items()} \
            if learned else progress.masks
        holder = apply_masks(setup.networks, enforced, setup.agent.optimizers.values(), progress.kernels)
        if cfg.kernels == "auto" and progress.kernels == "dense" and cfg.prune in DYNAMIC_METHODS:
            holder.rule_rows = setup.agent.rows_per_update  # gmp: sparse kernels once the masks are sparse enough
        supermasks = install_supermasks(cfg, setup, ckpt, progress, run_dir) if learned else None
        if ckpt:
            if not dense_layout:  # a checkpoint written before the dense layout: in the kernels' own
                load_module_states(ckpt, setup)
            load_training_state(ckpt, setup, dense_layout)
            log(f"resuming {cfg.name} from step {progress.step}")
        atomic.write_json(run_dir / CONFIG_FILE, cfg.to_dict())  # the run is known to start cleanly now
        layers = write_layers(cfg, setup, progress.masks, holder.kernels, run_dir, log)
        static = static_columns(cfg, setup, progress, device)
        sparse_capable = progress.kernels == "sparse" or bool(holder.rule_rows)  # sparse now or may turn sparse
        if sparse_capable:
            static["torch_threads"] = training_threads(cfg, "sparse")
        with sparse_threads(static["torch_threads"]) if sparse_capable else contextlib.nullcontext():
            train_loop(cfg, setup, progress, holder, supermasks, static, run_dir, log)
    setup.env.close()
    results_path = run_dir / RESULTS_FILE
    rows = read_parquet(results_path) if results_path.exists() else pd.DataFrame()
    return RunResult(run_dir, rows, layers)


def training_threads(cfg: RunConfig, kernels: str) -> int:
    """The threads a run trains on: --threads, else torch's default, else 1 with sparse kernels
    (which share only their widest products out: offprune.sparse.sparse_threads)."""
    return cfg.threads or (1 if kernels == "sparse" else torch.get_num_threads())


def check_network_names(cfg: RunConfig) -> None:
    """--sparsity-of's names against the algorithm's prunable networks, which do not depend on the
    data: a mistake fails before a dataset is loaded or generated."""
    if cfg.sparsity_of:
        agent = ALGOS[cfg.algo].Agent(1, 1, 1.0, cfg.algo_config(), torch.device("cpu"))
        check_sparsity_of(agent.prunable_networks(), dict(cfg.sparsity_of))


def build_setup(cfg: RunConfig, device: torch.device) -> Setup:
    check_network_names(cfg)
    algo = ALGOS[cfg.algo]
    algo_config = cfg.algo_config()
    dataset = load_dataset(cfg.dataset, env_id=cfg.env)
    if not dataset.env_id:
        raise UserError(f"cannot tell which environment {dataset.name} comes from; pass --env (e.g. Hopper-v5)")
    env = make_env(dataset.env_id)
    max_action = check_env_matches(dataset, env)
    if cfg.prune == "small-dense":  # the equal-size dense control: narrower networks, no masks
        algo_config, _ = small_dense_config(cfg.algo, algo_config, cfg.sparsity, dataset.obs_dim, dataset.act_dim)
    seed_everything(cfg.seed)
    agent = algo.Agent(dataset.obs_dim, dataset.act_dim, max_action, algo_config, device)
    agent.prepare(dataset)
    sampler = algo.Agent.make_sampler(dataset, algo_config, device, cfg.seed)
    networks = agent.prunable_networks()
    return Setup(dataset, env, max_action, algo_config, agent, sampler, networks)


def start(cfg: RunConfig, setup: Setup, run_dir: Path, log) -> Progress:
    """Prune at initialisation (one batch per network) and choose the kernels."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.weight_transfer:
        transfer_weights(cfg, setup)
    if cfg.masks_from:
        masks = transferred_masks(cfg, setup)
    else:
        mix = ScoreMix(source_scores(cfg.score_transfer, log), cfg.omega, cfg.transfer_noise) \
            if cfg.score_transfer else None
        # where the methods that change masks in training start (edge-popup, biprop: offprune.supermask)
        method = {"gmp": "dense", "set": "random", "rigl": "random", "edge-popup": "dense",
                  "biprop": "dense"}.get(cfg.prune, cfg.prune)
        masks, scores = compute_masks_and_scores(
            setup.networks, method, cfg.sparsity, cfg.scope, lambda: setup.sampler.sample(cfg.pruning_batch_size),
            generator, dict(cfg.sparsity_of), cfg.prune_rounds, mix)
        if scores:
            atomic.torch_save(scores, run_dir / checkpoint.SCORES_FILE)
    if cfg.mask_transform == "shuffle":
        masks = {net: shuffle_within_layers(layer_masks, generator) for net, layer_masks in masks.items()}
    if cfg.reinit:
        reinitialize(setup)
    atomic.torch_save(masks, run_dir / MASKS_FILE)
    kernels, estimate, measured = resolve_kernels(cfg, setup.networks, masks, setup.agent.rows_per_update, log)
    return Progress(masks, kernels, estimate, measured)


def source_scores(run_dir: str, log) -> dict:
    """A source run's pruning scores for --score-transfer. A run made before offprune kept
    scores.pt has them recomputed from its config (pruning is a pure function of the config),
    checked against the masks it trained with, and saved to its folder."""
    path = Path(run_dir) / checkpoint.SCORES_FILE
    config_path = Path(run_dir) / CONFIG_FILE
    if path.is_file() or not config_path.is_file():
        return checkpoint.load_scores(run_dir)  # or its one-line error
    source = checkpoint.config_from_dict(RunConfig, json.loads(config_path.read_text()))
    if source.prune in (*UNMASKED, *DYNAMIC_METHODS, *SUPERMASK_METHODS) or source.masks_from or source.score_transfer \
            or source.weight_transfer or source.reinit or source.mask_transform != "none":
        return checkpoint.load_scores(run_dir)  # not pruned by a criterion at initialisation: no scores to redo
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # this run's own random state stays as it was
        setup = build_setup(source, torch.device("cpu"))
        setup.env.close()
        masks, scores = compute_masks_and_scores(
            setup.networks, source.prune, source.sparsity, source.scope,
            lambda: setup.sampler.sample(source.pruning_batch_size), torch.Generator().manual_seed(source.seed),
            dict(source.sparsity_of), source.prune_rounds)
    random.setstate(states[0])
    np.random.set_state(states[1])
    kept = checkpoint.load_masks(run_dir)
    if any(not torch.equal(masks[n][k].cpu(), kept[n][k].cpu()) for n in kept for k in kept[n]):
        raise UserError(f"{run_dir} has no {checkpoint.SCORES_FILE}, and pruning again from its config does not give "
                        "its masks (made by another offprune version?): rerun it to transfer its scores")
    atomic.torch_save(scores, path)
    log(f"recomputed the scores of {run_dir} from its config (its masks match) and saved {path}")
    return scores


@torch.no_grad()
def transfer_weights(cfg: RunConfig, setup: Setup) -> None:
    """--weight-transfer (FTL, Sasso et al. 2021): initial weights = fresh ones + omega x the source
    run's trained weights, in every network the agent stores; targets copied from their sources."""
    source, _ = checkpoint.load_run(cfg.weight_transfer)
    theirs = checkpoint.stored_networks(source)
    for name, module in checkpoint.stored_networks(setup.agent).items():
        params = dict(theirs[name].named_parameters()) if name in theirs else {}
        mismatched = [n for n, p in module.named_parameters() if n not in params or params[n].shape != p.shape]
        if mismatched:
            raise UserError(f"--weight-transfer: the weights of {cfg.weight_transfer} do not fit network {name} "
                            f"({', '.join(mismatched[:6])})")
        for n, p in module.named_parameters():
            p.add_(params[n].to(p.device), alpha=cfg.omega)
    copy_sources_to_targets(setup.agent)


def transferred_masks(cfg: RunConfig, setup: Setup) -> dict:
    """--masks-from: another run's masks, checked against these networks and this sparsity."""
    masks = checkpoint.load_masks(cfg.masks_from)
    check_transferable(masks, setup.networks, cfg.masks_from)
    for name, layer_masks in masks.items():
        realised, wanted = realised_sparsity(layer_masks), dict(cfg.sparsity_of).get(name, cfg.sparsity)
        if abs(realised - wanted) > 1e-3:
            raise UserError(f"the masks of {cfg.masks_from} keep network {name} at sparsity {realised:.4f}, not "
                            f"{wanted:g}; pass the source's --sparsity")
    return masks


def reinitialize(setup: Setup) -> None:
    """--reinit: every layer of the prunable networks (and of their mask copies) is re-drawn from
    its initialiser after the masks are computed; targets are copied from their sources again."""
    for net in setup.networks.values():
        for module in (net.module, *net.mask_copies):
            for layer in module.modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.GRUCell, torch.nn.GRU)):
                    layer.reset_parameters()
    copy_sources_to_targets(setup.agent)


def install_supermasks(cfg: RunConfig, setup: Setup, ckpt: dict | None, progress: Progress,
                       run_dir: Path) -> Supermasks:
    """Edge-popup or biprop on the prunable networks; a resumed run's frozen weights and scores
    come from its checkpoint, a new run's initial masks go to masks.pt."""
    supermasks = Supermasks(cfg.prune, setup.agent, setup.networks, cfg.sparsity, cfg.scope, dict(cfg.sparsity_of),
                            cfg.seed)
    if ckpt:
        supermasks.load_state_dict(ckpt["supermask"])
    progress.masks = {**progress.masks, **supermasks.masks()}  # networks kept dense stay all-ones
    if not ckpt:
        atomic.torch_save(progress.masks, run_dir / MASKS_FILE)
    return supermasks


def restore(ckpt: dict, cfg: RunConfig, setup: Setup, run_dir: Path, log) -> Progress:
    """The checkpoint's masks, kernels and position; a results row it carries but the results
    file lacks (a crash between the two writes) is written now."""
    nan = float("nan")
    if cfg.prune in DYNAMIC_METHODS and ckpt.get("config", {}).get("steps", cfg.steps) != cfg.steps:
        raise UserError(f"{cfg.name} changes its masks on a schedule set by its number of updates "
                        f"({ckpt['config']['steps']}); it cannot be extended to {cfg.steps}: start a new run")
    pending = ckpt.get("row")
    if pending is not None:
        results_path = run_dir / RESULTS_FILE
        have = read_rows(results_path, columns=["step"])
        if have is None or pending["step"] not in set(have.step):
            append_rows(results_path, [pending])
            log(f"wrote the results row of step {pending['step']} that an interruption had kept from the file")
    return Progress(ckpt["masks"], ckpt.get("kernels", "dense"), ckpt.get("kernel_estimate", nan),
                    ckpt.get("kernel_speedup", nan), ckpt["step"], ckpt["train_seconds"])


def load_module_states(ckpt: dict, setup: Setup) -> None:
    for name, module in setup.agent.modules.items():
        module.load_state_dict(ckpt["modules"][name])


def load_training_state(ckpt: dict, setup: Setup, dense_layout: bool) -> None:
    """Optimizers, sampler and random state (the modules are loaded by then)."""
    if dense_layout:
        checkpoint.load_optimizer_states(setup.agent, ckpt["optimizers"])
    else:
        for name, opt in setup.agent.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
    setup.sampler.load_state_dict(ckpt["sampler"])
    torch.set_rng_state(ckpt["torch_rng"])


def identity_columns(cfg: RunConfig, dataset: OfflineDataset) -> dict:
    return {
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


def write_layers(cfg: RunConfig, setup: Setup, masks: dict, layer_kernels: dict, run_dir: Path, log) -> pd.DataFrame:
    identity = identity_columns(cfg, setup.dataset)
    layers = pd.DataFrame(
        [{**identity, "network": d.network, "layer": d.layer, "total": d.total, "kept": d.kept, "density": d.density,
          "kernel": layer_kernels[d.network][d.layer]}
         for d in layer_densities(masks)]
    )
    write_parquet_atomic(layers, run_dir / LAYERS_FILE)
    for row in layers.itertuples():
        if row.kept == 0:
            log(f"warning: layer collapse: {row.network} {row.layer} keeps 0 of {row.total} weights")
    return layers


def static_columns(cfg: RunConfig, setup: Setup, progress: Progress, device: torch.device) -> dict:
    """The result columns that do not change during the run."""
    dataset = setup.dataset
    return {
        **identity_columns(cfg, dataset),
        **sparsity_columns(progress.masks),
        "prune_batch": cfg.pruning_batch_size if cfg.prune not in ("dense", *SUPERMASK_METHODS) else 0,
        "prune_rounds": cfg.prune_rounds if cfg.prune not in ("dense", *SUPERMASK_METHODS) else 0,
        "mask_transform": cfg.mask_transform,
        "reinit": cfg.reinit,
        "masks_from": Path(cfg.masks_from).name if cfg.masks_from else "",
        "score_transfer": Path(cfg.score_transfer).name if cfg.score_transfer else "",
        "weight_transfer": Path(cfg.weight_transfer).name if cfg.weight_transfer else "",
        "omega": cfg.omega if cfg.score_transfer or cfg.weight_transfer else 0.0,
        **schedule_columns(cfg),
        "network_widths": ";".join(f"{f}={','.join(map(str, getattr(setup.algo_config, f)))}"
                                   for fields in setup.agent.widths.values() for f in fields),
        "kernels": progress.kernels,
        "kernels_requested": cfg.kernels,
        "sparse_kernel_speedup_estimated": progress.kernel_estimate,
        "sparse_kernel_speedup_measured": progress.kernel_speedup,
        "dataset_transitions": len(dataset),
        "algo_options": ",".join(f"{k}={v}" for k, v in cfg.algo_options),
        "d4rl_refs_approximate": dataset.env_id.endswith("-v5"),
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "cpu": cpu_model(),
        "torch_threads": training_threads(cfg, progress.kernels),
        "offprune_version": offprune.__version__,
        "torch_version": torch.__version__,
        **{f"{k}_version": v for k, v in env_versions().items()},
    }


def mask_schedule(cfg: RunConfig, setup: Setup, progress: Progress) -> MaskSchedule | None:
    """The schedule that changes this run's masks during training (gmp, set, rigl: offprune.dynamic),
    starting from the masks now; None: masks fixed at initialisation."""
    if cfg.prune not in DYNAMIC_METHODS:
        return None
    start, end = cfg.schedule_window
    if cfg.prune == "gmp":
        final = {name: dict(cfg.sparsity_of).get(name, cfg.sparsity) for name in setup.networks}
        return GradualMagnitude(setup.networks, progress.masks, cfg.seed, final, start, end, cfg.prune_every, cfg.scope)
    gradients = dense_gradients(lambda: setup.sampler.sample(cfg.pruning_batch_size)) if cfg.prune == "rigl" else None
    return DropAndGrow(setup.networks, progress.masks, cfg.seed, end, cfg.prune_every, cfg.drop_fraction, gradients)


def schedule_columns(cfg: RunConfig) -> dict:
    """The options of a mask schedule as result columns: the ones the run's method uses, 0 for the rest."""
    used = SCHEDULE_OPTIONS.get(cfg.prune, ())
    return {name: (getattr(cfg, name) if name in used else type(getattr(cfg, name))(0))
            for name in SCHEDULE_FIELDS}


def sparsity_columns(masks: dict) -> dict:
    """Realised sparsity overall and per network, kept and prunable weights (each evaluation row
    has its own: a mask schedule changes them)."""
    all_masks = {f"{net}/{layer}": m for net, layer_masks in masks.items() for layer, m in layer_masks.items()}
    return {
        "realised_sparsity": realised_sparsity(all_masks),
        **{f"sparsity_{net}": realised_sparsity(m) for net, m in masks.items()},
        "kept_weights": int(sum(int(m.sum()) for m in all_masks.values())),
        "prunable_weights": int(sum(m.numel() for m in all_masks.values())),
    }


def train_loop(cfg: RunConfig, setup: Setup, progress: Progress, holder: MaskHolder, supermasks: Supermasks | None,
               static: dict, run_dir: Path, log) -> None:
    """Update, and every `eval_every` updates evaluate, checkpoint, then write the results row.
    Where a mask schedule says so, the masks change after an update (and the checkpoint keeps them);
    learned masks (`supermasks`) change with every update and are recorded at each evaluation."""
    agent, sampler = setup.agent, setup.sampler
    schedule = mask_schedule(cfg, setup, progress)
    losses: dict[str, list[float]] = defaultdict(list)
    window_start, window_steps = time.perf_counter(), 0
    bar_off = _progress_off(cfg)
    # no terminal to draw a bar on (a log file, a cluster job, CI): one line per evaluation instead
    lines = cfg.progress is None and not sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=progress.step, desc=cfg.name, unit="step", disable=bar_off, dynamic_ncols=True)
    for step in range(progress.step + 1, cfg.steps + 1):
        info = agent.update(sampler.sample(setup.algo_config.batch_size))
        diverged = [k for k, v in info.items() if not math.isfinite(v)]
        if diverged:  # stop before a bad state is checkpointed; the last good checkpoint stays
            bar.close()
            last_good = step - window_steps - 1
            kept = f"results and checkpoint up to step {last_good} are kept" if last_good else "no checkpoint yet"
            raise UserError(f"training diverged at step {step}: {', '.join(diverged)} not finite; {kept} in {run_dir}")
        for k, v in info.items():
            losses[k].append(v)
        if schedule is not None and (new_masks := schedule.masks_at(step)) is not None:
            holder.set_masks(new_masks)
            progress.masks = new_masks
            if holder.sparse and progress.kernels == "dense":  # the auto rule took sparse kernels at this change
                progress.kernels = static["kernels"] = "sparse"
                log(f"{cfg.name}: sparse kernels from update {step} on (the auto rule on the masks now)")
            if isinstance(schedule, Schedule):  # one row per layer and change
                append_rows(run_dir / CHANGES_FILE, [{"run_id": cfg.name, **c} for c in schedule.changes],
                            key=("step", "network", "layer"))
                schedule.changes.clear()
        window_steps += 1
        bar.update(1)
        if step % cfg.eval_every and step != cfg.steps:
            continue
        elapsed = time.perf_counter() - window_start
        progress.train_seconds += elapsed
        progress.step = step
        changes = schedule.changes_until(step) if isinstance(schedule, Schedule) else 0
        if supermasks is not None:  # one row per layer and evaluation: the change since the last one
            learned = {**progress.masks, **supermasks.masks()}
            append_rows(run_dir / CHANGES_FILE, [{"run_id": cfg.name, **c}
                                                 for c in change_rows(step, progress.masks, learned)],
                        key=("step", "network", "layer"))
            progress.masks, changes = learned, supermasks.changes
        row = evaluation_row(cfg, setup, {**static, **sparsity_columns(progress.masks), "mask_changes": changes}, step,
                             losses,
                             window_steps / elapsed if elapsed > 0 else float("nan"), progress.train_seconds)
        checkpoint.save(run_dir, checkpoint_state(cfg, setup, progress, row, supermasks))
        append_rows(run_dir / RESULTS_FILE, [row])
        bar.set_postfix(score=f"{row['normalized_score']:.1f}", refresh=False)
        if lines:
            log(f"{cfg.name}: step {step:,}/{cfg.steps:,}, normalised score {row['normalized_score']:.1f}, "
                f"{row['steps_per_s']:.1f} updates/s")
        losses.clear()
        window_start, window_steps = time.perf_counter(), 0
    bar.close()


def evaluation_row(cfg: RunConfig, setup: Setup, static: dict, step: int, losses: dict, steps_per_s: float,
                   train_seconds: float) -> dict:
    eval_seed = 1_000_000 + 1_000 * cfg.seed  # disjoint from the seeds used to generate data
    agent = setup.agent
    eval_start = time.perf_counter()
    episode_rewards = rollouts(agent.act, setup.env, cfg.eval_episodes, eval_seed, agent.reset)
    returns = returns_of(episode_rewards)
    # algorithm-specific measurements, e.g. a world model's prediction errors
    extra = agent.evaluation_metrics(setup.sampler, episode_rewards)
    return {
        **static,
        "step": step,
        **summarize(returns, setup.dataset.env_id),
        "eval_episodes": cfg.eval_episodes,
        **{f"loss_{k}": float(np.mean(v)) for k, v in losses.items()},
        **extra,
        "steps_per_s": steps_per_s,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        "timestamp": pd.Timestamp.now(tz="UTC"),
    }


def checkpoint_state(cfg: RunConfig, setup: Setup, progress: Progress, row: dict,
                     supermasks: Supermasks | None = None) -> dict:
    """Everything a resume needs, and the results row of this step (written after the checkpoint)."""
    agent, dataset = setup.agent, setup.dataset
    learned = {"supermask": supermasks.state_dict()} if supermasks is not None else {}
    return {
        **learned,
        "step": progress.step,
        "train_seconds": progress.train_seconds,
        "layout": checkpoint.LAYOUT,  # modules and optimizers as dense masked tensors, whatever the kernels
        "modules": checkpoint.dense_module_states(agent),
        "optimizers": checkpoint.dense_optimizer_states(agent),
        "sampler": setup.sampler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "masks": progress.masks,
        "kernels": progress.kernels,
        "kernel_speedup": progress.kernel_speedup,
        "kernel_estimate": progress.kernel_estimate,
        "config": cfg.to_dict(),
        "row": row,
        # what rebuilds the agent without the dataset (storage, export)
        "agent": {
            "algo": cfg.algo,
            "obs_dim": dataset.obs_dim,
            "act_dim": dataset.act_dim,
            "max_action": setup.max_action,
            "config": dataclasses.asdict(setup.algo_config),
        },
    }


def resolve_kernels(cfg: RunConfig, networks, masks, rows: int, log) -> tuple[str, float, float]:
    """'dense' or 'sparse' for this run; the rule's estimated sparse/dense speed ratio; and the
    measured one (NaN unless --kernels measure). Only 'measure' depends on timing."""
    nan = float("nan")
    if cfg.prune in UNMASKED or cfg.prune in DENSE_KERNEL_METHODS:
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
