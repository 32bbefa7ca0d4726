"""IQL: implicit Q-learning (Kostrikov et al. 2021).

Follows ikostrikov/implicit_q_learning (its MuJoCo configuration): twin Q 256-256, value 256-256,
Gaussian policy 256-256 with a tanh mean and a state-independent log-std (initialised at 0,
clipped to [-5, 2]). One update, in the reference's order: the value by expectile regression
(expectile 0.7) on min(Q1', Q2') of the target critic at the data action; the policy by
advantage-weighted regression, weights exp(3.0 * (min(Q1', Q2') - V)) clipped at 100, on the new
value; the critic to r + 0.99 * not_done * V(s') with the new value; the target critic by soft
update (tau 0.005). Adam 3e-4 for all three, the policy's learning rate on a cosine decay over
1M updates (the reference's fixed horizon); batch 256. Rewards are scaled as the reference does
for locomotion: divided by the spread of the dataset's episode returns (max - min), times 1000.
Acting takes the policy's mean. `deterministic_actor=true` is CORL's MuJoCo setting instead: the
same network's tanh mean regressed on the data actions by advantage-weighted squared error.

Prunable networks: actor, critic (Q2 and the target copies take Q1's mask), value, each scored
on its own loss on the pruning batch. Differences from the reference: PyTorch's default
initialisation (the reference: orthogonal), as CORL's IQL; the decay counts the policy
optimizer's steps, so a resumed run continues it exactly; the reward scale is computed from
the dataset in `prepare` and kept in a buffer of the value module (checkpoints carry it).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from offprune.algos.base import AgentBase
from offprune.data import Batch
from offprune.data.d4rl import OfflineDataset
from offprune.nets import TwinCritic, adam, mlp, ones_output, optimizer_step, soft_update, steps_taken
from offprune.prune import PrunableNetwork


@dataclass(frozen=True)
class Config:
    actor_hidden: tuple[int, ...] = (256, 256)  # Gaussian policy
    critic_hidden: tuple[int, ...] = (256, 256)  # each of the twin Q networks
    value_hidden: tuple[int, ...] = (256, 256)
    expectile: float = 0.7  # of the value regression (weight 0.7 above V, 0.3 below)
    temperature: float = 3.0  # inverse temperature of the advantage weights
    max_weight: float = 100.0  # advantage weights are clipped here
    log_std_min: float = -5.0  # the policy's log-std clip
    log_std_max: float = 2.0
    discount: float = 0.99
    tau: float = 0.005  # soft update of the target critic
    lr: float = 3e-4  # Adam, all three networks
    actor_decay_steps: int = 1_000_000  # cosine decay of the policy's learning rate to 0 over this many updates
    reward_scale: bool = True  # divide rewards by the dataset's episode-return spread, times 1000 (locomotion)
    # False: the Gaussian policy (ikostrikov); True: CORL's MuJoCo setting, the tanh mean regressed on the
    # data actions by advantage-weighted squared error (its log-std is then unused)
    deterministic_actor: bool = False
    batch_size: int = 256


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """mean of |expectile - 1(diff < 0)| * diff^2: an asymmetric square (diff = target - prediction)."""
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return (weight * diff.pow(2)).mean()


def cosine_decay(step: int, horizon: int) -> float:
    """Factor on the learning rate at update `step` (0 first): 1 -> 0 over `horizon` updates."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, horizon) / horizon))


def return_spread(dataset: OfflineDataset) -> float:
    """max - min of the dataset's episode returns (episodes end at terminals and timeouts)."""
    starts = dataset.episode_starts if len(dataset.episode_starts) else np.array([0])
    returns = np.add.reduceat(dataset.rewards.astype(np.float64), starts)
    return float(returns.max() - returns.min())


