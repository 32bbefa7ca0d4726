"""The algorithm contract: everything the training loop and offprune's other commands (storage,
export, speed, plan) use from an algorithm, declared here instead of probed with `hasattr`.

An algorithm module exposes `Config` (a frozen dataclass with `batch_size`, a comment per field)
and `Agent(obs_dim, act_dim, max_action, config, device)`, a subclass of `AgentBase`:

- required: `modules` (every nn.Module whose state a checkpoint keeps), `optimizers`,
  `prunable_networks()`, `update(batch) -> dict[str, float]`, `act(obs) -> action`;
- declared: `sequential` (updates take sequence batches of `Config.seq_len` steps), `targets`
  (target module -> its source module: training-time copies that checkpoints keep but packed
  files leave out), `widths` (prunable network -> the Config fields sizing its hidden layers),
  `act_batch` (rows one `act()` call runs through the networks);
- optional hooks with no-op defaults: `prepare(dataset)` (once, before pruning), `reset()`
  (before each evaluation episode), `evaluation_metrics(sampler, episode_rewards)` (extra result
  columns), and the class method `make_sampler(dataset, config, device, seed)`.

A subclass method whose name is one letter off a hook (`evaluation_metric`, `rest`) raises at
class creation: a misspelt hook would otherwise never be called.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from offprune.data import SequenceSampler, TransitionSampler
from offprune.prune import PrunableNetwork

HOOKS = ("prepare", "reset", "evaluation_metrics", "make_sampler", "prunable_networks", "update", "act",
         "modules", "optimizers", "act_batch", "rows_per_update", "widths", "targets")


class AgentBase:
    sequential: ClassVar[bool] = False  # True: batches are sequences of Config.seq_len steps
    targets: ClassVar[dict[str, str]] = {}  # target module name -> source module name
    # prunable network -> the Config fields (tuples of widths) that size its hidden layers, for the
    # equal-size dense control (--prune small-dense); empty: not available for this algorithm
    widths: ClassVar[dict[str, tuple[str, ...]]] = {}

    config: Any  # the algorithm's Config

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in vars(cls):
            if name.startswith("_") or name in HOOKS:
                continue
            close = difflib.get_close_matches(name, HOOKS, n=1, cutoff=0.85)
            if close:
                raise TypeError(f"{cls.__module__}.{cls.__name__}.{name} looks like a misspelt hook "
                                f"'{close[0]}' (offprune.algos.base.HOOKS)")

    # --- required -----------------------------------------------------------------------------
    @property
    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def prunable_networks(self) -> dict[str, PrunableNetwork]:
        raise NotImplementedError

    def update(self, batch) -> dict[str, float]:
        raise NotImplementedError

    def act(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # --- declared -----------------------------------------------------------------------------
    @property
    def act_batch(self) -> int:
        """Rows one act() call runs through the networks (BCQ decodes several candidates)."""
        return 1

    @property
    def rows_per_update(self) -> int:
        """Rows each layer sees per update: the batch, times the sequence length for sequence algorithms."""
        return self.config.batch_size * (self.config.seq_len if self.sequential else 1)

    # --- optional hooks -----------------------------------------------------------------------
    def prepare(self, dataset) -> None:
        """Once, before pruning (e.g. observation statistics)."""

    def reset(self) -> None:
        """Before each evaluation episode (recurrent agents clear their state)."""

    def evaluation_metrics(self, sampler, episode_rewards: list[np.ndarray]) -> dict[str, float]:
        """Extra result columns at each evaluation."""
        return {}

    @classmethod
    def make_sampler(cls, dataset, config, device: torch.device, seed: int):
        """What `update` samples from: uniform transitions, or sequences for sequence algorithms."""
        if cls.sequential:
            return SequenceSampler(dataset, config.seq_len, device, seed)
        return TransitionSampler(dataset, device, seed)


@torch.no_grad()
def copy_sources_to_targets(agent: AgentBase) -> None:
    """Make every target network a copy of its source again (after the sources' weights changed)."""
    for target, source in agent.targets.items():
        agent.modules[target].load_state_dict(agent.modules[source].state_dict())


def stored_modules(agent: AgentBase) -> dict[str, nn.Module]:
    """The networks an agent needs to act and to keep training: its modules less the targets."""
    return {name: m for name, m in agent.modules.items() if name not in agent.targets}
