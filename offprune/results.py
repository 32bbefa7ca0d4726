"""Results on disk: one parquet row per (run, evaluation step), written atomically, never duplicated.

Each run keeps `OUT/RUN_ID/results.parquet` (and `layers.parquet`, its per-layer kept counts); a
results dataset is any folder of them. `load(path)` reads a run folder, a sweep folder, a parquet
file or a glob into one DataFrame.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from offprune.errors import UserError

RESULTS_FILE = "results.parquet"
LAYERS_FILE = "layers.parquet"
ROW_KEY = ("run_id", "step")


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        df.to_parquet(tmp, index=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def append_rows(path: str | Path, rows: Iterable[dict], key: Sequence[str] = ROW_KEY) -> pd.DataFrame:
    """Add rows to a parquet file; a row whose key is already there replaces the old one."""
    path = Path(path)
    new = pd.DataFrame(list(rows))
    if path.exists():
        new = pd.concat([pd.read_parquet(path), new], ignore_index=True)
    new = new.drop_duplicates(subset=list(key), keep="last").sort_values(list(key)).reset_index(drop=True)
    write_parquet_atomic(new, path)
    return new


def _files(path: str | Path, filename: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob(filename))
    if p.is_file():
        return [str(p)]
    return sorted(glob.glob(str(path), recursive=True))


def load(path: str | Path, filename: str = RESULTS_FILE) -> pd.DataFrame:
    """All result rows under `path` (run folder, sweep folder, parquet file or glob) in one frame."""
    files = _files(path, filename)
    if not files:
        raise UserError(f"no results ({filename}) found at {path}")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def load_layers(path: str | Path) -> pd.DataFrame:
    """Per-layer kept counts of every run under `path` (the paper's Figure 3)."""
    return load(path, LAYERS_FILE)
