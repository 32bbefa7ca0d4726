"""TD3+BC: TD3 with a behaviour-cloning term in the actor loss (Fujimoto & Gu 2021).

Follows sfujim/TD3_BC: actor 256-256 (ReLU, max_action * tanh), twin critics 256-256; the critic
target is min(Q1', Q2') at the target actor's action plus clipped Gaussian noise (0.2, clipped at
0.5, both times max_action); the actor and both targets are updated after every 2nd critic update;
actor loss = -lambda * mean Q1(s, pi(s)) + MSE(pi(s), a), lambda = alpha / mean |Q1| (alpha 2.5,
lambda not differentiated); Adam 3e-4, batch 256, discount 0.99, tau 0.005. Observations are
standardised by the dataset's mean and std + 1e-3; the statistics are a module of the agent, so
checkpoints and packed files carry them.

Prunable networks: actor (its target takes its mask) and critic (Q2 and the target copies take
Q1's mask, as BCQ's), each scored on its own loss on the pruning batch. Differences from the
reference: none in the algorithm; the delayed-update counter is the critic optimizer's step count
(so a resumed run keeps the parity), and PyTorch's default initialisation is the reference's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offprune.algos.base import AgentBase
from offprune.data import Batch
from offprune.data.d4rl import OfflineDataset
from offprune.nets import (ObsNormalizer, TanhPolicy, TwinCritic, adam, frozen, ones_output, optimizer_step, soft_update,
                           steps_taken)
from offprune.prune import PrunableNetwork


@dataclass(frozen=True)
class Config:
    actor_hidden: tuple[int, ...] = (256, 256)  # deterministic tanh policy
    critic_hidden: tuple[int, ...] = (256, 256)  # each of the twin Q networks
    alpha: float = 2.5  # weight of the Q term against behaviour cloning (lambda = alpha / mean |Q|)
    policy_noise: float = 0.2  # target policy smoothing noise std, times max_action
    noise_clip: float = 0.5  # its clip, times max_action
    policy_freq: int = 2  # critic updates per actor (and target) update
    discount: float = 0.99
    tau: float = 0.005  # soft target update rate
    lr: float = 3e-4  # Adam, actor and critic
    batch_size: int = 256
    normalize_observations: bool = True  # standardise by the dataset's statistics (the reference's default)


class Agent(AgentBase):
    targets = {"actor_target": "actor", "critic_target": "critic"}
    widths = {"actor": ("actor_hidden",), "critic": ("critic_hidden",)}

    def __init__(self, obs_dim: int, act_dim: int, max_action: float, config: Config, device: torch.device):
        self.config, self.device, self.max_action = config, device, max_action
        self.normalizer = ObsNormalizer(obs_dim).to(device)
        self.actor = TanhPolicy(obs_dim, act_dim, config.actor_hidden, max_action).to(device)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic = TwinCritic(obs_dim, act_dim, config.critic_hidden).to(device)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_optimizer = adam(self.actor.parameters(), config.lr)
        self.critic_optimizer = adam(self.critic.parameters(), config.lr)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"normalizer": self.normalizer, "actor": self.actor, "actor_target": self.actor_target,
                "critic": self.critic, "critic_target": self.critic_target}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_optimizer, "critic": self.critic_optimizer}

    def prepare(self, dataset: OfflineDataset) -> None:
        if self.config.normalize_observations:
            self.normalizer.fit(torch.as_tensor(dataset.observations, dtype=torch.float32, device=self.device),
                                add_to_std=1e-3)

    def prunable_networks(self) -> dict[str, PrunableNetwork]:
        return {
            "actor": PrunableNetwork(self.actor, lambda b: self.actor_loss(self._normalized(b))[0], (self.actor_target,),
                                     ones_output(self.actor.net)),
            "critic": PrunableNetwork(self.critic.q1, lambda b: self.critic_loss(self._normalized(b))[0],
                                      (self.critic.q2, self.critic_target.q1, self.critic_target.q2),
                                      ones_output(self.critic.q1)),
        }

    def _normalized(self, batch: Batch) -> Batch:
        return batch._replace(observations=self.normalizer(batch.observations),
                              next_observations=self.normalizer(batch.next_observations))

    # --- losses -----------------------------------------------------------------------------
    def critic_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        c = self.config
        with torch.no_grad():
            noise = (torch.randn(batch.actions.shape, device=self.device) * c.policy_noise * self.max_action).clamp(
                -c.noise_clip * self.max_action, c.noise_clip * self.max_action)
            next_action = (self.actor_target(batch.next_observations) + noise).clamp(-self.max_action, self.max_action)
            target_q = torch.min(*self.critic_target(batch.next_observations, next_action))
            target_q = batch.rewards + batch.not_done * c.discount * target_q
        q1, q2 = self.critic(batch.observations, batch.actions)
        loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        return loss, {"critic_loss": loss.item(), "q1_mean": q1.mean().item()}

    def actor_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        pi = self.actor(batch.observations)
        q = self.critic.q1_value(batch.observations, pi)
        lmbda = self.config.alpha / q.abs().mean().detach()
        bc = F.mse_loss(pi, batch.actions)
        loss = -lmbda * q.mean() + bc
        return loss, {"actor_loss": loss.item(), "bc_loss": bc.item()}

    # --- updates ----------------------------------------------------------------------------
    def update_critic(self, batch: Batch) -> dict[str, float]:
        loss, info = self.critic_loss(batch)
        optimizer_step(self.critic_optimizer, loss)
        return info

    def update_actor(self, batch: Batch) -> dict[str, float]:
        with frozen(self.critic):  # gradients pass through the critic without touching its weights
            loss, info = self.actor_loss(batch)
            optimizer_step(self.actor_optimizer, loss)
        return info

    def update(self, batch: Batch) -> dict[str, float]:
        batch = self._normalized(batch)
        info = self.update_critic(batch)
        if steps_taken(self.critic_optimizer) % self.config.policy_freq == 0:
            info |= self.update_actor(batch)
            soft_update(self.critic_target, self.critic, self.config.tau)
            soft_update(self.actor_target, self.actor, self.config.tau)
        return info

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        state = self.normalizer(torch.as_tensor(obs, dtype=torch.float32, device=self.device).reshape(1, -1))
        return self.actor(state).squeeze(0).cpu().numpy()
