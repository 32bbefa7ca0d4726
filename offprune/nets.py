"""Small building blocks shared by the algorithms: MLPs, BCQ's VAE, soft updates, one optimizer step."""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from offprune import native


class MLP(nn.Sequential):
    """Linear-act-...-Linear. Once `offprune.sparse.convert_to_sparse` has made every Linear a
    SparseLinear it sets `fused_forward`, and the whole stack runs as one fused autograd function
    (one graph node instead of one per layer and activation: the per-layer overhead was a third of
    a sparse BCQ update). Parameter names stay '0.weight', '2.weight', ... (stable mask keys)."""

    fused_forward: Callable[["MLP", Tensor], Tensor] | None = None  # set by offprune.sparse
    # (a(x), b(x)) for two fused MLPs on one input, as one node (`twin_forward`); set by offprune.sparse
    fused_pair: Callable[["MLP", "MLP", Tensor], tuple[Tensor, Tensor]] | None = None

    @property
    def sparse_chain(self) -> bool:
        return self.fused_forward is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_forward is not None:
            return self.fused_forward(self, x)
        return super().forward(x)


def ones_output(module: nn.Module) -> Callable[[object], Tensor]:
    """`PrunableNetwork.output` of a network that is one MLP: its output on one all-ones row, in
    the module's current dtype (SynFlow calls it in float64); the pruning batch is not needed."""
    def output(_batch: object) -> Tensor:  # looked up when called: pruning runs on the dense nn.Linear layers
        in_features = next(m for m in module.modules() if isinstance(m, nn.Linear)).in_features
        p = next(module.parameters())
        return module(torch.ones(1, in_features, dtype=p.dtype, device=p.device))
    return output


def twin_forward(a: MLP, b: MLP, x: Tensor) -> tuple[Tensor, Tensor]:
    """(a(x), b(x)). Two fused sparse chains run as one autograd node, side by side on helper
    threads under `offprune.sparse.sparse_threads(n)`, n >= 2 (the same bits as one by one)."""
    if a.fused_pair is not None and b.fused_pair is a.fused_pair:
        return a.fused_pair(a, b, x)
    return a(x), b(x)


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: type[nn.Module] = nn.ReLU) -> MLP:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), activation()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return MLP(*layers)


PRIOR_CLIP = 0.5  # BCQ's clip of the prior's latent draws when decoding without an encoder


