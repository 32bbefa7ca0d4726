"""Import a local Minari dataset (HDF5 backend) into D4RL's layout, without needing minari itself.

A Minari dataset folder holds `data/metadata.json` (with `env_spec`) and `data/main_data.hdf5`
with one group per episode: `observations` (T+1 rows: the last is the final next state),
`actions`, `rewards`, `terminations`, `truncations` (T rows) and optional `infos/`.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from offprune.data.d4rl import family_of_env
from offprune.errors import UserError


def _data_folder(path: Path) -> Path:
    for candidate in (path / "data", path):
        if (candidate / "metadata.json").is_file():
            return candidate
    raise UserError(f"{path} is not a Minari dataset folder (no data/metadata.json)")


def read_minari(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays in D4RL's layout, attributes) of the Minari dataset at `path`."""
    folder = _data_folder(Path(path))
    try:
        metadata = json.loads((folder / "metadata.json").read_text())
    except ValueError as e:
        raise UserError(f"{folder / 'metadata.json'} is not valid JSON: {e}") from None
    if metadata.get("data_format", "hdf5") != "hdf5":
        raise UserError(f"{path}: Minari data format '{metadata['data_format']}' is not supported (only hdf5)")
    spec = metadata.get("env_spec")
    env_id = json.loads(spec).get("id") if isinstance(spec, str) else (spec or {}).get("id")
    keys = ("observations", "actions", "next_observations", "rewards", "terminals", "timeouts", "infos/qpos",
            "infos/qvel")
    parts: dict[str, list] = {k: [] for k in keys}
    try:
        f = h5py.File(folder / "main_data.hdf5", "r")
    except OSError as e:
        raise UserError(f"{folder / 'main_data.hdf5'}: not a readable HDF5 file ({e})") from None
    with f:
        episodes = sorted(f.keys(), key=lambda name: int(name.split("_")[-1]))
        for name in episodes:
            ep = f[name]
            obs = ep["observations"][()]
            if not isinstance(ep["observations"], h5py.Dataset) or obs.ndim != 2:
                raise UserError(f"{path}: episode '{name}' has non-flat observations; only Box spaces import")
            t = len(ep["rewards"])
            parts["observations"].append(obs[:t])
            parts["next_observations"].append(obs[1:t + 1])
            parts["actions"].append(ep["actions"][()])
            parts["rewards"].append(ep["rewards"][()])
            term = ep["terminations"][()].astype(bool)
            trunc = ep["truncations"][()].astype(bool) & ~term
            parts["terminals"].append(term)
            parts["timeouts"].append(trunc)
            for key in ("qpos", "qvel"):
                if "infos" in ep and key in ep["infos"]:
                    parts[f"infos/{key}"].append(ep["infos"][key][()][:t])
    if not parts["rewards"]:
        raise UserError(f"{path}: the Minari dataset has no episodes")
    arrays = {k: np.concatenate(v) for k, v in parts.items() if v and len(v) == len(episodes)}
    for k in ("observations", "actions", "next_observations", "rewards", "infos/qpos", "infos/qvel"):
        if k in arrays:
            arrays[k] = arrays[k].astype(np.float32)
    attrs = {"env_id": env_id or "", "minari_dataset_id": str(metadata.get("dataset_id", "")),
             "minari_algorithm": str(metadata.get("algorithm_name", "")), "imported_from": str(path),
             "quality": str(metadata.get("dataset_id", "minari")).split("/")[-1]}
    if env_id and family_of_env(env_id) is None:
        attrs["note"] = f"{env_id} has no D4RL reference returns: normalised scores are not defined"
    return arrays, attrs
