"""Uniform minibatches of transitions, held on the training device once."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from offprune.data.d4rl import OfflineDataset
from offprune.errors import UserError


def _on_device(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float32, device=device)


class Batch(NamedTuple):
    observations: torch.Tensor  # [B, obs_dim]
    actions: torch.Tensor  # [B, act_dim]
    rewards: torch.Tensor  # [B, 1]
    next_observations: torch.Tensor  # [B, obs_dim]
    not_done: torch.Tensor  # [B, 1]: 0 after a real termination, 1 otherwise (timeouts too)


class TransitionSampler:
    """Samples with replacement from a numpy Generator whose state is saved in checkpoints."""

    def __init__(self, dataset: OfflineDataset, device: torch.device | str, seed: int):
        self.observations = _on_device(dataset.observations, device)
        self.actions = _on_device(dataset.actions, device)
        self.rewards = _on_device(dataset.rewards, device).unsqueeze(1)
        self.next_observations = _on_device(dataset.next_observations, device)
        self.not_done = _on_device(1.0 - dataset.terminals.astype(np.float32), device).unsqueeze(1)
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


class SequenceBatch(NamedTuple):
    """Chunks of consecutive transitions from single episodes, [B, T, ...]; step t of a row is the
    transition (o_t, a_t, r_t, o_t+1). Rows from episodes shorter than T are padded after their
    end with zeros and `mask` 0."""

    observations: torch.Tensor  # [B, T, obs_dim]
    actions: torch.Tensor  # [B, T, act_dim]
    rewards: torch.Tensor  # [B, T]
    next_observations: torch.Tensor  # [B, T, obs_dim]
    terminals: torch.Tensor  # [B, T]: 1 where the episode really ended (not a time limit)
    mask: torch.Tensor  # [B, T]: 1 for real steps, 0 for padding


def episode_ends(dataset: OfflineDataset) -> np.ndarray:
    """Indices of the last transition of every episode: a termination, a time limit, a transition
    whose next observation is not the following row's observation (older D4RL files drop the
    timeout step, so only this shows the cut), and the final row."""
    cut = dataset.terminals | dataset.timeouts
    cut[:-1] |= (dataset.next_observations[:-1] != dataset.observations[1:]).any(1)
    cut[-1] = True
    return np.flatnonzero(cut)


class SequenceSampler:
    """Uniform over every chunk start that keeps a chunk of `seq_len` inside one episode, plus the
    first step of every episode shorter than `seq_len` (padded and masked, never dropped), so
    chunks never cross an episode boundary. The numpy Generator's state goes into checkpoints.

    With `holdout_every` = k (and at least k episodes), every k-th episode is held out: never
    sampled for training, and served by `heldout_batch` for measuring a model on unseen data."""

    def __init__(self, dataset: OfflineDataset, seq_len: int, device: torch.device | str, seed: int,
                 holdout_every: int = 0):
        if seq_len < 1:
            raise UserError(f"--seq-len must be at least 1, got {seq_len}")
        ends = episode_ends(dataset)
        begins = np.concatenate([[0], ends[:-1] + 1])
        heldout = np.zeros(len(ends), dtype=bool)
        if holdout_every > 1 and len(ends) >= holdout_every:
            heldout[holdout_every - 1::holdout_every] = True
        lengths = ends - begins + 1
        if lengths[~heldout].max() < seq_len:
            raise UserError(f"every episode of {dataset.name} is shorter than the sequence length {seq_len} "
                            f"(longest: {lengths.max()} steps); pass a shorter --seq-len")
        self.starts, self.valid = _chunks(begins[~heldout], ends[~heldout], seq_len)
        self.heldout_starts, self.heldout_valid = _chunks(begins[heldout], ends[heldout], seq_len)
        self.heldout_episodes = int(heldout.sum())
        self.seq_len, self.device = seq_len, torch.device(device)
        self.observations = _on_device(dataset.observations, device)
        self.actions = _on_device(dataset.actions, device)
        self.rewards = _on_device(dataset.rewards, device)
        self.next_observations = _on_device(dataset.next_observations, device)
        self.terminals = _on_device(dataset.terminals.astype(np.float32), device)
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> SequenceBatch:
        pick = self.rng.integers(0, len(self.starts), size=batch_size)
        return self._gather(self.starts[pick], self.valid[pick])

    def heldout_batch(self, batch_size: int) -> SequenceBatch | None:
        """The same chunks at every call (evenly spaced over the held-out episodes); None if none."""
        if self.heldout_episodes == 0:
            return None
        pick = np.unique(np.linspace(0, len(self.heldout_starts) - 1, batch_size).round().astype(int))
        return self._gather(self.heldout_starts[pick], self.heldout_valid[pick])

    def _gather(self, starts: np.ndarray, valid: np.ndarray) -> SequenceBatch:
        offsets = np.arange(self.seq_len)
        mask_np = offsets[None, :] < valid[:, None]
        idx_np = starts[:, None] + np.minimum(offsets[None, :], valid[:, None] - 1)
        idx = torch.from_numpy(idx_np).to(self.device)
        mask = torch.from_numpy(mask_np).to(self.device, torch.float32)

        def take(t: torch.Tensor) -> torch.Tensor:
            out = t[idx]
            return out * mask.view(*mask.shape, *([1] * (out.dim() - 2)))

        return SequenceBatch(take(self.observations), take(self.actions), take(self.rewards),
                             take(self.next_observations), take(self.terminals), mask)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def _chunks(begins: np.ndarray, ends: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Every chunk start inside the episodes [begins, ends] (one per episode shorter than
    seq_len), and the steps available from each start without leaving its episode."""
    if len(begins) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lengths = ends - begins + 1
    per_episode = np.maximum(lengths - seq_len + 1, 1)
    starts = np.concatenate([b + np.arange(k) for b, k in zip(begins, per_episode)])
    valid = np.minimum(np.repeat(ends + 1, per_episode) - starts, seq_len)
    return starts, valid
