"""Rollouts in gymnasium MuJoCo and D4RL normalised scores."""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np

from offprune.data.d4rl import normalized_score


def evaluate(act: Callable[[np.ndarray], np.ndarray], env: gym.Env, episodes: int, seed: int) -> np.ndarray:
    """Undiscounted return of each episode. Episode i starts from reset(seed=seed + i), so every
    evaluation of a run sees the same start states and differences come from the policy alone."""
    returns = np.zeros(episodes)
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            returns[i] += float(reward)
            done = terminated or truncated
    return returns


def summarize(returns: np.ndarray, env_id: str) -> dict[str, float]:
    scores = np.array([normalized_score(env_id, r) for r in returns])
    return {
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "normalized_score": float(scores.mean()),
        "normalized_score_std": float(scores.std()),
    }
