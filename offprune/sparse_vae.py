"""BCQ's VAE loss as one autograd node over its sparse chains (BC's and BCQ's VAE update).

With sparse layers the products of a VAE update take about half its time; the rest was ~50 small
ops and autograd nodes (heads, clamp, exp, reparameterisation, tanh, MSE, KL and their backward),
each slowed by caches the products had just flushed. Here the whole loss is one node: the forward
and a hand-written backward, in C++ (`vae_loss` in offprune/_chain.cpp) where the chain loops are
built, else in Python (`VAELoss` here, over the chains `offprune.sparse` hands it) with the same
steps. Both take every step on tensors of the same shapes and layouts, exp, log, tanh and the
means through torch, the rest exactly rounded, so they give the same bits; the loss and gradients
agree with torch's autograd of `VAE.loss` to rounding (tests).

Steps, all activations feature-major [features, batch] (`std` = exp(clamp(log_std_raw, -4, 15)),
N = act_dim * batch, M = latent * batch, g = the loss's gradient):
    forward:  h = relu(encoder([obs; action])), z = mean + std * noise, t = tanh(decoder([obs; z])),
              d = max_action * t - action, recon = mean(d * d),
              kl = mean(((log(std * std) + 1) - mean * mean) - std * std) * -0.5, loss = recon + kl * 0.5
    backward: du = ((d * (g * (2/N))) * max_action) * (1 - t * t), dz from the decoder's backward,
              c = (g * 0.5) * (-0.5/M), dmean = dz + mean * (c * -2),
              dstd = dz * noise + ((1 / (std * std) - 1) * std) * (c * 2),
              dlog_std_raw = dstd * std where -4 <= log_std_raw <= 15 else 0,
              dh = the heads' input gradients summed, 0 where h <= 0, then the encoder's backward.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor


class VAEChains(Protocol):
    """A VAE's four chains as the node runs them: 0 encoder, 1 mean head, 2 log-std head, 3 decoder."""

    sizes: list[int]  # layers per chain
    obs_dim: int
    max_action: float

    def forward(self, k: int, x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Chain k on x [batch, in] with its parameters (values_0, bias_0, ...): the output
        ([batch, out] view of a feature-major tensor) and each layer's feature-major input."""
        ...

    def backward(self, k: int, grad_out: Tensor, inputs: Sequence[Tensor], values: Sequence[Tensor],
                 needs: Sequence[bool], needs_x: bool) -> tuple[list[Tensor | None], Tensor | None]:
        """Chain k's parameter gradients and (with needs_x) its input's, from its output's."""
        ...


def _split(sizes: Sequence[int], flat: Sequence, per_layer: int) -> list[Sequence]:
    """`flat` (per_layer entries per layer, chain after chain) cut into the chains' parts."""
    parts, start = [], 0
    for size in sizes:
        parts.append(flat[start:start + per_layer * size])
        start += per_layer * size
    return parts


class VAELoss(torch.autograd.Function):
    """(loss, reconstruction MSE, KL) with torch's ops: the steps in this module's doc."""

    @staticmethod
    def forward(ctx, obs, action, noise, chains: VAEChains, *params):
        params_of = _split(chains.sizes, params, 2)
        h, enc_in = chains.forward(0, torch.cat([obs, action], 1), params_of[0])
        h = h.relu_()
        mean, mean_in = chains.forward(1, h, params_of[1])
        raw, raw_in = chains.forward(2, h, params_of[2])
        mean_t, raw_t, noise_t = mean.T, raw.T, noise.T
        std_t = raw_t.clamp(-4, 15).exp()
        z_t = mean_t + std_t * noise_t
        u, dec_in = chains.forward(3, torch.cat([obs, z_t.T], 1), params_of[3])
        t_t = torch.tanh(u.T)
        d_t = t_t * chains.max_action - action.T
        recon = (d_t * d_t).mean()
        s2_t = std_t * std_t
        kl = (((torch.log(s2_t) + 1) - mean_t * mean_t) - s2_t).mean() * -0.5
        loss = recon + kl * 0.5
        ctx.chains = chains
        ctx.save_for_backward(*enc_in, *mean_in, *raw_in, *dec_in, h, raw_t, mean_t, std_t, s2_t, t_t, d_t, noise_t,
                              *params[0::2])
        ctx.mark_non_differentiable(recon, kl)
        return loss, recon, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _recon_grad, _kl_grad):
        chains: VAEChains = ctx.chains
        saved = ctx.saved_tensors
        count = sum(chains.sizes)
        inputs = _split(chains.sizes, saved[:count], 1)
        h, raw_t, mean_t, std_t, s2_t, t_t, d_t, noise_t = saved[count:count + 8]
        values = _split(chains.sizes, saved[count + 8:], 1)
        needs = _split(chains.sizes, ctx.needs_input_grad[4:], 2)
        grads: list[list[Tensor | None]] = [[] for _ in chains.sizes]

        def backward_of(k: int, grad_t: Tensor, needs_x: bool) -> Tensor | None:
            grads[k], grad_x = chains.backward(k, grad_t.T, inputs[k], values[k], needs[k], needs_x)
            return grad_x

        du_t = ((d_t * (g * (2.0 / d_t.numel()))) * chains.max_action) * (1 - t_t * t_t)
        dz_t = backward_of(3, du_t, True).T[chains.obs_dim:]
        c = (g * 0.5) * (-0.5 / mean_t.numel())
        dm_t = dz_t + mean_t * (c * -2.0)
        ds_t = dz_t * noise_t + ((torch.reciprocal(s2_t) - 1) * std_t) * (c * 2.0)
        dls_t = torch.where((raw_t >= -4) & (raw_t <= 15), ds_t * std_t, 0.0)
        dh = torch.ops.aten.threshold_backward(backward_of(1, dm_t, True) + backward_of(2, dls_t, True), h, 0)
        backward_of(0, dh.T, False)
        return None, None, None, None, *(grad for part in grads for grad in part)
