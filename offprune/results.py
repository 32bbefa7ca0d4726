"""Results on disk: one parquet row per (run, evaluation step), written atomically, never duplicated.

Each run keeps `OUT/RUN_ID/results.parquet` (and `layers.parquet`, its per-layer kept counts); a
results dataset is any folder of them. `load(path)` reads a run folder, a sweep folder, a parquet
file or a glob into one DataFrame.
"""

from __future__ import annotations

import glob
import io
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from offprune import atomic
from offprune.errors import UserError

RESULTS_FILE = "results.parquet"
LAYERS_FILE = "layers.parquet"
STORAGE_FILE = "storage.parquet"  # written by `offprune storage`
ROW_KEY = ("run_id", "step")


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write `df` to `path` atomically (offprune.atomic)."""
    atomic.write_with(path, lambda tmp: df.to_parquet(tmp, index=False))


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A parquet file as it was at one moment: its bytes read through one open file, then parsed.
    Parsing from the path reopens it, and a run or sweep replacing it meanwhile (atomically, by
    rename) made ~15 % of reads fail ('Page was smaller than expected') in a reader polling a file
    rewritten in a loop."""
    return pd.read_parquet(io.BytesIO(Path(path).read_bytes()), columns=columns)


# Columns added after results were first published, and what a row written before them means
# ('' = not recorded); consolidated studies fill them in so old and new rows group together.
COLUMN_DEFAULTS = {"mask_transform": "none", "reinit": False, "masks_from": "", "network_widths": "",
                   "score_transfer": "", "weight_transfer": "", "omega": 0.0, "mask_changes": 0,
                   "prune_start": 0.0, "prune_end": 0.0, "prune_every": 0, "drop_fraction": 0.0}


class ResultsError(UserError):
    """A results file that exists cannot be read."""


RUN_FILE_REMEDY = "move it aside (mv {path} {path}.bad) and rerun: a sweep does this by itself and restarts the run"


def read_rows(path: str | Path, columns: list[str] | None = None, remedy: str = RUN_FILE_REMEDY) -> pd.DataFrame | None:
    """A results file (None when there is none); ResultsError names a damaged one and says what to
    do (`remedy`, formatted with the path)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read_parquet(path, columns=columns)
    except Exception as e:  # truncated, overwritten, not parquet
        raise ResultsError(f"cannot read {path} ({type(e).__name__}); {remedy.format(path=path)}") from None


def append_rows(path: str | Path, rows: Iterable[dict], key: Sequence[str] = ROW_KEY) -> pd.DataFrame:
    """Add rows to a parquet file; a row whose key is already there replaces the old one."""
    path = Path(path)
    new = pd.DataFrame(list(rows))
    old = read_rows(path)
    if old is not None:
        new = pd.concat([old, new], ignore_index=True)
    new = new.drop_duplicates(subset=list(key), keep="last").sort_values(list(key)).reset_index(drop=True)
    write_parquet_atomic(new, path)
    return new


def _results_files(path: str | Path) -> list[Path]:
    """results.parquet files at `path`: a run or sweep folder (searched recursively), a parquet
    file, or a glob matching either."""
    p = Path(path)
    matches = [p] if p.exists() else [Path(m) for m in sorted(glob.glob(str(path), recursive=True))]
    files: list[Path] = []
    for m in matches:
        files.extend(sorted(m.rglob(RESULTS_FILE)) if m.is_dir() else [m] if m.suffix == ".parquet" else [])
    return sorted(set(files))


def load(path: str | Path, filename: str = RESULTS_FILE) -> pd.DataFrame:
    """All result rows under `path` (run folder, sweep folder, parquet file or glob) in one frame.
    With another `filename` (layers.parquet, storage.parquet): that file of every run found."""
    files = _results_files(path)
    if filename != RESULTS_FILE:
        files = [f.with_name(filename) for f in files if f.with_name(filename).is_file()]
    if not files:
        raise UserError(f"no results ({filename}) found at {path}")
    frames = []
    for f in files:
        try:
            frames.append(read_parquet(f))
        except Exception as e:  # a foreign or damaged file: name it instead of a traceback
            raise UserError(f"cannot read {f} as parquet: {e}") from None
    return pd.concat(frames, ignore_index=True)


def load_layers(path: str | Path) -> pd.DataFrame:
    """Per-layer kept counts of every run under `path` (the paper's Figure 3)."""
    return load(path, LAYERS_FILE)
