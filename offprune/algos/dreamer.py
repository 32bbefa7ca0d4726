"""Offline Dreamer: a world model learned from logged sequences, behaviour learned in imagination.

Dreamer v1 (Hafner et al. 2019, danijar/dreamer) on vector observations, trained only on a
dataset. World model: an MLP encoder, the RSSM (GRU 200, Gaussian stochastic state 30), an MLP
decoder, a reward head and a continuation (not-done) head, trained on reconstruction + reward and
continuation likelihood + KL(posterior || prior) with free nats. v1 had no continuation head (the
DeepMind Control tasks never end); hopper and walker2d episodes end when the robot falls, and
without the head imagination never learns that falling ends the rewards (`continuation=false`
drops it). Behaviour: from every posterior state of the
batch the actor (tanh-Gaussian) imagines `horizon` steps through the prior; the actor maximises
the lambda-return by backpropagating through the model, the value regresses on it.

Offline safeguard (as MOPO / LOMPO / v-d4rl's offline DreamerV2): the prior has an ensemble of
heads; an imagined step's reward is lowered by `penalty` times their disagreement (the std of
the heads' means, averaged over the stochastic dimensions). `penalty` 0 gives plain Dreamer.
By default (`bc_weight` 0.4; 0 gives Dreamer's actor loss) the actor is also pulled towards the
logged actions at the real posterior states, with TD3+BC's normalisation of the return term.

Past Dreamer v1, for stability without an environment: the lambda-return bootstraps from a slowly
updated copy of the value (DreamerV2's target critic; with v1's own value as bootstrap a dense run
on hopper-medium reached values of ~2,800 after 500 updates, where no return exceeds ~540), and
imagined rewards are clipped to the dataset's reward range.

Choices the paper leaves open (it is pixel-based): observations are standardised with the
dataset's mean and std and reconstructed with unit-variance Gaussian likelihood; encoder and
decoder are 2-layer 400-unit ELU MLPs like the heads; each imagined step follows a randomly
chosen prior head; a sequence starts from a zero state and a zero previous action, as an episode
does when acting; evaluation acts with the actor's mode from the posterior mean.

Prunable groups, each scored on its own loss: encoder, rssm (GRU weights included), decoder,
reward (and continuation) on the world-model loss (its KL without the free-nats floor); actor on the imagination objective; value on
the lambda-return regression.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offprune.algos.base import AgentBase
from offprune.data import SequenceBatch, SequenceSampler
from offprune.data.d4rl import OfflineDataset
from offprune.nets import ObsNormalizer, TanhGaussianActor, adam, frozen, mlp, ones_output, optimizer_step, soft_update
from offprune.prune import PrunableNetwork


RECORDED_EPISODES = 100  # latent states of the last episodes acted in, for the imagination gap


@dataclass(frozen=True)
class Config:
    deter: int = 200  # GRU state size
    stoch: int = 30  # Gaussian stochastic state size
    hidden: int = 200  # RSSM hidden layers (input to the GRU, prior and posterior heads)
    embed: int = 200  # encoder output size
    encoder_hidden: tuple[int, ...] = (400, 400)  # ELU MLP (vector observations; Dreamer's is a CNN)
    decoder_hidden: tuple[int, ...] = (400, 400)
    reward_hidden: tuple[int, ...] = (400, 400)  # Dreamer: 2 layers of 400
    value_hidden: tuple[int, ...] = (400, 400, 400)  # Dreamer: 3 layers
    actor_hidden: tuple[int, ...] = (400, 400, 400, 400)  # Dreamer: 4 layers
    continuation: bool = True  # a not-done head discounts imagined steps (v1 had none: DMC never ends; hopper does)
    ensemble: int = 7  # prior heads (offline DreamerV2 / LOMPO use 7)
    penalty: float = 1.0  # imagined reward -= penalty * head disagreement; 0 = plain Dreamer
    # > 0: actor loss = -return / mean|return| + bc_weight * MSE(actor mode, data action); 0 = Dreamer's.
    # 0.4 is TD3+BC's alpha 2.5 (why it is on: benchmarks/README.md, "Defaults chosen by measurement")
    bc_weight: float = 0.4
    min_std: float = 0.1  # of the stochastic state
    free_nats: float = 3.0  # KL below this is not penalised
    kl_scale: float = 1.0
    horizon: int = 15  # imagination steps
    gamma: float = 0.99
    value_target_tau: float = 0.01  # the lambda-return bootstraps from a slowly updated value copy
    clip_imagined_reward: bool = True  # predicted rewards clipped to the dataset's reward range
    lam: float = 0.95  # lambda of the lambda-return
    actor_init_std: float = 5.0  # tanh-Gaussian: softplus-parametrised std starts here
    actor_mean_scale: float = 5.0  # pre-tanh mean squashed to +-this
    model_lr: float = 6e-4
    actor_lr: float = 8e-5
    value_lr: float = 8e-5
    grad_clip: float = 100.0  # global norm, each optimizer
    imag_starts: int = 0  # posterior states imagination starts from (a random subset); 0 = all, as Dreamer
    batch_size: int = 50  # sequences per update
    seq_len: int = 50  # steps per sequence
    holdout_every: int = 10  # every k-th episode is held out to measure the world model
    metric_horizon: int = 15  # open-loop steps for the held-out prediction error (at most seq_len)


# What `--profile` sets for this algorithm on top of the generic profile: the paper's batch
# (50 x 50, imagining from all 2,550 states) is too slow for a CPU quick run (times in the README).
PROFILES = {"quick": {"steps": 2_000, "eval_every": 500, "algo_options": {"batch_size": 8, "imag_starts": 128}}}


class RSSM(nn.Module):
    """Dreamer's recurrent state-space model (Hafner et al. 2019) on embedded vector observations.

    State = (deterministic GRU state h, stochastic Gaussian z). Prior: h_t = GRU(h_t-1, f(z_t-1,
    a_t-1)), z_t ~ p(z | h_t); posterior: z_t ~ q(z | h_t, embed(o_t)). For offline use the prior
    has `ensemble` heads (each trained against the posterior); their disagreement measures how far
    an imagined state is from the data. Std = softplus + min_std, as Dreamer v1. Prunable weights:
    every Linear and the GRU cell's weight_ih / weight_hh.
    """

    def __init__(self, embed_dim: int, act_dim: int, deter: int = 200, stoch: int = 30, hidden: int = 200,
                 min_std: float = 0.1, ensemble: int = 1):
        super().__init__()
        self.deter, self.stoch, self.min_std = deter, stoch, min_std
        self.img_in = nn.Sequential(nn.Linear(stoch + act_dim, hidden), nn.ELU())
        self.cell = nn.GRUCell(hidden, deter)
        self.priors = nn.ModuleList(
            nn.Sequential(nn.Linear(deter, hidden), nn.ELU(), nn.Linear(hidden, 2 * stoch)) for _ in range(ensemble)
        )
        self.posterior = nn.Sequential(nn.Linear(deter + embed_dim, hidden), nn.ELU(), nn.Linear(hidden, 2 * stoch))

    def initial(self, batch: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        return torch.zeros(batch, self.deter, device=device), torch.zeros(batch, self.stoch, device=device)

    def _stats(self, out: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = out.chunk(2, -1)
        return mean, F.softplus(std) + self.min_std

    def prior_stats(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of every prior head: [ensemble, batch, stoch] each."""
        stats = [self._stats(head(h)) for head in self.priors]
        return torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats])

    def img_step(self, h: Tensor, z: Tensor, action: Tensor) -> Tensor:
        """The next deterministic state from the previous state and action."""
        return self.cell(self.img_in(torch.cat([z, action], -1)), h)

    def post_stats(self, h: Tensor, embed: Tensor) -> tuple[Tensor, Tensor]:
        return self._stats(self.posterior(torch.cat([h, embed], -1)))

    def observe(self, embed: Tensor, prev_actions: Tensor, state: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Filter a sequence. embed [B, T, E]: the embedded observations o_0..o_T-1;
        prev_actions [B, T, A]: at step t the action taken before o_t (zeros where o_t starts an
        episode); state: (h, z) before step 0. Returns h, z and the posterior statistics, each
        [B, T, ...], and the prior statistics [ensemble, B, T, stoch]."""
        h, z = state
        out: dict[str, list[Tensor]] = {k: [] for k in ("h", "z", "post_mean", "post_std")}
        for t in range(embed.shape[1]):
            h = self.img_step(h, z, prev_actions[:, t])
            post_mean, post_std = self.post_stats(h, embed[:, t])
            z = post_mean + post_std * torch.randn(post_std.shape, device=post_std.device)
            for k, v in (("h", h), ("z", z), ("post_mean", post_mean), ("post_std", post_std)):
                out[k].append(v)
        stacked = {k: torch.stack(v, 1) for k, v in out.items()}
        # the priors read only h: one call over all steps instead of one per step
        stacked["prior_mean"], stacked["prior_std"] = self.prior_stats(stacked["h"])
        return stacked


def lambda_return(rewards: Tensor, values: Tensor, discounts: Tensor, bootstrap: Tensor, lam: float) -> Tensor:
    """TD(lambda) returns along dim 0 (time), as Dreamer: R_t = r_t + d_t ((1 - lam) v_t+1 + lam R_t+1),
    with v_H = R_H = `bootstrap`. rewards, values, discounts: [H, ...]; bootstrap: [...]. values[t]
    is the value of the state reached before r_t, so v_t+1 = values[t + 1] (bootstrap at the end)."""
    next_values = torch.cat([values[1:], bootstrap.unsqueeze(0)], 0)
    inputs = rewards + discounts * next_values * (1 - lam)
    returns, last = [], bootstrap
    for t in reversed(range(rewards.shape[0])):
        last = inputs[t] + discounts[t] * lam * last
        returns.append(last)
    return torch.stack(returns[::-1], 0)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def _kl_normal(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """KL(q || p) of diagonal Gaussians, summed over the last dimension."""
    var_ratio = (std_q / std_p).pow(2)
    return 0.5 * (var_ratio + ((mean_q - mean_p) / std_p).pow(2) - 1 - var_ratio.log()).sum(-1)


class Agent(AgentBase):
    sequential = True
    targets = {"value_target": "value"}

    @classmethod
    def make_sampler(cls, dataset: OfflineDataset, config: Config, device: torch.device, seed: int) -> SequenceSampler:
        return SequenceSampler(dataset, config.seq_len, device, seed, holdout_every=config.holdout_every)

    def __init__(self, obs_dim: int, act_dim: int, max_action: float, config: Config, device: torch.device):
        self.config, self.device, self.max_action, self.act_dim = config, device, max_action, act_dim
        c = config
        feat = c.deter + c.stoch
        self.normalizer = ObsNormalizer(obs_dim).to(device)
        self.encoder = mlp(obs_dim, c.encoder_hidden, c.embed, nn.ELU).to(device)
        self.rssm = RSSM(c.embed, act_dim, c.deter, c.stoch, c.hidden, c.min_std, c.ensemble).to(device)
        self.decoder = mlp(feat, c.decoder_hidden, obs_dim, nn.ELU).to(device)
        self.reward = mlp(feat, c.reward_hidden, 1, nn.ELU).to(device)
        self.continuation = mlp(feat, c.reward_hidden, 1, nn.ELU).to(device) if c.continuation else None
        self.actor = TanhGaussianActor(feat, act_dim, c.actor_hidden, c.actor_init_std, c.actor_mean_scale).to(device)
        self.value = mlp(feat, c.value_hidden, 1, nn.ELU).to(device)
        self.value_target = copy.deepcopy(self.value)
        # the dataset's reward range (set by `prepare`), kept with the reward head's state
        self.reward.register_buffer("low", torch.tensor(-math.inf, device=device))
        self.reward.register_buffer("high", torch.tensor(math.inf, device=device))
        model_params = [p for m in self.world_model for p in m.parameters()]
        self.model_optimizer = adam(model_params, c.model_lr)
        self.actor_optimizer = adam(self.actor.parameters(), c.actor_lr)
        self.value_optimizer = adam(self.value.parameters(), c.value_lr)
        self.visited: list[list[tuple[Tensor, Tensor]]] = []
        self.reset()

    @property
    def world_model(self) -> list[nn.Module]:
        return [m for m in (self.encoder, self.rssm, self.decoder, self.reward, self.continuation) if m is not None]

    # --- what the generic loop uses ---------------------------------------------------------
    @property
    def modules(self) -> dict[str, nn.Module]:
        mods = {"normalizer": self.normalizer, "encoder": self.encoder, "rssm": self.rssm, "decoder": self.decoder,
                "reward": self.reward, "actor": self.actor, "value": self.value, "value_target": self.value_target}
        return mods | ({"continuation": self.continuation} if self.continuation is not None else {})

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": self.model_optimizer, "actor": self.actor_optimizer, "value": self.value_optimizer}

    def prepare(self, dataset: OfflineDataset) -> None:
        """Observation statistics and reward range of the dataset (once, before pruning)."""
        self.normalizer.fit(torch.as_tensor(dataset.observations, dtype=torch.float32, device=self.device))
        self.reward.low.fill_(float(dataset.rewards.min()))
        self.reward.high.fill_(float(dataset.rewards.max()))

    def prunable_networks(self) -> dict[str, PrunableNetwork]:
        def model_loss(batch: SequenceBatch) -> Tensor:
            # Without the free-nats floor: at initialisation the KL is mostly below 3 nats, and
            # the floor would give every prior weight a zero gradient (SNIP would prune them all).
            return self.world_model_loss(batch, free_nats=False)[0]

        groups = {"encoder": self.encoder, "rssm": self.rssm, "decoder": self.decoder, "reward": self.reward}
        if self.continuation is not None:
            groups["continuation"] = self.continuation
        # SynFlow's outputs: every plain MLP on an all-ones row; the RSSM (a GRU) has none
        networks = {name: PrunableNetwork(module, model_loss, output=None if name == "rssm" else ones_output(module))
                    for name, module in groups.items()}
        networks["actor"] = PrunableNetwork(self.actor, lambda b: self.actor_loss(self._starts(b))[0],
                                            output=ones_output(self.actor.net))
        networks["value"] = PrunableNetwork(self.value, self._value_pruning_loss, (self.value_target,),
                                            ones_output(self.value))
        return networks

    def _value_pruning_loss(self, batch: SequenceBatch) -> Tensor:
        with torch.no_grad():
            trajectory = self.imagine(self._starts(batch))
        return self.value_loss(*trajectory)

    # --- world model ------------------------------------------------------------------------
    def _sequence(self, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Observations o_0..o_T (the last is the final next observation), the action before
        each (zero before o_0), and the step mask, from a batch of T transitions."""
        obs = torch.cat([batch.observations, batch.next_observations[:, -1:]], 1)
        prev_actions = torch.cat([torch.zeros_like(batch.actions[:, :1]), batch.actions], 1)
        mask = torch.cat([batch.mask[:, :1], batch.mask], 1)
        return obs, prev_actions, mask

    def observe(self, batch: SequenceBatch) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        obs, prev_actions, mask = self._sequence(batch)
        target = self.normalizer(obs)
        post = self.rssm.observe(self.encoder(target), prev_actions, self.rssm.initial(obs.shape[0], self.device))
        return post, target, mask

    def world_model_loss(self, batch: SequenceBatch, free_nats: bool = True
                         ) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, float]]:
        """Reconstruction + reward (+ continuation) negative log-likelihood + KL (with free nats)."""
        c = self.config
        post, target, mask = self.observe(batch)
        feat = torch.cat([post["h"], post["z"]], -1)
        obs_nll = _masked_mean(0.5 * (self.decoder(feat) - target).pow(2).sum(-1), mask)
        # the state at step t >= 1 predicts r_t-1, the reward for the action that led to it
        reward_nll = _masked_mean(0.5 * (self.reward(feat[:, 1:]).squeeze(-1) - batch.rewards).pow(2), batch.mask)
        kl = _masked_mean(_kl_normal(post["post_mean"], post["post_std"], post["prior_mean"], post["prior_std"])
                          .mean(0), mask)  # averaged over the prior heads
        loss = obs_nll + reward_nll + c.kl_scale * (kl.clamp_min(c.free_nats) if free_nats else kl)
        info = {"obs_nll": obs_nll.item(), "reward_nll": reward_nll.item(), "kl": kl.item()}
        if self.continuation is not None:
            cont_nll = _masked_mean(F.binary_cross_entropy_with_logits(
                self.continuation(feat[:, 1:]).squeeze(-1), 1.0 - batch.terminals, reduction="none"), batch.mask)
            loss = loss + cont_nll
            info["cont_nll"] = cont_nll.item()
        info["model_loss"] = loss.item()
        return loss, post, mask, info

    def _starts(self, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
        """Posterior states of the batch's real steps, the starts of imagination (no gradient)."""
        with torch.no_grad():
            post, _, mask = self.observe(batch)
        return self._real_states(post, mask)

    def _real_states(self, post: dict[str, Tensor], mask: Tensor) -> tuple[Tensor, Tensor]:
        """(h, z) of every unmasked step, flattened and detached."""
        keep = mask.reshape(-1) > 0
        return (post["h"].detach().reshape(-1, self.config.deter)[keep],
                post["z"].detach().reshape(-1, self.config.stoch)[keep])

    # --- behaviour --------------------------------------------------------------------------
    def prior_step(self, h: Tensor, z: Tensor, action: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """One imagined step: next (h, z), z from a random prior head (or the heads' mean when
        not sampling), and the heads' disagreement at the new state."""
        h = self.rssm.img_step(h, z, action)
        means, stds = self.rssm.prior_stats(h)  # [E, N, stoch]
        disagreement = means.std(0).mean(-1) if means.shape[0] > 1 else torch.zeros_like(h[:, 0])
        if sample:
            head = torch.randint(means.shape[0], (h.shape[0],), device=h.device)
            rows = torch.arange(h.shape[0], device=h.device)
            z = means[head, rows] + stds[head, rows] * torch.randn(stds.shape[1:], device=h.device)
        else:
            z = means.mean(0)
        return h, z, disagreement

    def imagine(self, starts: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Roll the actor through the model for `horizon` steps. Returns the imagined features
        [H, N, F], their lambda-returns [H-1, N] and the weights [H-1, N] of each step (the
        product of earlier discounts, as Dreamer)."""
        c = self.config
        h, z = starts
        if 0 < c.imag_starts < h.shape[0]:
            pick = torch.randperm(h.shape[0], device=h.device)[:c.imag_starts]
            h, z = h[pick], z[pick]
        feats, penalties = [], []
        for _ in range(c.horizon):
            action = self.max_action * self.actor(torch.cat([h, z], -1).detach())
            h, z, disagreement = self.prior_step(h, z, action)
            feats.append(torch.cat([h, z], -1))
            penalties.append(disagreement)
        feat = torch.stack(feats)
        reward = self.reward(feat).squeeze(-1)
        if c.clip_imagined_reward:
            reward = reward.clamp(self.reward.low, self.reward.high)
        reward = reward - c.penalty * torch.stack(penalties)
        value = self.value_target(feat).squeeze(-1)
        if self.continuation is not None:
            discount = c.gamma * torch.sigmoid(self.continuation(feat).squeeze(-1))
        else:
            discount = torch.full_like(reward, c.gamma)
        returns = lambda_return(reward[:-1], value[:-1], discount[:-1], value[-1], c.lam)
        weights = torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-2]], 0), 0).detach()
        return feat, returns, weights

    def actor_loss(self, starts: tuple[Tensor, Tensor], behaviour: tuple[Tensor, Tensor] | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Maximise the lambda-return through the model's dynamics (model and value frozen).

        With `bc_weight` > 0 and `behaviour` (real posterior features, the logged actions), the
        actor also stays near the data's actions, with TD3+BC's normalisation (the return term
        divided by its mean magnitude; TD3+BC's alpha 2.5 is bc_weight 0.4)."""
        with frozen(*self.world_model, self.value_target):
            feat, returns, weights = self.imagine(starts)
        objective = (weights * returns).mean()
        if self.config.bc_weight <= 0 or behaviour is None:
            return -objective, feat, returns, weights
        real_feat, data_actions = behaviour
        imitation = (self.actor(real_feat, deterministic=True) - data_actions / self.max_action).pow(2).mean()
        loss = -objective / returns.abs().mean().detach().clamp_min(1e-6) + self.config.bc_weight * imitation
        return loss, feat, returns, weights

    def value_loss(self, feat: Tensor, returns: Tensor, weights: Tensor) -> Tensor:
        """Regress the value of each imagined state (but the last) on its lambda-return."""
        value = self.value(feat[:-1].detach()).squeeze(-1)
        return (weights * 0.5 * (value - returns.detach()).pow(2)).mean()

    # --- updates ----------------------------------------------------------------------------
    def update_world_model(self, batch: SequenceBatch) -> tuple[dict[str, Tensor], Tensor, dict[str, float]]:
        loss, post, mask, info = self.world_model_loss(batch)
        optimizer_step(self.model_optimizer, loss, self.config.grad_clip)
        return post, mask, info

    def update_actor(self, starts: tuple[Tensor, Tensor], behaviour: tuple[Tensor, Tensor] | None = None
                     ) -> tuple[tuple[Tensor, Tensor, Tensor], dict[str, float]]:
        loss, feat, returns, weights = self.actor_loss(starts, behaviour)
        optimizer_step(self.actor_optimizer, loss, self.config.grad_clip)
        return (feat, returns, weights), {"actor_loss": loss.item(), "imagined_return": returns[0].mean().item()}

    def update_value(self, feat: Tensor, returns: Tensor, weights: Tensor) -> dict[str, float]:
        loss = self.value_loss(feat, returns, weights)
        optimizer_step(self.value_optimizer, loss, self.config.grad_clip)
        soft_update(self.value_target, self.value, self.config.value_target_tau)
        return {"value_loss": loss.item()}

    def update(self, batch: SequenceBatch) -> dict[str, float]:
        post, mask, info = self.update_world_model(batch)
        behaviour = self._behaviour(post, batch) if self.config.bc_weight > 0 else None
        trajectory, actor_info = self.update_actor(self._real_states(post, mask), behaviour)
        return info | actor_info | self.update_value(*trajectory)

    def _behaviour(self, post: dict[str, Tensor], batch: SequenceBatch) -> tuple[Tensor, Tensor]:
        """(posterior feature at o_t, logged a_t) for every real transition of the batch, detached."""
        keep = batch.mask.reshape(-1) > 0
        feat = torch.cat([post["h"][:, :-1], post["z"][:, :-1]], -1).detach()
        return feat.reshape(-1, feat.shape[-1])[keep], batch.actions.reshape(-1, self.act_dim)[keep]

    # --- acting -----------------------------------------------------------------------------
    def reset(self) -> None:
        """Start of an episode: zero latent state and previous action; a new record of the
        visited states (kept for the last `RECORDED_EPISODES`, read by `evaluation_metrics`)."""
        self._h, self._z = self.rssm.initial(1, self.device)
        self._prev_action = torch.zeros(1, self.act_dim, device=self.device)
        self.visited.append([])
        del self.visited[:-RECORDED_EPISODES]

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        o = torch.as_tensor(obs, dtype=torch.float32, device=self.device).reshape(1, -1)
        h = self.rssm.img_step(self._h, self._z, self._prev_action)
        z, _ = self.rssm.post_stats(h, self.encoder(self.normalizer(o)))
        action = self.max_action * self.actor(torch.cat([h, z], -1), deterministic=True)
        self._h, self._z, self._prev_action = h, z, action
        self.visited[-1].append((h, z))
        return action.squeeze(0).cpu().numpy()

    # --- measurements -----------------------------------------------------------------------
    def evaluation_metrics(self, sampler: SequenceSampler, episode_rewards: list[np.ndarray]) -> dict[str, float]:
        """World-model errors on held-out episodes, and the imagined-vs-real return gap on the
        evaluation episodes just played (their rewards; their states were recorded by `act`)."""
        states = self.visited[-len(episode_rewards):] if episode_rewards else []
        return self.model_errors(sampler) | self.imagination_gap(episode_rewards, states)

    @torch.no_grad()
    def model_errors(self, sampler: SequenceSampler, chunks: int = 64) -> dict[str, float]:
        """One-step and open-loop (`metric_horizon` steps, real actions, prior means) prediction
        errors of the standardised observation (MSE per dimension) and of the reward, and the
        KL, on chunks of held-out episodes."""
        batch = sampler.heldout_batch(chunks)
        out = {"heldout_episodes": float(sampler.heldout_episodes)}
        if batch is None:
            return out
        k_max = self.config.metric_horizon
        post, target, mask = self.observe(batch)
        kl = _kl_normal(post["post_mean"], post["post_std"], post["prior_mean"], post["prior_std"]).mean(0)
        out["wm_heldout_kl"] = _masked_mean(kl, mask).item()
        n_starts = batch.actions.shape[1] - k_max + 1
        if n_starts < 1:
            return out
        # from the posterior at every step t <= T - K, roll K steps with the logged actions
        h = post["h"][:, :n_starts].reshape(-1, self.config.deter)
        z = post["z"][:, :n_starts].reshape(-1, self.config.stoch)
        for k in range(1, k_max + 1):
            step = slice(k - 1, k - 1 + n_starts)  # transition t + k - 1 leads to o_t+k
            h, z, _ = self.prior_step(h, z, batch.actions[:, step].reshape(h.shape[0], -1), sample=False)
            if k not in (1, k_max):
                continue
            feat = torch.cat([h, z], -1)
            valid = batch.mask[:, step].reshape(-1)
            obs_err = (self.decoder(feat) - target[:, k:k + n_starts].reshape(feat.shape[0], -1)).pow(2).mean(-1)
            reward_err = (self.reward(feat).squeeze(-1) - batch.rewards[:, step].reshape(-1)).pow(2)
            out[f"wm_obs_mse_{k}"] = _masked_mean(obs_err, valid).item()
            out[f"wm_reward_mse_{k}"] = _masked_mean(reward_err, valid).item()
        return out

    @torch.no_grad()
    def imagination_gap(self, episode_rewards: list[np.ndarray],
                        episode_states: list[list[tuple[Tensor, Tensor]]]) -> dict[str, float]:
        """From every state the evaluation visited (at least `horizon` steps before its end), the
        model's discounted `horizon`-step return of the acting policy minus the real one."""
        c = self.config
        imagined, real = [], []
        for rewards, states in zip(episode_rewards, episode_states):
            n = len(rewards) - c.horizon + 1
            if n < 1:
                continue
            h = torch.cat([s[0] for s in states[:n]])
            z = torch.cat([s[1] for s in states[:n]])
            predicted = torch.zeros(n, device=self.device)
            for k in range(c.horizon):
                action = self.max_action * self.actor(torch.cat([h, z], -1), deterministic=True)
                h, z, _ = self.prior_step(h, z, action, sample=False)
                predicted += c.gamma ** k * self.reward(torch.cat([h, z], -1)).squeeze(-1)
            discounts = c.gamma ** np.arange(c.horizon)
            windows = np.lib.stride_tricks.sliding_window_view(rewards, c.horizon)[:n]
            imagined.append(predicted.cpu().numpy())
            real.append(windows @ discounts)
        if not imagined:
            return {}
        imagined_all, real_all = np.concatenate(imagined), np.concatenate(real)
        return {"imagined_return_h": float(imagined_all.mean()), "real_return_h": float(real_all.mean()),
                "imagined_return_gap": float((imagined_all - real_all).mean())}
