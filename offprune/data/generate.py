"""D4RL-format datasets rolled out in gymnasium v5 environments, D4RL's recipes:

- random: uniform random actions (needs nothing trained; tests and the quick start use it)
- medium / expert: stochastic actions of a behaviour policy trained with stable-baselines3
  (offprune.data.behaviour): expert = its best snapshot, medium = a snapshot at ~1/3 of that return
- medium-replay: every transition the behaviour agent collected while training up to medium
- medium-expert: the medium file's arrays followed by the expert file's, exactly

Every file gets provenance attributes and an entry (sha256, statistics) in the manifest of the
folder it is written to (offprune.data.manifest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

import offprune
from offprune.data.d4rl import ENV_OF_FAMILY, datasets_dir, normalized_score, write_d4rl_file
from offprune.envs import env_versions, make_env, uniform_log_prob
from offprune.errors import UserError

QUALITIES = ("random", "medium", "expert", "medium-replay", "medium-expert")

ActFn = Callable[[np.ndarray], tuple[np.ndarray, float]]  # obs -> (action, log-probability)


def default_name(env: str, quality: str) -> str:
    # '-v5' marks data offprune rolled out in gymnasium v5 (D4RL's own files end in -v0/-v1/-v2).
    return f"{env}-{quality}-v5"


def rollout(env: str, act: ActFn, transitions: int, seed: int, progress: bool = True) -> dict[str, np.ndarray]:
    """Roll `act` out for `transitions` steps; arrays in D4RL's layout (episodes reset with seed+i)."""
    env_id = ENV_OF_FAMILY[env]
    gym_env = make_env(env_id)
    obs_dim = gym_env.observation_space.shape[0]
    act_dim = gym_env.action_space.shape[0]
    unwrapped = gym_env.unwrapped
    nq, nv = unwrapped.data.qpos.shape[0], unwrapped.data.qvel.shape[0]
    data = {
        "observations": np.zeros((transitions, obs_dim), np.float32),
        "actions": np.zeros((transitions, act_dim), np.float32),
        "next_observations": np.zeros((transitions, obs_dim), np.float32),
        "rewards": np.zeros(transitions, np.float32),
        "terminals": np.zeros(transitions, bool),
        "timeouts": np.zeros(transitions, bool),
        "infos/qpos": np.zeros((transitions, nq), np.float32),
        "infos/qvel": np.zeros((transitions, nv), np.float32),
        "infos/action_log_probs": np.zeros(transitions, np.float32),
    }
    episode = 0
    obs, _ = gym_env.reset(seed=seed)
    for t in tqdm(range(transitions), desc=f"rolling out {env_id}", disable=not progress, unit="step"):
        action, log_prob = act(obs)
        data["infos/qpos"][t] = unwrapped.data.qpos
        data["infos/qvel"][t] = unwrapped.data.qvel
        next_obs, reward, terminated, truncated, _ = gym_env.step(action)
        data["observations"][t] = obs
        data["actions"][t] = action
        data["next_observations"][t] = next_obs
        data["rewards"][t] = reward
        data["terminals"][t] = terminated
        data["timeouts"][t] = truncated and not terminated
        data["infos/action_log_probs"][t] = log_prob
        if terminated or truncated:
            episode += 1
            obs, _ = gym_env.reset(seed=seed + episode)
        else:
            obs = next_obs
    gym_env.close()
    return data


