"""A sparse inference path: torch's CSR kernels only for the layers and batch sizes where they
measure faster than the dense product (`offprune storage --latency`)."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import Tensor, nn

from offprune.checkpoint import stored_networks
from offprune.sparse import csr_times
from offprune.storage import dense_to_csr

class CSRLinear(nn.Module):
    """Inference-only Linear whose weight is a CSR matrix (int32 indices); for training see
    offprune.sparse.SparseLinear.

    kernel 'addmm': y = (b + W x^T)^T through torch.addmm, which takes a CSR weight under
    inference_mode where F.linear with a CSR weight fails. kernel 'bag': the same product as an
    embedding bag over W's rows (offprune.sparse.csr_times), faster from ~10 rows up; at 1 row
    addmm is faster.
    """

    def __init__(self, linear: nn.Linear, kernel: str = "addmm"):
        super().__init__()
        if kernel not in ("addmm", "bag"):
            raise ValueError(f"unknown kernel {kernel!r}")
        self.kernel = kernel
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_csr = dense_to_csr(linear.weight, torch.int32)
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(self.out_features)
        self.bias_column = bias.clone().unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        out = csr_linear(self.kernel, self.weight_csr, self.bias_column, flat)
        return out.reshape(*x.shape[:-1], self.out_features)


def csr_linear(kernel: str, weight_csr: Tensor, bias_column: Tensor, x: Tensor) -> Tensor:
    """x W^T + b for a CSR W and a [batch, in] x, by `kernel` ('addmm' or 'bag')."""
    if kernel == "addmm":
        return torch.addmm(bias_column, weight_csr, x.T).T
    x_t = x.T if x.T.is_contiguous() else x.T.contiguous()
    out = csr_times(weight_csr.crow_indices(), weight_csr.col_indices(), weight_csr.values(), x_t)
    return out.add_(bias_column).T


def _time_call(fn, x: Tensor, repeats: int) -> float:
    """Median seconds per call of fn(x)."""
    times = []
    with torch.inference_mode():
        fn(x)
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def _faster_csr(layer: nn.Linear, batch_size: int, kernels: str, repeats: int) -> CSRLinear | None:
    """The CSR version of `layer` if it should replace it: always ('sparse': the addmm kernel),
    never ('dense'), or ('auto') the fastest of dense, CSR addmm and CSR bag for `batch_size`
    rows, a sparse kernel only when it measures at least 5% faster than dense."""
    if kernels == "dense":
        return None
    if kernels == "sparse":
        return CSRLinear(layer)
    x = torch.randn(batch_size, layer.in_features)
    dense_s = _time_call(layer, x, repeats)
    candidates = [CSRLinear(layer), CSRLinear(layer, "bag")]
    times = [_time_call(c, x, repeats) for c in candidates]
    return candidates[int(np.argmin(times))] if dense_s > 1.05 * min(times) else None


_ACTIVATIONS = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, nn.ELU: torch.nn.functional.elu_}


class InferenceMLP(nn.Module):
    """A frozen nn.Sequential of Linear and activation layers, run in one loop for inference.

    Each Linear runs dense (addmm), CSR addmm or CSR bag, whichever measured fastest for
    `batch_size` rows (kernels='auto'), or all dense / all CSR addmm ('dense' / 'sparse'). One
    loop with in-place activations skips nn.Module call overhead, which dominates when acting on
    a few rows at a time.
    """

    def __init__(self, seq: nn.Sequential, batch_size: int, kernels: str = "auto", repeats: int = 30):
        super().__init__()
        self.steps: list[tuple[str, object, Tensor | None]] = []
        for layer in seq:
            if isinstance(layer, nn.Linear):
                sparse = _faster_csr(layer, batch_size, kernels, repeats)
                if sparse is not None:
                    self.steps.append(("csr" if sparse.kernel == "addmm" else "bag", sparse.weight_csr,
                                       sparse.bias_column))
                else:
                    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features)
                    self.steps.append(("dense", layer.weight.detach().T.clone(), bias.clone()))
            else:
                self.steps.append(("act", _ACTIVATIONS[type(layer)], None))

    @staticmethod
    def supports(module: nn.Module) -> bool:
        return isinstance(module, nn.Sequential) and all(
            isinstance(m, nn.Linear) or type(m) in _ACTIVATIONS for m in module
        )

    @property
    def kernels(self) -> list[str]:
        return [kind for kind, _, _ in self.steps if kind != "act"]

    def forward(self, x: Tensor) -> Tensor:
        for kind, a, b in self.steps:
            if kind == "dense":
                x = torch.addmm(b, x, a)
            elif kind == "act":
                x = a(x)  # in place: x is always a fresh intermediate here
            else:
                x = csr_linear("addmm" if kind == "csr" else "bag", a, b, x)
        return x


def sparsify_for_inference(module: nn.Module, batch_size: int, kernels: str = "auto", repeats: int = 30) -> nn.Module:
    """A copy of `module` for inference: every Linear/activation nn.Sequential becomes an
    InferenceMLP and every other Linear a CSRLinear where that is faster (kernels='auto')."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if InferenceMLP.supports(child):
                setattr(parent, child_name, InferenceMLP(child, batch_size, kernels, repeats))
            elif isinstance(child, nn.Linear):
                sparse = _faster_csr(child, batch_size, kernels, repeats)
                if sparse is not None:
                    setattr(parent, child_name, sparse)
    return module


def sparse_inference_agent(agent, batch_size: int, kernels: str = "auto", repeats: int = 30):
    """A shallow copy of `agent` whose stored networks are converted by sparsify_for_inference.

    Relies on the agent contract that `agent.modules` is keyed by attribute name. The input
    modules are left untouched (they are deep-copied).
    """
    fast = copy.copy(agent)
    for name, module in stored_networks(agent).items():
        setattr(fast, name, sparsify_for_inference(module, batch_size, kernels, repeats))
    return fast


def layer_latency_table(networks: dict[str, nn.Module], batch_sizes=(1, 10, 100), repeats: int = 50):
    """Per network and batch size: seconds for one pass through its Linear layers, dense vs CSR
    (addmm and embedding-bag kernels), and 'auto' (the fastest per layer, what
    sparsify_for_inference picks)."""
    import pandas as pd

    rows = []
    for name, module in networks.items():
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        for batch in batch_sizes:
            dense = addmm = bag = auto = 0.0
            for layer in linears:
                x = torch.randn(batch, layer.in_features)
                d = _time_call(layer, x, repeats)
                a = _time_call(CSRLinear(layer), x, repeats)
                b = _time_call(CSRLinear(layer, "bag"), x, repeats)
                dense, addmm, bag, auto = dense + d, addmm + a, bag + b, auto + min(d, a, b)
            rows.append({"network": name, "batch": batch, "dense_ms": 1e3 * dense, "csr_addmm_ms": 1e3 * addmm,
                         "csr_bag_ms": 1e3 * bag, "auto_ms": 1e3 * auto,
                         "speedup_auto": dense / auto if auto else float("nan")})
    return pd.DataFrame(rows)


def act_latency(agent, obs_dim: int, rounds: int = 5, calls: int = 100, seed: int = 0) -> float:
    """Median seconds per agent.act(obs) over interleavable rounds of `calls` random observations."""
    observations = np.random.default_rng(seed).normal(size=(calls, obs_dim)).astype(np.float32)
    agent.act(observations[0])
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for obs in observations:
            agent.act(obs)
        per_round.append((time.perf_counter() - start) / calls)
    return float(np.median(per_round))


