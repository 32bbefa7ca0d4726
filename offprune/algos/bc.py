"""BC as the pruning paper ran it: the BEAR code base's behaviour cloning.

That BC trains BCQ's conditional VAE on the data's actions (reconstruction + 0.5 KL) and acts by
decoding one action from a clipped latent. BEAR's code also builds and trains an actor and a critic
that BC never uses to act; they would change nothing but the run time, so they are left out here.
The one prunable network is the VAE (encoder + decoder, one global ranking).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from offprune.algos.base import AgentBase
from offprune.data import Batch
from offprune.nets import VAE, adam, optimizer_step
from offprune.prune import PrunableNetwork


@dataclass(frozen=True)
class Config:
    vae_hidden: tuple[int, ...] = (750, 750)  # encoder and decoder widths, as BCQ's VAE
    lr: float = 1e-3  # Adam
    batch_size: int = 100
    act_latent_clip: float = 0.25  # |z| bound when decoding the action to take


class Agent(AgentBase):
    widths = {"vae": ("vae_hidden",)}

    def __init__(self, obs_dim: int, act_dim: int, max_action: float, config: Config, device: torch.device):
        self.config, self.device = config, device
        self.vae = VAE(obs_dim, act_dim, 2 * act_dim, config.vae_hidden, max_action).to(device)
        self.vae_optimizer = adam(self.vae.parameters(), config.lr)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"vae": self.vae_optimizer}

    def prunable_networks(self) -> dict[str, PrunableNetwork]:
        return {"vae": PrunableNetwork(self.vae, lambda b: self.vae.loss(b.observations, b.actions)[0],
                                       output=lambda b: self.vae.synflow_output(b.observations, b.actions))}

    def update_vae(self, batch: Batch) -> dict[str, float]:
        loss, info = self.vae.loss(batch.observations, batch.actions)
        optimizer_step(self.vae_optimizer, loss)
        return {"vae_loss": loss.item(), **info}

    def update(self, batch: Batch) -> dict[str, float]:
        return self.update_vae(batch)

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        state = torch.as_tensor(obs, dtype=torch.float32, device=self.device).reshape(1, -1)
        return self.vae.decode(state, clip=self.config.act_latent_clip).squeeze(0).cpu().numpy()
