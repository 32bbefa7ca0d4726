"""Reading and writing D4RL-format HDF5 files (gym-mujoco v2 layout), without the d4rl package.

A file holds `observations, actions, rewards, terminals, timeouts` and, in newer files,
`next_observations`; groups such as `infos/` and `metadata/` may sit beside them. offprune's own
files add provenance as root attributes (`env_id`, versions, ...).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from offprune import atomic
from offprune.errors import UserError

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")

# D4RL's reference returns (random policy, expert policy), measured on mujoco-py v2 environments.
# On gymnasium v5 they are an approximation.
REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}

# Dataset-name prefix -> gymnasium environment used for evaluation.
ENV_OF_FAMILY = {
    "hopper": "Hopper-v5",
    "halfcheetah": "HalfCheetah-v5",
    "walker2d": "Walker2d-v5",
    "ant": "Ant-v5",
}


def family_of_env(env_id: str) -> str | None:
    """'Hopper-v5' -> 'hopper'; None for environments with no D4RL reference."""
    base = env_id.split("-")[0].lower()
    return base if base in REFERENCE_SCORES else None


@dataclass
class OfflineDataset:
    """Transitions in `d4rl.qlearning_dataset` form: timeouts are not terminal."""

    observations: np.ndarray  # float32 [N, obs_dim]
    actions: np.ndarray  # float32 [N, act_dim]
    rewards: np.ndarray  # float32 [N]
    next_observations: np.ndarray  # float32 [N, obs_dim]
    terminals: np.ndarray  # bool [N]: a real termination (bootstrapping stops)
    timeouts: np.ndarray  # bool [N]: a time-limit cut (bootstrapping continues)
    env_id: str | None
    name: str
    path: str
    episode_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    attrs: dict = field(default_factory=dict)

    @property
    def ref_min_score(self) -> float:
        return self._refs()[0]

    @property
    def ref_max_score(self) -> float:
        return self._refs()[1]

    def _refs(self) -> tuple[float, float]:
        family = family_of_env(self.env_id) if self.env_id else None
        return REFERENCE_SCORES[family] if family else (float("nan"), float("nan"))

    def normalized_score(self, episode_return: float) -> float:
        """100 * (R - ref_min) / (ref_max - ref_min); NaN where D4RL has no reference."""
        return normalized_score(self.env_id, episode_return)

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]


def normalized_score(env_id: str | None, episode_return: float) -> float:
    family = family_of_env(env_id) if env_id else None
    if family is None:
        return float("nan")
    lo, hi = REFERENCE_SCORES[family]
    return 100.0 * (episode_return - lo) / (hi - lo)


def datasets_dir() -> Path:
    return Path(os.environ.get("OFFPRUNE_DATASETS", "datasets"))


def available_datasets() -> list[str]:
    folder = datasets_dir()
    return sorted(p.stem for p in folder.glob("*.hdf5")) if folder.is_dir() else []


def resolve_dataset_path(name_or_path: str) -> Path:
    """A path to an existing file, else NAME under $OFFPRUNE_DATASETS or ./datasets."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".hdf5", ".h5") or os.sep in name_or_path:
        if candidate.is_file():
            return candidate
        raise UserError(f"dataset file not found: {name_or_path}")
    path = datasets_dir() / f"{name_or_path}.hdf5"
    if path.is_file():
        return path
    have = available_datasets()
    listing = ", ".join(have) if have else "none"
    raise UserError(
        f"dataset '{name_or_path}' not found in {datasets_dir()}/ (available: {listing}); "
        f"make one with 'offprune datasets make hopper --quality random' or pass a path"
    )


def env_from_name(name: str) -> str | None:
    family = re.split(r"[-_]", Path(name).stem.lower())[0]
    return ENV_OF_FAMILY.get(family)


def _read_array(f: h5py.File, key: str, path: Path) -> np.ndarray:
    try:
        return f[key][()]
    except Exception as e:  # truncated or corrupt chunks surface here, not at open
        raise UserError(f"{path}: cannot read '{key}' ({type(e).__name__}: {e})") from None


