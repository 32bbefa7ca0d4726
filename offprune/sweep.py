"""Sweeps: a grid of runs (algos x datasets x seeds x criteria x sparsities, plus one dense
baseline per algo, dataset and seed), executed by local worker processes, resumable.

Every run writes to OUT/RUN_ID/ exactly as `offprune run` does, plus `status.json`
({"state": "running" | "done" | "failed", "error": ...}). OUT/sweep.json lists the grid, so
`--status` and a rerun know what belongs to the sweep. Rerunning the same sweep skips finished
runs and continues interrupted ones from their last checkpoint (train.run with resume).
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

from tqdm import tqdm

from offprune.config import RunConfig
from offprune.data.d4rl import resolve_dataset_path
from offprune.errors import UserError

MANIFEST = "sweep.json"
STATUS_FILE = "status.json"


def parse_list(text: str, kind=str) -> list:
    """'a,b,c' -> [a, b, c] converted by `kind`; 'LO-HI' expands to LO..HI when kind is int."""
    items = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if kind is int and "-" in part:
                lo, hi = part.split("-", 1)
                items.extend(range(int(lo), int(hi) + 1))
            else:
                items.append(kind(part))
        except ValueError:
            raise UserError(f"'{part}' is not a valid {kind.__name__}{' or range' if kind is int else ''}") from None
    return items


def expand_grid(
    algos: list[str],
    datasets: list[str],
    seeds: list[int],
    prunes: list[str],
    sparsities: list[float],
    base: RunConfig,
) -> list[RunConfig]:
    """One RunConfig per grid point, and one dense baseline per (algo, dataset, seed)."""
    criteria = [p for p in prunes if p != "dense"]
    levels = [s for s in sparsities if s > 0]
    if not algos or not datasets or not seeds or not (criteria and levels):
        raise UserError("the sweep grid is empty: give at least one algo, dataset, seed, criterion and sparsity > 0")
    runs = []
    for algo in algos:
        for dataset in datasets:
            for seed in seeds:
                common = dict(algo=algo, dataset=dataset, seed=seed, run_id=None)
                runs.append(dataclasses.replace(base, prune="dense", sparsity=0.0, **common))
                for prune in criteria:
                    for sparsity in levels:
                        runs.append(dataclasses.replace(base, prune=prune, sparsity=sparsity, **common))
    for cfg in runs:
        cfg.validate()
    names = [cfg.name for cfg in runs]
    if len(set(names)) != len(names):
        raise UserError("the sweep grid has duplicate runs (repeated values in a list?)")
    return runs


def check_datasets(runs: list[RunConfig]) -> None:
    """Fail before any run starts when a dataset does not exist."""
    for dataset in sorted({cfg.dataset for cfg in runs}):
        resolve_dataset_path(dataset)


def write_status(run_dir: Path, state: str, error: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps({"state": state, "error": error, "time": time.time()}))
    os.replace(tmp, run_dir / STATUS_FILE)


def read_state(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())["state"]
    except (OSError, ValueError, KeyError):
        return "left"


def _run_one(cfg_dict: dict) -> tuple[str, str | None]:
    """Worker: one run, one torch thread, resumed if it was interrupted. Never raises."""
    import torch

    from offprune.train import run

    cfg = RunConfig(**cfg_dict)
    torch.set_num_threads(cfg.threads or 1)
    run_dir = Path(cfg.out) / cfg.name
    log_path = run_dir / "log.txt"
    try:
        write_status(run_dir, "running")
        with open(log_path, "a") as log_file:
            run(cfg, resume=True, log=lambda msg: print(msg, file=log_file, flush=True))
        write_status(run_dir, "done")
        return cfg.name, None
    except BaseException as e:  # a failed run is recorded and the sweep goes on
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        with open(log_path, "a") as log_file:
            traceback.print_exc(file=log_file)
        write_status(run_dir, "failed", message)
        return cfg.name, message


def execute(runs: list[RunConfig], out: str, jobs: int, progress: bool | None = None) -> dict[str, str | None]:
    """Run every unfinished run of the grid on `jobs` local processes; returns {run_id: error}."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps([cfg.to_dict() for cfg in runs], indent=1))
    os.replace(tmp, out_dir / MANIFEST)

    todo = [cfg for cfg in runs if read_state(out_dir / cfg.name) != "done"]
    errors: dict[str, str | None] = {}
    # Workers do not inherit a parent's busy-waiting OpenMP threads; one thread each (two
    # processes with two threads each slow a 2-core machine ~10x).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="sweep", unit="run",
               disable=None if progress is None else not progress)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(_run_one, {**cfg.to_dict(), "progress": False}) for cfg in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                name, error = future.result()
                errors[name] = error
                if error:
                    tqdm.write(f"run {name} failed: {error}", file=sys.stderr)
                bar.update(1)
    bar.close()
    return errors


def status(out: str) -> dict[str, list[str]]:
    """Run ids of the sweep in OUT grouped by state: done, running, failed, left."""
    manifest = Path(out) / MANIFEST
    if not manifest.is_file():
        raise UserError(f"no sweep in {out} (no {MANIFEST}); start one with 'offprune sweep ... --out {out}'")
    groups: dict[str, list[str]] = {"done": [], "running": [], "failed": [], "left": []}
    for cfg_dict in json.loads(manifest.read_text()):
        name = RunConfig(**cfg_dict).name
        groups[read_state(Path(out) / name)].append(name)
    return groups
