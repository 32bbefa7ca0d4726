"""Small D4RL-format datasets rolled out in gymnasium v5 environments.

Only the `random` quality lives here (uniform random actions, D4RL's `-random` recipe); it needs
no trained behaviour policy, so tests and the quick start can make data in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

import offprune
from offprune.data.d4rl import ENV_OF_FAMILY, normalized_score, write_d4rl_file
from offprune.envs import env_versions, make_env
from offprune.errors import UserError

QUALITIES = ("random",)


def default_name(env: str, quality: str) -> str:
    # '-v5' marks data offprune rolled out in gymnasium v5 (D4RL's own files end in -v0/-v1/-v2).
    return f"{env}-{quality}-v5"


def generate_random(env: str, transitions: int, seed: int, out: str | Path, progress: bool = True) -> Path:
    """Roll out a uniform random policy for `transitions` steps and write a D4RL-format file."""
    if env not in ENV_OF_FAMILY:
        raise UserError(f"unknown env '{env}' (choose from {', '.join(ENV_OF_FAMILY)})")
    if transitions < 2:
        raise UserError("--transitions must be at least 2")
    env_id = ENV_OF_FAMILY[env]
    gym_env = make_env(env_id)
    space = gym_env.action_space
    rng = np.random.default_rng(seed)
    obs_dim = gym_env.observation_space.shape[0]
    act_dim = space.shape[0]
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
    # Uniform density over the action box, as a behaviour policy's log-probability.
    log_prob = -float(np.sum(np.log(space.high - space.low)))
    returns, episode_return, episode = [], 0.0, 0
    obs, _ = gym_env.reset(seed=seed)
    for t in tqdm(range(transitions), desc=f"rolling out {env_id}", disable=not progress, unit="step"):
        action = rng.uniform(space.low, space.high).astype(np.float32)
        data["infos/qpos"][t] = unwrapped.data.qpos
        data["infos/qvel"][t] = unwrapped.data.qvel
        next_obs, reward, terminated, truncated, _ = gym_env.step(action)
        last = t == transitions - 1
        data["observations"][t] = obs
        data["actions"][t] = action
        data["next_observations"][t] = next_obs
        data["rewards"][t] = reward
        data["terminals"][t] = terminated
        # The final, unfinished episode is cut by the dataset's end: a time-limit cut, not terminal.
        data["timeouts"][t] = (truncated or last) and not terminated
        data["infos/action_log_probs"][t] = log_prob
        episode_return += float(reward)
        if terminated or truncated:
            returns.append(episode_return)
            episode_return, episode = 0.0, episode + 1
            obs, _ = gym_env.reset(seed=seed + episode)
        else:
            obs = next_obs
    gym_env.close()
    if not returns:  # one unfinished episode: report its partial return
        returns.append(episode_return)

    mean_return = float(np.mean(returns))
    attrs = {
        "env_id": env_id,
        "quality": "random",
        "behaviour_policy": "uniform random",
        "seed": seed,
        "episodes": len(returns),
        "return_mean": mean_return,
        "return_std": float(np.std(returns)),
        "normalized_score": normalized_score(env_id, mean_return),
        "offprune_version": offprune.__version__,
        **{f"{k}_version": v for k, v in env_versions().items()},
    }
    data["metadata/algorithm"] = np.array("random")
    return write_d4rl_file(out, data, attrs)


def ensure_default_dataset(name: str, log=print, transitions: int = 10_000) -> None:
    """Make `<env>-random-v5` on first use so a fresh checkout runs without a download."""
    from offprune.data.d4rl import datasets_dir

    path = datasets_dir() / f"{name}.hdf5"
    env, _, quality = name.partition("-")
    if path.exists() or quality != "random-v5" or env not in ENV_OF_FAMILY:
        return
    log(f"dataset {name} not found: generating {transitions} random-policy transitions into {path}")
    generate_random(env, transitions, seed=0, out=path, progress=False)