class VAE(nn.Module):
    """BCQ's conditional VAE over actions (Fujimoto et al.): encoder, mean / log-std heads, decoder.

    Once `offprune.sparse.convert_to_sparse` has made every layer a SparseLinear it sets
    `fused_loss`, and `loss` runs as one autograd node (`offprune.sparse_vae`)."""

    # (vae, obs, action, noise) -> (loss, reconstruction MSE, KL); set by offprune.sparse
    fused_loss: Callable[["VAE", Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None

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

    def prior_latent(self, rows: int, device: torch.device, clip: float = PRIOR_CLIP) -> Tensor:
        """A draw from the prior for `rows` decodes, clipped so decoded actions stay near the data."""
        return torch.randn(rows, self.latent_dim, device=device).clamp(-clip, clip)

    def decode(self, obs: Tensor, z: Tensor | None = None, clip: float = PRIOR_CLIP) -> Tensor:
        if z is None:
            z = self.prior_latent(obs.shape[0], obs.device, clip)
        return self.max_action * torch.tanh(self.decoder(torch.cat([obs, z], 1)))

    def synflow_output(self, obs: Tensor, action: Tensor) -> Tensor:
        """SynFlow's output for the VAE (its R is this tensor's sum): two disjoint networks, each
        called on all-ones inputs as the algorithm calls it and normalised by its own path sum.

        The encoder (mean and log-std heads, no clamp) and the decoder (pre-tanh, latent input all
        ones, as when acting from the prior) share no path. Fed the encoder's mean as its latent
        input, the decoder's direct state inputs carry orders of magnitude less flow than the
        paths through the encoder, and SynFlow prunes every one of them (an agent blind to the
        state); summed unnormalised, the part with more flow takes the whole budget over the
        rounds and the other collapses. Divided by their own (constant) sums, each part's layers
        carry a total score of ~1 each, so one global ranking compares them fairly."""
        h = F.relu(self.encoder(torch.cat([obs, action], 1)))
        encoder = torch.cat([self.mean(h), self.log_std(h)], 1)
        decoder = self.decoder(torch.cat([obs, obs.new_ones(obs.shape[0], self.latent_dim)], 1))
        return torch.cat([encoder / encoder.sum().detach(), decoder / decoder.sum().detach()], 1)

    def loss(self, obs: Tensor, action: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Reconstruction MSE + 0.5 KL(q(z|s,a) || N(0, I)), as BCQ."""
        if self.fused_loss is not None and torch.is_grad_enabled():
            # the latent noise drawn as `forward` draws it (same shape, same point in the stream)
            noise = torch.randn(obs.shape[0], self.latent_dim, device=obs.device, dtype=obs.dtype)
            loss, recon_loss, kl = self.fused_loss(self, obs, action, noise)
        else:
            recon, mean, std = self(obs, action)
            recon_loss = F.mse_loss(recon, action)
            kl = -0.5 * (1 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()
            loss = recon_loss + 0.5 * kl
        return loss, {"vae_recon": recon_loss.item(), "vae_kl": kl.item()}


# Raised by every module or parameter registration in the process (an attribute set, add_module,
# register_parameter): a kept parameter list is only reused while it has not changed.
_registrations = 0


def _count_registration(*_args: object) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)

# module -> (registrations when listed, its parameters, each one's owner's parameter dict and name)
_parameter_lists: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def module_parameters(module: nn.Module) -> list[nn.Parameter]:
    """list(module.parameters()), kept from call to call: walking the module tree on every soft
    update cost more than the update. Listed anew after any module or parameter registration
    anywhere, and when a listed parameter is no longer in its owner's dict (one written there
    directly, as torch's own `_apply` may)."""
    kept = _parameter_lists.get(module)
    if kept is not None and kept[0] == _registrations and all(
            owner.get(name) is p for p, (owner, name) in zip(kept[1], kept[2])):
        return kept[1]
    params, slots, seen = [], [], set()
    for m in module.modules():  # the order and de-duplication of module.parameters()
        for name, p in m._parameters.items():
            if p is not None and p not in seen:
                seen.add(p)
                params.append(p)
                slots.append((m._parameters, name))
    _parameter_lists[module] = (_registrations, params, slots)
    return params


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- tau * source + (1 - tau) * target. Pruned zeros stay exactly zero (0*a + 0*b)."""
    torch._foreach_lerp_(module_parameters(target), module_parameters(source), tau)


class FusedAdam(torch.optim.Adam):
    """torch's fused Adam (`fused=True`), stepping through the same kernel with the same inputs
    (the same bits) but without most of its per-call work, which a sparse update notices: torch
    adds 1 to each parameter's step count as a separate small op (five ATen calls per parameter)
    and regroups the tensors on every call. Here the step counts are views of one tensor, raised
    by one op, and the kernel's argument lists are kept from step to step while the parameters,
    their state and the settings stay the same. Anything else (a closure, a parameter without a
    gradient, options the fast path does not cover) takes torch's own step; hooks registered on
    `step` run either way."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr, fused=True)
        self._plan: tuple | None = None
        self._compiled: tuple | None = None  # (plan, library, its AdamPlan)

    def _current_plan(self) -> tuple | None:
        """(params, exp_avgs, exp_avg_sqs, steps, flat steps, kernel options), or None where the
        fast path does not apply. Rebuilt when the parameters, their state or the options change."""
        if len(self.param_groups) != 1:
            return None
        group = self.param_groups[0]
        params = group["params"]
        plan = self._plan
        if (plan is not None and len(plan[0]) == len(params) and all(a is b for a, b in zip(plan[0], params))
                and plan[5] == _fused_options(group)):
            states = [self.state.get(p) for p in params]
            if all(s is not None and s.get("step") is step for s, step in zip(states, plan[3])):
                return plan
        self._plan = plan = self._build_plan(group)
        return plan

    def _build_plan(self, group: dict) -> tuple | None:
        params = list(group["params"])
        options = _fused_options(group)
        if options is None or not params:
            return None
        states = [self.state.get(p) for p in params]
        if any(not s or not isinstance(s.get("step"), Tensor) for s in states):
            return None  # before the first step torch's own creates the state
        if any(p.device.type != "cpu" or p.dtype != torch.float32 or s["step"].dtype != torch.float32
               for p, s in zip(params, states)):
            return None
        flat = torch.stack([s["step"].reshape(()) for s in states])
        steps = list(flat.unbind())
        for s, step in zip(states, steps):
            s["step"] = step
        return params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], steps, flat, options

    def step(self, closure=None):
        """One Adam step; through torch's wrapper (which runs the step hooks and opens a profiler
        range) only when it has something to do: a hook registered or the profiler on. On a
        sparse network the wrapper cost as much as the fused kernel."""
        return self._hooked_step(closure) if self._wrapper_has_work() else self._unhooked_step(closure)

    step.hooked = True  # torch's Optimizer wraps a step without this mark in its wrapper on every call

    def _wrapper_has_work(self) -> bool:
        """A step hook (this optimizer's or a global one) to run, or the profiler's range to open."""
        return bool(self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _global_optimizer_pre_hooks
                    or _global_optimizer_post_hooks or torch.autograd._profiler_enabled())

    @torch.no_grad()
    def _unhooked_step(self, closure=None):
        plan = self._current_plan() if closure is None else None
        grads = [p.grad for p in plan[0]] if plan is not None else None
        if plan is None or any(g is None or g.is_sparse for g in grads):
            # torch's step itself, not its hook-running wrapper: this step's wrapper runs the hooks
            return getattr(torch.optim.Adam.step, "__wrapped__", torch.optim.Adam.step)(self, closure)
        params, exp_avgs, exp_avg_sqs, steps, flat, options = plan
        ext = native.loaded_kernels()
        if ext is not None:  # the step counts raised, then the same kernel, in two halves under sparse_threads(2+)
            ext.fused_adam(params, grads, exp_avgs, exp_avg_sqs, steps, options["lr"], options["beta1"],
                           options["beta2"], options["weight_decay"], options["eps"])
        else:
            flat.add_(1)
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, **options)
        return None

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_unhooked_step)

    def compiled_plan(self, ext) -> object | None:
        """The step as the compiled library's `AdamPlan` (for a whole update run in one call), or
        None where that would not be this step: torch's own step applies, or the wrapper has hooks
        to run or a profiler range to open."""
        if self._wrapper_has_work():
            return None
        plan = self._current_plan()
        if plan is None:
            return None
        if self._compiled is None or self._compiled[0] is not plan or self._compiled[1] is not ext:
            params, exp_avgs, exp_avg_sqs, steps, _, options = plan
            self._compiled = (plan, ext, ext.AdamPlan(params, exp_avgs, exp_avg_sqs, steps, options["lr"],
                                                      options["beta1"], options["beta2"], options["weight_decay"],
                                                      options["eps"]))
        return self._compiled[2]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