def episode_returns(rewards: np.ndarray, terminals: np.ndarray, timeouts: np.ndarray) -> np.ndarray:
    """Return of every episode (the last one may be cut by the dataset's end)."""
    ends = np.flatnonzero(terminals | timeouts)
    if len(ends) == 0 or ends[-1] != len(rewards) - 1:
        ends = np.append(ends, len(rewards) - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    sums = np.cumsum(rewards, dtype=np.float64)
    return sums[ends] - np.where(starts > 0, sums[starts - 1], 0.0)


def _write(out: Path, env: str | None, quality: str, data: dict, seed: int | None, provenance: dict) -> Path:
    from offprune.data.manifest import record

    env_id = ENV_OF_FAMILY[env] if env else provenance.pop("env_id")
    if len(data["rewards"]) and not data["terminals"][-1]:
        # The final, unfinished episode is cut by the dataset's end: a time-limit cut, not terminal.
        data["timeouts"][-1] = True
    returns = episode_returns(data["rewards"], data["terminals"], data["timeouts"])
    attrs = {
        "env_id": env_id,
        "quality": quality,
        **({"seed": seed} if seed is not None else {}),
        "transitions": len(data["rewards"]),
        "episodes": len(returns),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "normalized_score": normalized_score(env_id, float(returns.mean())),
        "offprune_version": offprune.__version__,
        **{f"{k}_version": v for k, v in env_versions().items()},
        **provenance,
    }
    data["metadata/algorithm"] = np.array(provenance.get("behaviour_algo", "random"))
    path = write_d4rl_file(out, data, attrs)
    record(path)
    return path


def generate_random(env: str, transitions: int, seed: int, out: str | Path, progress: bool = True) -> Path:
    """Roll out a uniform random policy for `transitions` steps and write a D4RL-format file."""
    _check(env, transitions)
    space = make_env(ENV_OF_FAMILY[env]).action_space
    rng = np.random.default_rng(seed)
    log_prob = uniform_log_prob(space)

    def act(obs):
        return rng.uniform(space.low, space.high).astype(np.float32), log_prob

    data = rollout(env, act, transitions, seed, progress)
    return _write(Path(out), env, "random", data, seed, {"behaviour_policy": "uniform random"})


def _check(env: str, transitions: int) -> None:
    if env not in ENV_OF_FAMILY:
        raise UserError(f"unknown env '{env}' (choose from {', '.join(ENV_OF_FAMILY)})")
    if transitions < 2:
        raise UserError("--transitions must be at least 2")


def _writable(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, to replace an existing file unless asked to."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    return out


def make_dataset(env: str, quality: str, transitions: int, seed: int, out: str | Path, algo: str,
                 progress: bool = True, overwrite: bool = False, policy_path: str | Path | None = None) -> Path:
    """Make one dataset of `quality` (see the module docstring) and write it to `out`. `policy_path`:
    act with this policy (a shipped-format .pt, or a stable-baselines3 PPO snapshot .zip) instead of
    the local behaviour training or, without one, the policy offprune ships."""
    from offprune.data import behaviour

    _check(env, transitions)
    if quality not in QUALITIES:
        raise UserError(f"unknown quality '{quality}' (choose from {', '.join(QUALITIES)})")
    if policy_path is not None and quality not in ("medium", "expert"):
        raise UserError(f"--policy acts for medium or expert data, not {quality}")
    out = _writable(out, overwrite)
    if quality == "random":
        return generate_random(env, transitions, seed, out, progress)
    if quality in ("medium", "expert"):
        policy, provenance = behaviour_policy(env, algo, quality, policy_path)
        policy.seed(seed)
        data = rollout(env, policy.act, transitions, seed, progress)
        return _write(out, env, quality, data, seed, provenance)
    if quality == "medium-replay":
        medium = behaviour.load_policy(env, algo, "medium")
        data = behaviour.replay_until(env, algo, medium.step)
        return _write(out, env, quality, data, seed, _training_provenance(env, algo, medium.step, medium.eval_return))
    # medium-expert: the two files, joined; made first when they are not there
    parts = []
    for part in ("medium", "expert"):
        path = out.with_name(f"{default_name(env, part)}.hdf5")
        if not path.exists():
            make_dataset(env, part, transitions, seed, path, algo, progress)
        parts.append(path)
    return concatenate(parts, out, env, seed)


def behaviour_policy(env: str, algo: str, quality: str, policy_path: str | Path | None = None):
    """(policy with seed() and act(), provenance attributes) for medium or expert data: `policy_path`
    if given, else the local behaviour training of `algo` when one has finished, else the policy
    offprune ships (PPO)."""
    from offprune.data import behaviour, policies

    if policy_path is not None:
        return _policy_from_path(Path(policy_path))
    state = behaviour.read_state(behaviour.behaviour_dir(env, algo))
    if state is not None and state.get("finished"):
        snapshot = behaviour.load_policy(env, algo, quality)
        provenance = _training_provenance(env, algo, snapshot.step, snapshot.eval_return)
        if algo == "ppo":
            return policies.from_sb3_ppo(snapshot.model, snapshot.obs_stats), provenance
        return _SeededSB3(snapshot), provenance
    shipped = policies.shipped(env, quality)
    if shipped is None:
        raise UserError(f"offprune ships no {quality} policy for {env} and there is no finished local training; "
                        f"make one with 'offprune datasets train {env}' or pass --policy PATH")
    return shipped, _card_provenance(shipped.card, policies.shipped_path(env, quality))


class _SeededSB3:
    """A stable-baselines3 snapshot (SAC) sampling from torch's generator seeded per dataset."""

    def __init__(self, snapshot):
        self.snapshot = snapshot

    def seed(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)

    def act(self, obs):
        return self.snapshot.act(obs)


def _policy_from_path(path: Path):
    from offprune.data import behaviour, policies

    if path.suffix == ".pt":
        policy = policies.load(path)
        return policy, _card_provenance(policy.card, path)
    if path.suffix == ".zip" and path.is_file():
        snapshot = behaviour.load_snapshot(path)
        policy = policies.from_sb3_ppo(snapshot.model, snapshot.obs_stats)
        return policy, {"behaviour_policy": f"ppo snapshot {path.name}", "behaviour_algo": "ppo",
                        "behaviour_policy_file": str(path), "behaviour_policy_sha256": policies.sha256_of(path)}
    raise UserError(f"--policy {path}: expected a shipped-format policy (.pt with its .json card) or a "
                    "stable-baselines3 PPO snapshot (.zip)")


def _card_provenance(card: dict, path: Path) -> dict:
    return {
        "behaviour_policy": f"{card.get('algo', 'ppo')} {card.get('env', '')}-{card.get('quality', '')} "
                            f"(step {card.get('step')}, sha256 {str(card.get('sha256'))[:12]})",
        "behaviour_algo": card.get("algo", "ppo"),
        "behaviour_policy_file": path.name,
        "behaviour_policy_sha256": card.get("sha256", ""),
        "behaviour_policy_step": card.get("step", -1),
        "behaviour_training_steps": card.get("training_steps", -1),
        "behaviour_training_seconds": card.get("training_minutes", float("nan")) * 60,
        "behaviour_eval_return": card.get("eval_return_mean", float("nan")),
        "behaviour_eval_episodes": card.get("eval_episodes", -1),
        "behaviour_normalized_score": card.get("eval_normalized_score", float("nan")),
    }


def _training_provenance(env: str, algo: str, step: int, eval_return: float) -> dict:
    from offprune.data import behaviour

    state = behaviour.read_state(behaviour.behaviour_dir(env, algo))
    return {
        "behaviour_policy": f"{algo} snapshot at step {step}",
        "behaviour_algo": algo,
        "behaviour_policy_step": step,
        "behaviour_training_steps": state["steps_done"],
        "behaviour_training_seconds": state["seconds"],
        "behaviour_eval_return": eval_return,
        "behaviour_normalized_score": normalized_score(ENV_OF_FAMILY[env], eval_return),
    }


def concatenate(paths: list[Path], out: Path, env: str, seed: int) -> Path:
    """The arrays of `paths`, in order, in one file (D4RL's medium-expert)."""
    import h5py

    data: dict[str, list] = {}
    attrs = []
    for path in paths:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: data.setdefault(name, []).append(obj[()])
                         if isinstance(obj, h5py.Dataset) and not name.startswith("metadata") else None)
            attrs.append(dict(f.attrs))
    joined = {k: np.concatenate(v) for k, v in data.items()}
    provenance = {"behaviour_policy": " + ".join(str(a.get("behaviour_policy")) for a in attrs),
                  "behaviour_algo": str(attrs[-1].get("behaviour_algo", "")),
                  "joined_from": " + ".join(p.name for p in paths)}
    return _write(out, env, "medium-expert", joined, seed, provenance)


def ensure_default_dataset(name: str, log=print, transitions: int = 10_000) -> None:
    """Make `<env>-random-v5` on first use so a fresh checkout runs without a download."""

    path = datasets_dir() / f"{name}.hdf5"
    env, _, quality = name.partition("-")
    if path.exists() or quality != "random-v5" or env not in ENV_OF_FAMILY:
        return
    log(f"dataset {name} not found: generating {transitions} random-policy transitions into {path}")
    generate_random(env, transitions, seed=0, out=path, progress=False)


def import_minari(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A local Minari dataset folder -> one D4RL-format file (with manifest entry)."""
    from offprune.data.minari_import import read_minari

    out = _writable(out, overwrite)
    arrays, attrs = read_minari(path)
    # Minari does not record behaviour log-probabilities: NaN says "unknown", not "probability 1"
    arrays.setdefault("infos/action_log_probs", np.full(len(arrays["rewards"]), np.nan, np.float32))
    quality = attrs.pop("quality")
    return _write(out, None, quality, arrays, None, {"behaviour_policy": attrs.get("minari_algorithm") or "unknown",
                                                    "behaviour_algo": attrs.get("minari_algorithm") or "unknown", **attrs})
