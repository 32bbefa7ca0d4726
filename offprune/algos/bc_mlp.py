"""BC as most offline-RL libraries run it (CORL): a deterministic MLP regressed on actions by MSE.

Not the pruning paper's BC (that is `bc`, a VAE); kept as the common baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offprune.algos.base import AgentBase
from offprune.data import Batch
from offprune.nets import TanhPolicy, adam, ones_output, optimizer_step
from offprune.prune import PrunableNetwork


@dataclass(frozen=True)
class Config:
    hidden: tuple[int, ...] = (256, 256)  # policy MLP widths (ReLU)
    lr: float = 3e-4  # Adam
    batch_size: int = 256


class Agent(AgentBase):
    widths = {"policy": ("hidden",)}
    def __init__(self, obs_dim: int, act_dim: int, max_action: float, config: Config, device: torch.device):
        self.config, self.device = config, device
        self.policy = TanhPolicy(obs_dim, act_dim, config.hidden, max_action).to(device)
        self.policy_optimizer = adam(self.policy.parameters(), config.lr)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"policy": self.policy}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.policy_optimizer}

    def prunable_networks(self) -> dict[str, PrunableNetwork]:
        return {"policy": PrunableNetwork(self.policy, self.policy_loss, output=ones_output(self.policy.net))}

    def policy_loss(self, batch: Batch) -> Tensor:
        return F.mse_loss(self.policy(batch.observations), batch.actions)

    def update_policy(self, batch: Batch) -> dict[str, float]:
        loss = self.policy_loss(batch)
        optimizer_step(self.policy_optimizer, loss)
        return {"policy_loss": loss.item()}

    def update(self, batch: Batch) -> dict[str, float]:
        return self.update_policy(batch)

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        state = torch.as_tensor(obs, dtype=torch.float32, device=self.device).reshape(1, -1)
        return self.policy(state).squeeze(0).cpu().numpy()
