"""BCQ: batch-constrained deep Q-learning for continuous actions (Fujimoto et al. 2019).

Follows sfujim/BCQ (continuous_BCQ): a VAE models the data's actions, a perturbation actor nudges
decoded actions by at most phi * max_action, twin critics with a soft clipped double-Q target.
Prunable networks: actor, critic (the twin Q2 and the target copies share Q1's mask, as the
pruning paper's theta2 <- copy(theta1)), vae (encoder + decoder, one global ranking).
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
from offprune.nets import VAE, TwinCritic, adam, frozen, mlp, ones_output, optimizer_step, soft_update
from offprune.prune import PrunableNetwork
from offprune.sparse import CandidateTarget, fused_bcq_target, fused_bcq_update, fused_perturbed_q_loss


@dataclass(frozen=True)
class Config:
    actor_hidden: tuple[int, ...] = (400, 300)  # perturbation actor
    critic_hidden: tuple[int, ...] = (400, 300)  # each of the twin Q networks
    vae_hidden: tuple[int, ...] = (750, 750)  # encoder and decoder widths
    phi: float = 0.05  # largest perturbation, as a fraction of max_action
    lmbda: float = 0.75  # weight of min(Q1, Q2) in the target (1 - lmbda on the max)
    discount: float = 0.99
    tau: float = 0.005  # soft target update rate (actor and critic; the VAE has no target)
    lr: float = 1e-3  # Adam, all three networks
    batch_size: int = 100
    target_candidates: int = 10  # decoded actions per next state in the critic target
    act_candidates: int = 10  # decoded actions per state when acting (pruning paper's fork: 10)


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], max_action: float, phi: float):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, hidden, act_dim)
        self.max_action, self.phi = max_action, phi

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        delta = self.phi * self.max_action * torch.tanh(self.net(torch.cat([obs, action], 1)))
        return (action + delta).clamp(-self.max_action, self.max_action)


class Agent(AgentBase):
    targets = {"actor_target": "actor", "critic_target": "critic"}
    widths = {"actor": ("actor_hidden",), "critic": ("critic_hidden",), "vae": ("vae_hidden",)}

    def __init__(self, obs_dim: int, act_dim: int, max_action: float, config: Config, device: torch.device):
        self.config, self.device = config, device
        self.actor = Actor(obs_dim, act_dim, config.actor_hidden, max_action, config.phi).to(device)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic = TwinCritic(obs_dim, act_dim, config.critic_hidden).to(device)
        self.critic_target = copy.deepcopy(self.critic)
        self.vae = VAE(obs_dim, act_dim, 2 * act_dim, config.vae_hidden, max_action).to(device)
        self.actor_optimizer = adam(self.actor.parameters(), config.lr)
        self.critic_optimizer = adam(self.critic.parameters(), config.lr)
        self.vae_optimizer = adam(self.vae.parameters(), config.lr)

    # --- what the generic loop uses ---------------------------------------------------------
    @property
    def modules(self) -> dict[str, nn.Module]:
        return {
            "actor": self.actor,
            "actor_target": self.actor_target,
            "critic": self.critic,
            "critic_target": self.critic_target,
            "vae": self.vae,
        }

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_optimizer, "critic": self.critic_optimizer, "vae": self.vae_optimizer}

    def prunable_networks(self) -> dict[str, PrunableNetwork]:
        return {
            "actor": PrunableNetwork(self.actor, lambda b: self.actor_loss(b)[0], (self.actor_target,),
                                     ones_output(self.actor.net)),
            # Scored on the TD loss; only its Q1 term reaches Q1's weights. Q2 copies Q1's mask.
            "critic": PrunableNetwork(
                self.critic.q1,
                lambda b: self.critic_loss(b)[0],
                (self.critic.q2, self.critic_target.q1, self.critic_target.q2),
                ones_output(self.critic.q1),
            ),
            "vae": PrunableNetwork(self.vae, lambda b: self.vae_loss(b)[0],
                                   output=lambda b: self.vae.synflow_output(b.observations, b.actions)),
        }

    # --- losses -----------------------------------------------------------------------------
    def vae_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        return self.vae.loss(batch.observations, batch.actions)

    def target_numbers(self) -> CandidateTarget:
        return CandidateTarget(self.config.target_candidates, float(self.vae.max_action),
                               self.actor_target.phi * self.actor_target.max_action,
                               float(self.actor_target.max_action), self.config.lmbda, self.config.discount)

    def td_target(self, batch: Batch) -> Tensor:
        """reward + not_done * discount * (the best of `target_candidates` decoded, perturbed next
        actions by lmbda * min(Q1', Q2') + (1 - lmbda) * max(Q1', Q2')); graph-free."""
        return self.target_and_candidates(batch, decode=False)[0]

    def target_and_candidates(self, batch: Batch, decode: bool = True) -> tuple[Tensor, Tensor | None]:
        """`td_target` and (with `decode`) the actor loss's decoded actions for the batch's states,
        their latents drawn in the order the critic and then the actor loss draw them (nothing
        between them draws, and neither update changes the VAE: the same numbers as computing each
        in its loss). With sparse networks and the compiled library, the same steps (the same bits)
        in one call, whose pieces two threads share under sparse_threads(2)."""
        n, lm = self.config.target_candidates, self.config.lmbda
        z = self.vae.prior_latent(batch.next_observations.shape[0] * n, self.device)
        decode_z = self.vae.prior_latent(batch.observations.shape[0], self.device) if decode else None
        numbers = self.target_numbers()
        fused = fused_bcq_target(self.vae.decoder, self.actor_target.net, self.critic_target.q1,
                                 self.critic_target.q2, batch.next_observations, z, batch.rewards, batch.not_done,
                                 numbers, batch.observations if decode else None, decode_z)
        if fused is not None:
            return fused
        next_obs = batch.next_observations.repeat_interleave(n, 0)
        next_action = self.actor_target(next_obs, self.vae.decode(next_obs, z))
        tq1, tq2 = self.critic_target(next_obs, next_action)
        target_q = lm * torch.min(tq1, tq2) + (1.0 - lm) * torch.max(tq1, tq2)
        target_q = target_q.view(-1, n).max(1, keepdim=True).values
        decoded = self.vae.decode(batch.observations, decode_z) if decode else None
        return batch.rewards + batch.not_done * self.config.discount * target_q, decoded

    def critic_loss(self, batch: Batch, target_q: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """The TD loss of both critics; `target_q` computes as `td_target` when not given."""
        if target_q is None:
            with torch.no_grad():
                target_q = self.td_target(batch)
        q1, q2 = self.critic(batch.observations, batch.actions)
        loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        return loss, {"critic_loss": loss.item(), "q1_mean": q1.mean().item()}

    def actor_loss(self, batch: Batch, decoded: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """-Q1 of the perturbed decoded actions; `decoded` (the VAE's actions for the batch's
        states) is drawn and decoded here when not given."""
        if decoded is None:
            with torch.no_grad():
                decoded = self.vae.decode(batch.observations)
        # with sparse networks and the compiled library, the same ops as one node (the same bits)
        loss = fused_perturbed_q_loss(self.actor.net, self.critic.q1, batch.observations, decoded,
                                      self.actor.phi * self.actor.max_action, float(self.actor.max_action))
        if loss is None:
            loss = -self.critic.q1_value(batch.observations, self.actor(batch.observations, decoded)).mean()
        return loss, {"actor_loss": loss.item()}

    # --- updates ----------------------------------------------------------------------------
    def update_vae(self, batch: Batch) -> dict[str, float]:
        loss, info = self.vae_loss(batch)
        optimizer_step(self.vae_optimizer, loss)
        return {"vae_loss": loss.item(), **info}

    def update_critic(self, batch: Batch, target_q: Tensor | None = None) -> dict[str, float]:
        loss, info = self.critic_loss(batch, target_q)
        optimizer_step(self.critic_optimizer, loss)
        return info

    def update_actor(self, batch: Batch, decoded: Tensor | None = None) -> dict[str, float]:
        # The critic only passes gradients through: its weight gradients would be discarded by
        # the next critic update's zero_grad, so they are not computed (same results, less work).
        with frozen(self.critic):
            loss, info = self.actor_loss(batch, decoded)
            optimizer_step(self.actor_optimizer, loss)
        return info

    def update(self, batch: Batch) -> dict[str, float]:
        # with sparse networks and the compiled library, the steps below in one call (the same bits)
        fused = fused_bcq_update(self.vae, self.actor, self.actor_target, self.critic, self.critic_target,
                                 (self.vae_optimizer, self.critic_optimizer, self.actor_optimizer),
                                 self.target_numbers(), self.config.tau, batch)
        if fused is not None:
            return fused
        info = self.update_vae(batch)
        with torch.no_grad():  # both use the VAE just updated
            target_q, decoded = self.target_and_candidates(batch)
        info |= self.update_critic(batch, target_q)
        info |= self.update_actor(batch, decoded)
        soft_update(self.critic_target, self.critic, self.config.tau)
        soft_update(self.actor_target, self.actor, self.config.tau)
        return info

    @property
    def act_batch(self) -> int:
        return self.config.act_candidates

    @torch.inference_mode()  # cheaper per op than no_grad: acting is dominated by small ops
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Decode candidates, perturb them, take the one with the highest Q1."""
        state = torch.as_tensor(obs, dtype=torch.float32, device=self.device).expand(self.config.act_candidates, -1)
        action = self.actor(state, self.vae.decode(state))
        best = self.critic.q1_value(state, action).argmax()
        return action[best].cpu().numpy()
