"""Rollouts in gymnasium MuJoCo and D4RL normalised scores."""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np

from offprune.data.d4rl import normalized_score


def rollouts(act: Callable[[np.ndarray], np.ndarray], env: gym.Env, episodes: int, seed: int,
             reset: Callable[[], None] | None = None) -> list[np.ndarray]:
    """The reward of every step of each episode. Episode i starts from reset(seed=seed + i), so
    every evaluation of a run sees the same start states and differences come from the policy
    alone. `reset` (if given) is called before each episode: recurrent agents clear their state."""
    episode_rewards = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        if reset is not None:
            reset()
        rewards, done = [], False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            rewards.append(float(reward))
            done = terminated or truncated
        episode_rewards.append(np.asarray(rewards))
    return episode_rewards


def evaluate(act: Callable[[np.ndarray], np.ndarray], env: gym.Env, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted return of each episode (see `rollouts`)."""
    return returns_of(rollouts(act, env, episodes, seed))


def returns_of(episode_rewards: list[np.ndarray]) -> np.ndarray:
    return np.array([r.sum() for r in episode_rewards])


def summarize(returns: np.ndarray, env_id: str) -> dict[str, float]:
    scores = np.array([normalized_score(env_id, r) for r in returns])
    return {
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "normalized_score": float(scores.mean()),
        "normalized_score_std": float(scores.std()),
    }