def load_dataset(name_or_path: str, env_id: str | None = None) -> OfflineDataset:
    """Read a D4RL-format file (real D4RL or offprune's own) into qlearning form, checked.

    With stored `next_observations`, every transition is kept and timeouts stay non-terminal.
    Without them (older D4RL files), next state = the following observation, the step flagged
    `timeouts` is skipped (its successor starts another episode) and the last step is dropped,
    exactly as `d4rl.qlearning_dataset` does.
    """
    path = resolve_dataset_path(name_or_path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        missing = [k for k in REQUIRED_KEYS if k not in f]
        if missing:
            raise UserError(f"{path}: missing required D4RL keys: {', '.join(missing)}")
        arrays = {k: _read_array(f, k, path) for k in REQUIRED_KEYS}
        has_next = "next_observations" in f
        if has_next:
            arrays["next_observations"] = _read_array(f, "next_observations", path)
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

    n = len(arrays["rewards"])
    for k, a in arrays.items():
        if len(a) != n:
            raise UserError(f"{path}: '{k}' has {len(a)} rows but 'rewards' has {n}")
    if n < 2:
        raise UserError(f"{path}: dataset has {n} transitions; need at least 2")
    if arrays["observations"].ndim != 2 or arrays["actions"].ndim != 2:
        raise UserError(f"{path}: 'observations' and 'actions' must be 2-D arrays")
    for k in ("observations", "actions", "rewards", "next_observations"):
        if k in arrays and not np.isfinite(arrays[k]).all():
            bad = int((~np.isfinite(arrays[k])).any(axis=tuple(range(1, arrays[k].ndim))).sum())
            raise UserError(f"{path}: '{k}' contains NaN or inf in {bad} rows")

    obs = arrays["observations"].astype(np.float32, copy=False)
    act = arrays["actions"].astype(np.float32, copy=False)
    rew = arrays["rewards"].astype(np.float32, copy=False).reshape(-1)
    term = arrays["terminals"].astype(bool).reshape(-1)
    tout = arrays["timeouts"].astype(bool).reshape(-1)
    if has_next:
        next_obs = arrays["next_observations"].astype(np.float32, copy=False)
        keep = np.arange(n)
    else:
        keep = np.flatnonzero(~tout[: n - 1])
        next_obs = obs[keep + 1]
    obs, act, rew, term, tout = obs[keep], act[keep], rew[keep], term[keep], tout[keep]
    ends = np.flatnonzero(term | tout)
    starts = np.concatenate([[0], ends + 1])
    starts = starts[starts < len(rew)]

    env = env_id or attrs.get("env_id") or env_from_name(path.name)
    return OfflineDataset(
        observations=obs,
        actions=act,
        rewards=rew,
        next_observations=next_obs,
        terminals=term,
        timeouts=tout,
        env_id=env,
        name=path.stem,
        path=str(path),
        episode_starts=starts.astype(np.int64),
        attrs=attrs,
    )


def write_d4rl_file(path: str | Path, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> Path:
    """Write arrays in D4RL's layout (gzip), atomically: a crash never leaves a file under `path`.

    `arrays` keys may contain '/' for groups (e.g. 'infos/qpos', 'metadata/algorithm').
    """
    def write(tmp: Path) -> None:
        # built in memory, then written as plain bytes: HDF5's own writer reports a full disk
        # only when it closes the file, and may leave it behind
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as f:
            for key, value in arrays.items():
                value = np.asarray(value)
                # no object timestamps: the same arrays give a byte-identical file
                if value.dtype.kind in "US":  # strings (metadata) are stored as scalars
                    f.create_dataset(key, data=value.item() if value.ndim == 0 else value.astype("S"), track_times=False)
                else:
                    f.create_dataset(key, data=value, compression="gzip", track_times=False)
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
        tmp.write_bytes(buffer.getvalue())

    return atomic.write_with(path, write)
