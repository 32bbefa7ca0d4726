"""Sweeps: a grid of runs (algos x datasets x seeds x criteria x sparsities, plus one dense
baseline per algo, dataset and seed), executed by local worker processes or on Ray, resumable.

Every run writes to OUT/RUN_ID/ exactly as `offprune run` does, plus `status.json`
({"state": "running" | "done" | "failed" | "interrupted", "error": ...}). OUT/sweep.json lists
the grid, so `--status` and a rerun know what belongs to the sweep. Rerunning the same sweep
skips finished runs, continues interrupted ones from their last checkpoint (train.run with
resume) and extends finished ones to a larger --steps (a smaller one is refused); an unreadable
checkpoint is moved aside and its run restarted. A run holds an exclusive lock on OUT/RUN_ID/.lock while it works, so a worker orphaned
by a killed sweep and the rerun of that sweep never write the same run at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from offprune import atomic
from offprune import checkpoint
from offprune.algos import ALGOS
from offprune.config import TRANSFER_SOURCE, RunConfig, SweepConfig, criterion_variant, parse_list  # noqa: F401  (parse_list: public here too)
from offprune.data.d4rl import resolve_dataset_path
from offprune.errors import UserError
from offprune.prune import default_prune_rounds, default_scope
from offprune.results import RESULTS_FILE, ResultsError, read_rows

MANIFEST = "sweep.json"
STATUS_FILE = "status.json"


def expand_grid(
    algos: list[str],
    datasets: list[str],
    seeds: list[int],
    prunes: list[str],
    sparsities: list[float],
    base: RunConfig | Callable[[str], RunConfig],
    prune_batches: list[int | None] | None = None,
    algo_prunes: dict[str, list[str]] | None = None,
    transfer_source: str | None = None,
) -> list[RunConfig]:
    """One RunConfig per grid point, and one dense baseline per (algo, dataset, seed). `base`:
    the config every point starts from, or a function giving it per algo (profiles differ).
    `prune_batches`: pruning batch sizes to sweep (None in it: the criterion's default).
    `algo_prunes`: criteria of some algorithms instead of `prunes` ([]: their dense baselines only)."""
    algo_prunes = algo_prunes or {}
    levels = [s for s in sparsities if s > 0]
    some_criterion = any(p != "dense" for algo in algos for p in algo_prunes.get(algo, prunes))
    if not algos or not datasets or not seeds or not (some_criterion and levels):
        raise UserError("the sweep grid is empty: give at least one algo, dataset, seed, criterion and sparsity > 0")
    runs = []
    for algo in algos:
        if algo not in ALGOS:  # before a profile of it is looked up
            raise UserError(f"unknown algo '{algo}' (choose from {', '.join(ALGOS)})")
        algo_base = base(algo) if callable(base) else base
        criteria = [p for p in algo_prunes.get(algo, prunes) if p != "dense"]
        for dataset in datasets:
            for seed in seeds:
                common = dict(algo=algo, dataset=dataset, seed=seed, run_id=None)
                runs.append(dataclasses.replace(algo_base, prune="dense", sparsity=0.0, **common))
                for entry in criteria:
                    prune, options = criterion_variant(entry)
                    # a sweep's global scope means each criterion's own default (edge-popup: per layer)
                    scope = default_scope(prune) if algo_base.scope == "global" else algo_base.scope
                    options = {"prune_rounds": default_prune_rounds(prune), "scope": scope, **options}
                    for sparsity in levels:
                        sourced = {k: _source(transfer_source, entry, algo=algo, seed=seed, sparsity=f"{sparsity:g}")
                                   for k, v in options.items() if v is TRANSFER_SOURCE}
                        for batch in prune_batches or [None]:
                            runs.append(dataclasses.replace(algo_base, prune=prune, sparsity=sparsity,
                                                            prune_batch=batch, **{**options, **sourced}, **common))
    for cfg in runs:
        cfg.validate()
    names = [cfg.name for cfg in runs]
    if len(set(names)) != len(names):
        raise UserError("the sweep grid has duplicate runs (repeated values in a list?)")
    return runs


def _source(template: str | None, entry: str, **values) -> str:
    if not template:
        raise UserError(f"criterion '{entry}' transfers from another run: give the sweep a transfer_source "
                        "(e.g. \"runs/studies/bc_halfcheetah-expert-v5_snip_s{sparsity}_seed{seed}\")")
    return template.format(**values)


def grid(sweep: SweepConfig) -> list[RunConfig]:
    """Every run of a sweep config, dense baselines included."""
    return expand_grid(list(sweep.algo), list(sweep.dataset), list(sweep.seeds), list(sweep.prune),
                       list(sweep.sparsity), sweep.base_run, list(sweep.prune_batch),
                       {algo: list(criteria) for algo, criteria in sweep.algo_prune}, sweep.transfer_source)


def check_datasets(runs: list[RunConfig]) -> None:
    """Fail before any run starts when a dataset does not exist."""
    for dataset in sorted({cfg.dataset for cfg in runs}):
        resolve_dataset_path(dataset)


def write_status(run_dir: Path, state: str, error: str | None = None) -> None:
    atomic.write_json(run_dir / STATUS_FILE, {"state": state, "error": error, "time": time.time()})


def read_state(run_dir: Path) -> str:
    try:
        state = json.loads((run_dir / STATUS_FILE).read_text())["state"]
    except (OSError, ValueError, KeyError):
        return "left"
    if state == "running" and not checkpoint.is_locked(run_dir):
        return "left"  # its process died without a word (killed): a rerun continues it
    return state if state in ("done", "running", "failed") else "left"


def trained_steps(run_dir: Path) -> int:
    """The last step with a results row (0 when none)."""
    try:
        rows = read_rows(run_dir / RESULTS_FILE, columns=["step"])
    except ResultsError:  # damaged: the run restarts (see _run_one)
        return 0
    return 0 if rows is None or rows.empty else int(rows.step.max())


def is_finished(cfg: RunConfig) -> bool:
    """Done at this budget: a run trained to fewer steps than `cfg.steps` is extended, not skipped."""
    run_dir = Path(cfg.out) / cfg.name
    return read_state(run_dir) == "done" and trained_steps(run_dir) >= cfg.steps


def check_budgets(runs: list[RunConfig]) -> None:
    """Refuse, before running anything, a grid whose runs already trained past its budget."""
    for cfg in runs:
        done = trained_steps(Path(cfg.out) / cfg.name)
        if done > cfg.steps:
            raise UserError(f"run {cfg.name} in {cfg.out} has trained {done:,} updates, more than --steps "
                            f"{cfg.steps:,}; use --steps {done} or another --out (budgets are never mixed)")


def _die_with_parent() -> None:
    """Worker initializer: end this worker when the sweep that started it dies (Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: an orphan finishes its run, and its lock keeps a rerun from writing it twice


def _run_one(cfg_dict: dict, cwd: str | None = None) -> tuple[str, str | None, list[str]]:
    """Worker: one run, `threads` torch threads, resumed if it was interrupted. Never raises
    except on Ctrl-C. `cwd`: the sweep's working directory (Ray workers may start elsewhere).
    Returns (run id, error or None, notes for the user)."""
    import torch

    from offprune.train import run

    if cwd:
        os.chdir(cwd)
    cfg = RunConfig(**cfg_dict)
    torch.set_num_threads(cfg.threads or 1)
    run_dir = Path(cfg.out) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_finished(cfg):
        return cfg.name, None, []
    log_path = run_dir / "log.txt"
    notes = []
    try:
        with open(log_path, "a") as log_file:
            def log(msg: str) -> None:
                print(msg, file=log_file, flush=True)

            write_status(run_dir, "running")
            try:  # waits for an orphan of a killed sweep that still writes this run
                run(cfg, resume=True, log=log, wait_for_lock=True)
            except (checkpoint.CheckpointError, ResultsError) as e:
                # restart from scratch: a run's rows must all come from one training
                moved = checkpoint.move_aside(run_dir, (checkpoint.CHECKPOINT_FILE, checkpoint.PREVIOUS_CHECKPOINT_FILE,
                                                        RESULTS_FILE))
                what = "checkpoint" if isinstance(e, checkpoint.CheckpointError) else "results file"
                notes.append(f"run {cfg.name}: unreadable {what} moved aside "
                             f"({', '.join(p.name for p in moved)}); restarting it from scratch")
                log(f"{e}\n{notes[-1]}")
                run(cfg, resume=True, log=log, wait_for_lock=True)
        write_status(run_dir, "done")
        return cfg.name, None, notes
    except KeyboardInterrupt:
        write_status(run_dir, "interrupted")
        raise
    except BaseException as e:  # a failed run is recorded and the sweep goes on
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        try:
            with open(log_path, "a") as log_file:
                traceback.print_exc(file=log_file)
            write_status(run_dir, "failed", message)
        except (OSError, UserError):
            pass  # the disk that failed the run may refuse these too; the sweep still reports it
        return cfg.name, message, notes


def execute(runs: list[RunConfig], out: str, jobs: int, progress: bool | None = None,
            executor: str = "local", ray_address: str | None = None, skip: set[str] = frozenset(),
            on_finished: Callable[[str, str | None], None] | None = None) -> dict[str, str | None]:
    """Run every unfinished run of the grid, `jobs` at a time, on local processes or Ray;
    returns {run_id: error or None} for the runs it executed. `skip`: names finished elsewhere
    (a study's consolidated results); `on_finished(name, error)` is called as each run ends."""
    out_dir = Path(out)
    atomic.write_json(out_dir / MANIFEST, [cfg.to_dict() for cfg in runs])

    check_budgets(runs)
    todo = [cfg for cfg in runs if cfg.name not in skip and not is_finished(cfg)]
    # Workers do not inherit a parent's busy-waiting OpenMP threads; one thread each (two
    # processes with two threads each slow a 2-core machine ~10x).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="sweep", unit="run",
               disable=None if progress is None else not progress)
    # no terminal to draw the bar on (a log file, a cluster job): a line per finished or failed run
    lines = progress is None and not sys.stderr.isatty()
    errors: dict[str, str | None] = {}

    def finished(name: str, error: str | None, notes: list[str]) -> None:
        for note in notes:
            tqdm.write(note, file=sys.stderr)
        errors[name] = error
        if error:
            tqdm.write(f"run {name} failed: {error}", file=sys.stderr)
        elif lines:
            print(f"[{len(runs) - len(todo) + len(errors)}/{len(runs)}] run {name} done", file=sys.stderr, flush=True)
        if on_finished is not None:
            on_finished(name, error)
        bar.update(1)
        failed = sum(e is not None for e in errors.values())
        bar.set_postfix(running=min(jobs, len(todo) - len(errors)), failed=failed)

    jobs_list = [{**cfg.to_dict(), "progress": False} for cfg in todo]
    try:
        if executor == "ray":
            _execute_ray(jobs_list, jobs, ray_address, finished)
        else:
            _execute_local(jobs_list, jobs, finished)
    finally:
        bar.close()
    return errors


def _execute_local(jobs_list: list[dict], jobs: int, finished) -> None:
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_die_with_parent) as pool:
        pending = {pool.submit(_run_one, cfg) for cfg in jobs_list}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                finished(*future.result())


