"""Small building blocks shared by the algorithms: MLPs, BCQ's VAE, soft updates, one optimizer step."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Linear-act-...-Linear. Once `offprune.sparse.convert_to_sparse` has made every Linear a
    SparseLinear it sets `sparse_chain`, and the whole stack runs as one fused autograd function
    (one graph node instead of one per layer and activation: the per-layer overhead was a third of
    a sparse BCQ update). Parameter names stay '0.weight', '2.weight', ... (stable mask keys)."""

    sparse_chain: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if self.sparse_chain:
            from offprune.sparse import chain_forward, chain_parts  # offprune.sparse builds on this module

            return chain_forward(*chain_parts(self), x)
        return super().forward(x)


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: type[nn.Module] = nn.ReLU) -> MLP:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), activation()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return MLP(*layers)


class VAE(nn.Module):
    """BCQ's conditional VAE over actions (Fujimoto et al.): encoder, mean / log-std heads, decoder."""

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int, hidden: Sequence[int], max_action: float):
        super().__init__()
        self.encoder = mlp(obs_dim + act_dim, hidden[:-1], hidden[-1])
        self.mean = nn.Linear(hidden[-1], latent_dim)
        self.log_std = nn.Linear(hidden[-1], latent_dim)
        self.decoder = mlp(obs_dim + latent_dim, hidden, act_dim)
        self.latent_dim = latent_dim
        self.max_action = max_action

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = F.relu(self.encoder(torch.cat([obs, action], 1)))
        mean = self.mean(h)
        log_std = self.log_std(h).clamp(-4, 15)  # BCQ's clamp keeps exp() finite
        std = log_std.exp()
        # By shape, not randn_like: the noise must not depend on std's memory layout (sparse
        # layers return transposed views), or dense and sparse kernels would draw different z.
        z = mean + std * torch.randn(std.shape, device=std.device, dtype=std.dtype)
        return self.decode(obs, z), mean, std

    def decode(self, obs: Tensor, z: Tensor | None = None, clip: float = 0.5) -> Tensor:
        if z is None:  # sample the prior, clipped so decoded actions stay near the data
            z = torch.randn(obs.shape[0], self.latent_dim, device=obs.device).clamp(-clip, clip)
        return self.max_action * torch.tanh(self.decoder(torch.cat([obs, z], 1)))

    def loss(self, obs: Tensor, action: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction MSE + 0.5 KL(q(z|s,a) || N(0, I)), as BCQ."""
        recon, mean, std = self(obs, action)
        recon_loss = F.mse_loss(recon, action)
        kl = -0.5 * (1 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()
        return recon_loss + 0.5 * kl, {"vae_recon": recon_loss.item(), "vae_kl": kl.item()}


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- tau * source + (1 - tau) * target. Pruned zeros stay exactly zero (0*a + 0*b)."""
    target_params = list(target.parameters())
    torch._foreach_lerp_(target_params, list(source.parameters()), tau)


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where torch has one for the parameters' device.

    Why fused: Adam's foreach path takes sqrt(exp_avg_sq), and with pruned positions held at
    exactly 0 that sqrt runs ~6x slower on x86 CPUs (a slow path for zero inputs), making a
    95%-masked BC update ~15-20% slower than dense. The fused kernel has no such cost (and is
    faster for dense nets too); see benchmarks/bench_masked_update.py.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # no fused kernel for this device / dtype
        return torch.optim.Adam(params, lr=lr)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, clip_norm: float | None = None) -> None:
    """zero_grad, backward, (clip the global gradient norm), step. Masks are enforced by hooks on
    `optimizer.step` (prune.enforce); the clip sees gradients before pruned positions are zeroed,
    so with masked dense layers its norm slightly overcounts (sparse layers have no such entries)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Gradients flow through `modules` to their inputs but not into their parameters (cheaper
    backward, and another network's loss cannot leave gradients in them)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class ObsNormalizer(nn.Module):
    """Standardises observations with the dataset's mean and std (buffers: saved with the model)."""

    def __init__(self, obs_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("std", torch.ones(obs_dim))

    @torch.no_grad()
    def fit(self, observations: Tensor) -> None:
        self.mean.copy_(observations.mean(0))
        self.std.copy_(observations.std(0).clamp_min(1e-3))  # constant dimensions stay finite

    def forward(self, obs: Tensor) -> Tensor:
        return (obs - self.mean) / self.std


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