class GaussianPolicy(nn.Module):
    """N(max_action * tanh(MLP(obs)), exp(log_std)) with one log-std per action dimension."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], max_action: float,
                 log_std_range: tuple[float, float]):
        super().__init__()
        self.net = mlp(obs_dim, hidden, act_dim)
        self.log_std = nn.Parameter(torch.zeros(act_dim))
        self.max_action, self.log_std_range = max_action, log_std_range

    def mean(self, obs: Tensor) -> Tensor:
        return self.max_action * torch.tanh(self.net(obs))

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        log_std = self.log_std.clamp(*self.log_std_range)
        return torch.distributions.Normal(self.mean(obs), log_std.exp()).log_prob(actions).sum(-1, keepdim=True)


class ValueNetwork(nn.Module):
    def __init__(self, obs_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim, hidden, 1)
        self.register_buffer("reward_scale", torch.ones(()))  # set by Agent.prepare; travels with checkpoints

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs)


class Agent(AgentBase):
    targets = {"critic_target": "critic"}
    widths = {"actor": ("actor_hidden",), "critic": ("critic_hidden",), "value": ("value_hidden",)}

    def __init__(self, obs_dim: int, act_dim: int, max_action: float, config: Config, device: torch.device):
        self.config, self.device, self.max_action = config, device, max_action
        self.actor = GaussianPolicy(obs_dim, act_dim, config.actor_hidden, max_action,
                                    (config.log_std_min, config.log_std_max)).to(device)
        self.critic = TwinCritic(obs_dim, act_dim, config.critic_hidden).to(device)
        self.critic_target = copy.deepcopy(self.critic)
        self.value = ValueNetwork(obs_dim, config.value_hidden).to(device)
        self.actor_optimizer = adam(self.actor.parameters(), config.lr)
        self.critic_optimizer = adam(self.critic.parameters(), config.lr)
        self.value_optimizer = adam(self.value.parameters(), config.lr)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "critic": self.critic, "critic_target": self.critic_target, "value": self.value}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_optimizer, "critic": self.critic_optimizer, "value": self.value_optimizer}

    def prepare(self, dataset: OfflineDataset) -> None:
        if self.config.reward_scale:
            self.value.reward_scale.fill_(1000.0 / max(return_spread(dataset), 1e-6))

    def prunable_networks(self) -> dict[str, PrunableNetwork]:
        return {
            "actor": PrunableNetwork(self.actor, lambda b: self.actor_loss(b)[0], output=ones_output(self.actor.net)),
            "critic": PrunableNetwork(self.critic.q1, lambda b: self.critic_loss(self._scaled(b))[0],
                                      (self.critic.q2, self.critic_target.q1, self.critic_target.q2),
                                      ones_output(self.critic.q1)),
            "value": PrunableNetwork(self.value, lambda b: self.value_loss(b)[0], output=ones_output(self.value.net)),
        }

    def _scaled(self, batch: Batch) -> Batch:
        return batch._replace(rewards=batch.rewards * self.value.reward_scale)

    # --- losses -----------------------------------------------------------------------------
    def _target_q(self, batch: Batch) -> Tensor:
        with torch.no_grad():
            return torch.min(*self.critic_target(batch.observations, batch.actions))

    def value_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        v = self.value(batch.observations)
        loss = expectile_loss(self._target_q(batch) - v, self.config.expectile)
        return loss, {"value_loss": loss.item(), "v_mean": v.mean().item()}

    def actor_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad():
            advantage = self._target_q(batch) - self.value(batch.observations)
            weights = torch.exp(self.config.temperature * advantage).clamp(max=self.config.max_weight)
        if self.config.deterministic_actor:
            fit = -(self.actor.mean(batch.observations) - batch.actions).pow(2).sum(-1, keepdim=True)
        else:
            fit = self.actor.log_prob(batch.observations, batch.actions)
        loss = -(weights * fit).mean()
        return loss, {"actor_loss": loss.item(), "advantage_mean": advantage.mean().item()}

    def critic_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad():
            target = batch.rewards + self.config.discount * batch.not_done * self.value(batch.next_observations)
        q1, q2 = self.critic(batch.observations, batch.actions)
        loss = ((q1 - target).pow(2) + (q2 - target).pow(2)).mean()
        return loss, {"critic_loss": loss.item(), "q1_mean": q1.mean().item()}

    # --- updates (the reference's order) ----------------------------------------------------
    def update_value(self, batch: Batch) -> dict[str, float]:
        loss, info = self.value_loss(batch)
        optimizer_step(self.value_optimizer, loss)
        return info

    def update_actor(self, batch: Batch) -> dict[str, float]:
        factor = cosine_decay(steps_taken(self.actor_optimizer), self.config.actor_decay_steps)
        for group in self.actor_optimizer.param_groups:
            group["lr"] = self.config.lr * factor
        loss, info = self.actor_loss(batch)
        optimizer_step(self.actor_optimizer, loss)
        return info

    def update_critic(self, batch: Batch) -> dict[str, float]:
        loss, info = self.critic_loss(batch)
        optimizer_step(self.critic_optimizer, loss)
        return info

    def update(self, batch: Batch) -> dict[str, float]:
        batch = self._scaled(batch)
        info = self.update_value(batch)
        info |= self.update_actor(batch)
        info |= self.update_critic(batch)
        soft_update(self.critic_target, self.critic, self.config.tau)
        return info

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        state = torch.as_tensor(obs, dtype=torch.float32, device=self.device).reshape(1, -1)
        return self.actor.mean(state).squeeze(0).cpu().numpy()