def _execute_ray(jobs_list: list[dict], jobs: int, address: str | None, finished) -> None:
    """One Ray task per run (1 CPU each). Without an address a local Ray instance with `jobs`
    CPUs; with one, the cluster decides how many run at a time. Workers write to the same paths
    as local runs: on a cluster, OUT and the datasets must be on a shared filesystem."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray, which is not installed: pip install 'ray>=2.9' "
                        "(or pip install -e '.[ray]')") from None
    started_here = not ray.is_initialized()
    if started_here:
        env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE",
                            **({"OFFPRUNE_DATASETS": os.environ["OFFPRUNE_DATASETS"]}
                               if "OFFPRUNE_DATASETS" in os.environ else {})}}
        if address and address != "auto":
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, runtime_env=env, logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(num_cpus=jobs, include_dashboard=False, runtime_env=env, logging_level="ERROR",
                         log_to_driver=False)
        except Exception as e:  # ConnectionError, RuntimeError, ... depending on how it failed
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise UserError(f"cannot start or reach {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_run_one)
        cwd = os.getcwd()
        pending = [task.remote(cfg, cwd) for cfg in jobs_list]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            finished(*ray.get(done[0]))
    finally:
        if started_here:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a dead HOST:PORT (ray.init itself retries for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except ValueError:
        raise UserError(f"--ray-address '{address}' is not HOST:PORT or 'auto'") from None
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def status(out: str) -> dict[str, list[str]]:
    """Run ids of the sweep in OUT grouped by state: done, running, failed, left."""
    manifest = Path(out) / MANIFEST
    if not manifest.is_file():
        raise UserError(f"no sweep in {out} (no {MANIFEST}); start one with 'offprune sweep ... --out {out}'")
    try:
        grid = json.loads(manifest.read_text())
    except ValueError:
        raise UserError(f"{manifest} is not valid JSON; rerun the sweep's command to rewrite it") from None
    return status_of([RunConfig(**cfg_dict) for cfg_dict in grid], out)


def status_of(runs: list[RunConfig], out: str, finished: set[str] = frozenset()) -> dict[str, list[str]]:
    """Run ids grouped by state; `finished`: runs done elsewhere (a study's consolidated results)."""
    groups: dict[str, list[str]] = {"done": [], "running": [], "failed": [], "left": []}
    for cfg in runs:
        state = "done" if cfg.name in finished else read_state(Path(out) / cfg.name)
        groups[state].append(cfg.name)
    return groups
