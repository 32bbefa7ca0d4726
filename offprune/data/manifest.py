"""The manifest of a datasets folder: sha256 and statistics of every file offprune wrote or
imported there (`manifest.json`, beside the files), and `verify`, which checks a file against it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import h5py
import numpy as np

from offprune import atomic
from offprune.data.d4rl import REQUIRED_KEYS, load_dataset, resolve_dataset_path
from offprune.errors import UserError

MANIFEST = "manifest.json"
# D4RL's layout and dtypes (float32 arrays, bool flags); infos/ are optional in real D4RL files.
SCHEMA = {"observations": "f4", "actions": "f4", "next_observations": "f4", "rewards": "f4",
          "terminals": "b1", "timeouts": "b1", "infos/qpos": "f4", "infos/qvel": "f4",
          "infos/action_log_probs": "f4"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise UserError(f"{folder / MANIFEST} is not valid JSON: {e}") from None


def record(path: Path) -> dict:
    """Add (or replace) the entry of `path` in its folder's manifest, atomically."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    entry = {"sha256": sha256(path), "bytes": path.stat().st_size, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"),
             **{k: attrs[k] for k in ("env_id", "quality", "transitions", "episodes", "return_mean",
                                      "normalized_score", "behaviour_policy", "seed") if k in attrs}}
    manifest = read(path.parent)
    manifest[path.name] = entry
    atomic.write_text(path.parent / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return entry


def verify(name_or_path: str) -> list[str]:
    """Check schema, read every array, compare sha256 with the manifest; lines of what was checked.
    Raises UserError on the first problem."""
    path = resolve_dataset_path(name_or_path)
    checked = []
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        n = None
        for key, dtype in SCHEMA.items():
            if key not in f:
                if key in REQUIRED_KEYS:
                    raise UserError(f"{path}: missing required key '{key}'")
                continue
            try:
                array = f[key][()]
            except Exception as e:
                raise UserError(f"{path}: cannot read '{key}' ({type(e).__name__}: {e})") from None
            if array.dtype != np.dtype(dtype) and key in ("terminals", "timeouts"):
                raise UserError(f"{path}: '{key}' is {array.dtype}, D4RL stores {np.dtype(dtype)}")
            if array.dtype.kind != np.dtype(dtype).kind:
                raise UserError(f"{path}: '{key}' is {array.dtype}, expected {np.dtype(dtype)}")
            n = len(array) if n is None else n
            if len(array) != n:
                raise UserError(f"{path}: '{key}' has {len(array)} rows, 'observations' has {n}")
            checked.append(f"{key}: {array.dtype} {array.shape}")
    dataset = load_dataset(str(path))  # the reader's own checks (NaN/inf, 2-D arrays, ...)
    policy = dataset.attrs.get("behaviour_policy")
    if policy:
        sha = dataset.attrs.get("behaviour_policy_sha256")
        checked.append(f"behaviour policy: {policy}" + (f" (policy sha256 {str(sha)[:16]}...)" if sha else ""))
    entry = read(path.parent).get(path.name)
    if entry is None:
        checked.append("sha256: not in the manifest (nothing to compare)")
    else:
        digest = sha256(path)
        if digest != entry["sha256"]:
            raise UserError(f"{path}: sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}... "
                            "(the file changed or is damaged)")
        checked.append(f"sha256: matches the manifest ({digest[:16]}...)")
    return checked