def _fused_options(group: dict) -> dict | None:
    """The fused kernel's keyword arguments for a parameter group as torch's Adam passes them, or
    None for settings the fast path leaves to torch (tensor lr, amsgrad, capturable, ...)."""
    if (group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]
            or group.get("decoupled_weight_decay") or not group["fused"]
            or any(isinstance(group[k], Tensor) for k in ("lr", "weight_decay", "eps"))
            or any(isinstance(b, Tensor) for b in group["betas"])):
        return None
    return {"amsgrad": False, "lr": group["lr"], "beta1": group["betas"][0], "beta2": group["betas"][1],
            "weight_decay": group["weight_decay"], "eps": group["eps"], "maximize": False}


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where torch has one for the parameters' device (`FusedAdam`).

    Why fused: Adam's foreach path takes sqrt(exp_avg_sq), and with pruned positions held at
    exactly 0 that sqrt takes a slow path on x86 CPUs, enough to make a masked update slower than
    a dense one. The fused kernel has no such cost (benchmarks/README.md, bench_masked_update.py).
    """
    params = list(params)
    try:
        return FusedAdam(params, lr=lr)
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


def steps_taken(optimizer: torch.optim.Optimizer) -> int:
    """Steps an Adam optimizer has taken (its per-parameter count, which checkpoints carry): what
    a schedule or a delayed update counts from, so a resumed run continues it exactly."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Gradients flow through `modules` to their inputs but not into their parameters (cheaper
    backward, and another network's loss cannot leave gradients in them)."""
    params = [p for m in modules for p in module_parameters(m) if p.requires_grad]
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
    def fit(self, observations: Tensor, add_to_std: float = 0.0) -> None:
        """Mean and std of the observations; `add_to_std` as TD3+BC adds 1e-3 to every std."""
        self.mean.copy_(observations.mean(0))
        self.std.copy_((observations.std(0) + add_to_std).clamp_min(1e-3))  # constant dimensions stay finite

    def forward(self, obs: Tensor) -> Tensor:
        return (obs - self.mean) / self.std


class TwinCritic(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, hidden, 1)
        self.q2 = mlp(obs_dim + act_dim, hidden, 1)

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        return twin_forward(self.q1, self.q2, torch.cat([obs, action], 1))

    def q1_value(self, obs: Tensor, action: Tensor) -> Tensor:
        return self.q1(torch.cat([obs, action], 1))


class TanhPolicy(nn.Module):
    """A deterministic policy: max_action * tanh(MLP(obs)) (BC-MLP; TD3+BC's actor)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], max_action: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden, act_dim)
        self.max_action = max_action

    def forward(self, obs: Tensor) -> Tensor:
        return self.max_action * torch.tanh(self.net(obs))


class TanhGaussianActor(nn.Module):
    """Dreamer v1's action model: Normal(mean_scale * tanh(mu / mean_scale), softplus(s + c) +
    1e-4) squashed by tanh, c chosen so the initial std is `init_std`."""

    def __init__(self, feat_dim: int, act_dim: int, hidden: tuple[int, ...], init_std: float, mean_scale: float):
        super().__init__()
        self.net = mlp(feat_dim, hidden, 2 * act_dim, nn.ELU)
        self.raw_init_std = math.log(math.exp(init_std) - 1)
        self.mean_scale = mean_scale

    def forward(self, feat: Tensor, deterministic: bool = False) -> Tensor:
        mean, std = self.net(feat).chunk(2, -1)
        mean = self.mean_scale * torch.tanh(mean / self.mean_scale)
        if deterministic:
            return torch.tanh(mean)
        std = F.softplus(std + self.raw_init_std) + 1e-4
        return torch.tanh(mean + std * torch.randn(std.shape, device=std.device))
