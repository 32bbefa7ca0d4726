"""Uniform minibatches of transitions, held on the training device once."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from offprune.data.d4rl import OfflineDataset


class Batch(NamedTuple):
    observations: torch.Tensor  # [B, obs_dim]
    actions: torch.Tensor  # [B, act_dim]
    rewards: torch.Tensor  # [B, 1]
    next_observations: torch.Tensor  # [B, obs_dim]
    not_done: torch.Tensor  # [B, 1]: 0 after a real termination, 1 otherwise (timeouts too)


class TransitionSampler:
    """Samples with replacement from a numpy Generator whose state is saved in checkpoints."""

    def __init__(self, dataset: OfflineDataset, device: torch.device | str, seed: int):
        def put(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=torch.float32, device=device)

        self.observations = put(dataset.observations)
        self.actions = put(dataset.actions)
        self.rewards = put(dataset.rewards).unsqueeze(1)
        self.next_observations = put(dataset.next_observations)
        self.not_done = put(1.0 - dataset.terminals.astype(np.float32)).unsqueeze(1)
        self.size = len(dataset)
        self.device = torch.device(device)
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> Batch:
        idx = torch.from_numpy(self.rng.integers(0, self.size, size=batch_size)).to(self.device)
        return Batch(
            self.observations[idx],
            self.actions[idx],
            self.rewards[idx],
            self.next_observations[idx],
            self.not_done[idx],
        )

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
