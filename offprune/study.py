"""Studies: sweeps whose finished results are consolidated into a small, committed folder.

A study is a sweep config (`studies/NAME.toml`) with `results = "reports/NAME"`. Run folders
(checkpoints, logs) stay under the sweep's `out` and out of git; every finished run's rows are
copied into RESULTS/results.parquet and RESULTS/layers.parquet, and RESULTS/runs.json lists the
whole grid. A sweep skips the runs whose final row (step == its budget) is already in
RESULTS/results.parquet, so a study continues on another machine without redoing finished runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from offprune import atomic, checkpoint
from offprune.config import RunConfig
from offprune.errors import UserError
from offprune.results import (COLUMN_DEFAULTS, LAYERS_FILE, RESULTS_FILE, ROW_KEY, read_parquet, read_rows,
                              write_parquet_atomic)

SCHEMA_VERSION = 1  # of the consolidated files; raise it when a column changes meaning
RUNS_FILE = "runs.json"
LAYER_KEY = ("run_id", "network", "layer")


def _read(path: Path) -> pd.DataFrame | None:
    """A consolidated parquet file, or None when there is none; one-line errors for a foreign one."""
    df = read_rows(path, remedy="move it aside to rebuild it (nothing was changed)")
    if df is None:
        return None
    versions = set(df["schema_version"].unique()) if "schema_version" in df.columns else {None}
    if versions != {SCHEMA_VERSION} and len(df):
        raise UserError(f"{path} was written with results schema {sorted(map(str, versions))}, this offprune "
                        f"writes {SCHEMA_VERSION}; move it aside (nothing was changed)")
    return df


def check(results_dir: str | Path) -> None:
    """Fail with one line before any work when the consolidated files cannot be used."""
    for name in (RESULTS_FILE, LAYERS_FILE):
        _read(Path(results_dir) / name)


def finished_runs(results_dir: str | Path, runs: list[RunConfig]) -> set[str]:
    """Names of `runs` whose final evaluation (step == steps) is in the consolidated results."""
    df = _read(Path(results_dir) / RESULTS_FILE)
    if df is None or not len(df):
        return set()
    have = set(zip(df["run_id"], df["step"]))
    last = df.groupby("run_id").step.max()
    for cfg in runs:
        if last.get(cfg.name, 0) > cfg.steps:
            raise UserError(f"run {cfg.name} in {results_dir} was trained {last[cfg.name]:,} updates, more than "
                            f"--steps {cfg.steps:,}; use --steps {last[cfg.name]} (budgets are never mixed)")
    return {cfg.name for cfg in runs if (cfg.name, cfg.steps) in have}


def own_runs(runs: list[RunConfig], grid: list[RunConfig]) -> list[RunConfig]:
    """The runs of `runs` that belong to the study whose grid is `grid`: the same name and the same
    experiment (a sweep may run a subset of a study, or other settings such as a smoke test's
    budget, which must not enter the study's results)."""
    study = {cfg.name: cfg.experiment() for cfg in grid}
    return [cfg for cfg in runs if study.get(cfg.name) == cfg.experiment()]


def consolidate(out: str | Path, results_dir: str | Path, runs: list[RunConfig],
                grid: list[RunConfig] | None = None) -> int:
    """Copy the rows of every finished run of `runs` (in `out`) into `results_dir`, and write the
    study's `grid` (default: `runs`) as its runs.json; returns how many runs the consolidated
    results hold. Idempotent: a run's rows replace its earlier copy."""
    results_dir = Path(results_dir)
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {results_dir}: {e.strerror or e}") from None
    # two sweeps of one study (a subset rerun beside the full one) must not lose each other's runs
    with checkpoint.locked(results_dir, wait=True):
        return _consolidate(out, results_dir, runs, runs if grid is None else grid)


def _consolidate(out: str | Path, results_dir: Path, runs: list[RunConfig], grid: list[RunConfig]) -> int:
    old_rows = _read(results_dir / RESULTS_FILE)
    old_layers = _read(results_dir / LAYERS_FILE)
    new_rows, new_layers = [], []
    for cfg in runs:
        run_dir = Path(out) / cfg.name
        rows_path = run_dir / RESULTS_FILE
        if not rows_path.is_file():
            continue
        rows = read_parquet(rows_path)
        if not (rows["step"] == cfg.steps).any():  # not finished at this budget
            continue
        new_rows.append(rows)
        if (run_dir / LAYERS_FILE).is_file():
            new_layers.append(read_parquet(run_dir / LAYERS_FILE))
    rows = _merge(old_rows, new_rows, ROW_KEY)
    layers = _merge(old_layers, new_layers, LAYER_KEY)
    if rows is not None:
        write_parquet_atomic(rows, results_dir / RESULTS_FILE)
    if layers is not None:
        write_parquet_atomic(layers, results_dir / LAYERS_FILE)
    atomic.write_json(results_dir / RUNS_FILE, [cfg.to_dict() for cfg in grid])
    return 0 if rows is None else rows["run_id"].nunique()


def _merge(old: pd.DataFrame | None, new: list[pd.DataFrame], key: tuple[str, ...]) -> pd.DataFrame | None:
    if not new:
        return old
    replaced = set(pd.concat(new)["run_id"])
    frames = ([old[~old["run_id"].isin(replaced)]] if old is not None else []) + new
    merged = pd.concat(frames, ignore_index=True)
    for column, default in COLUMN_DEFAULTS.items():
        if column in merged:
            merged[column] = merged[column].where(merged[column].notna(), default)
    merged["schema_version"] = SCHEMA_VERSION
    # rows of a run keep their order (layers.parquet lists a network's layers input to output)
    return merged.sort_values(list(key[:1]), kind="stable").reset_index(drop=True)


def expected_runs(results_dir: str | Path) -> list[dict] | None:
    """The study's grid as written by `consolidate` (None when the folder has no runs.json)."""
    path = Path(results_dir) / RUNS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not valid JSON; rerun the study's sweep to rewrite it") from None


def missing_datasets(runs: list[RunConfig]) -> list[str]:
    from offprune.data.d4rl import resolve_dataset_path

    missing = []
    for name in sorted({cfg.dataset for cfg in runs}):
        try:
            resolve_dataset_path(name)
        except UserError:
            missing.append(name)
    return missing


def make_missing_datasets(runs: list[RunConfig], transitions: int = 100_000, log=print) -> None:
    """Make every missing `ENV-QUALITY-v5` dataset of the grid (shipped policies, seed 0); a name
    offprune cannot make is a one-line error naming the command that would."""
    from offprune.data.d4rl import ENV_OF_FAMILY, datasets_dir
    from offprune.data.generate import QUALITIES, make_dataset

    for name in missing_datasets(runs):
        env, _, rest = name.partition("-")
        quality = rest.removesuffix("-v5")
        if env not in ENV_OF_FAMILY or quality not in QUALITIES or not rest.endswith("-v5"):
            raise UserError(f"dataset {name} not found and offprune cannot make it (names it makes: ENV-QUALITY-v5, "
                            f"e.g. hopper-expert-v5); put the file in {datasets_dir()}")
        log(f"dataset {name} not found: making it ({transitions} transitions, "
            f"'offprune datasets make {env} --quality {quality}')")
        make_dataset(env, quality, transitions, 0, datasets_dir() / f"{name}.hdf5", "ppo", progress=False)
