"""Sparse execution: train pruned networks holding only their kept weights.

A pruned Linear becomes a `SparseLinear`: a 1-D parameter of the kept values (CSR order), the
mask's fixed CSR structure (int32) and its transpose, precomputed once, and a dense bias.

    forward       y = (b + W x^T)^T          torch.addmm with a CSR W
    grad input    dx = (W^T dy^T)^T          CSR product with the transposed structure
    grad values   dW only at kept positions  torch.sparse.sampled_addmm(dy^T x) on W's pattern
    grad bias     db = sum_rows dy

Why this shape: on CPU a dense update is compute-bound, and 95% sparsity removes 95% of the
multiply-adds only if no step materialises a dense [out, in] matrix. sampled_addmm computes the
weight gradient at the nnz kept positions only; the transposed structure avoids transposing a CSR
matrix every backward pass. Alternatives measured on this machine (see `offprune speed`): COO
`torch.sparse.mm` is 10-20x slower; gathering x[:, cols] * dy[:, rows] for the weight gradient
allocates [batch, nnz] and is slower than sampled_addmm at batch 100.

Conversion (`convert_to_sparse`) and the way back (`convert_to_dense`) are exact: a converted
agent turned back gives dense masked modules with bit-identical weights.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import Tensor, nn

from offprune.prune.networks import PrunableNetwork

KERNELS = ("auto", "dense", "sparse")


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from its parts, without torch's beta notice on every call."""
    with warnings.catch_warnings():  # torch's notice that sparse CSR support is in beta
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _feature_major(t: Tensor) -> Tensor:
    """t.T as a row-major [features, batch] tensor, copying only when it is not one already.

    MKL's CSR x dense product is ~2x faster with that layout. Consecutive sparse layers hand each
    other exactly this (their output is the .T view of a row-major [out, batch] buffer), so
    inside a network only the first layer's input is copied.
    """
    t_t = t.T
    return t_t if t_t.is_contiguous() else t_t.contiguous()


class _SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, layer):
        weight = csr_tensor(layer.crow, layer.col, values, (layer.out_features, layer.in_features))
        x_t = _feature_major(x)
        ctx.save_for_backward(x_t, values)
        ctx.layer = layer
        return torch.addmm(bias.unsqueeze(1), weight, x_t).T

    @staticmethod
    def backward(ctx, grad_out):
        x_t, values = ctx.saved_tensors
        layer = ctx.layer
        grad_t = _feature_major(grad_out)  # [out, batch], shared by both products below
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight_t = csr_tensor(layer.crow_t, layer.col_t, values[layer.perm_t], (layer.in_features, layer.out_features))
            grad_x = torch.mm(weight_t, grad_t).T
        if ctx.needs_input_grad[1]:
            pattern = csr_tensor(layer.crow, layer.col, torch.zeros_like(values), (layer.out_features, layer.in_features))
            grad_values = torch.sparse.sampled_addmm(pattern, grad_t, x_t.T, beta=0.0).values()
        if ctx.needs_input_grad[2]:
            grad_bias = grad_t.sum(1)
        return grad_x, grad_values, grad_bias, None


class SparseLinear(nn.Module):
    """A Linear layer that stores and trains only the weights its mask keeps."""

    def __init__(self, linear: nn.Linear, mask: Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        mask = mask.to(device=weight.device, dtype=torch.bool)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: CSR order
        counts = torch.bincount(rows, minlength=self.out_features)
        crow = torch.zeros(self.out_features + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.cumsum(counts, 0)
        # The transpose: entries sorted by (col, row); perm_t maps transposed order -> value index.
        perm_t = torch.argsort(cols * self.out_features + rows)
        counts_t = torch.bincount(cols, minlength=self.in_features)
        crow_t = torch.zeros(self.in_features + 1, dtype=torch.int64, device=weight.device)
        crow_t[1:] = torch.cumsum(counts_t, 0)
        self.register_buffer("crow", crow.to(torch.int32))
        self.register_buffer("col", cols.to(torch.int32))
        self.register_buffer("crow_t", crow_t.to(torch.int32))
        self.register_buffer("col_t", rows[perm_t].to(torch.int32))
        self.register_buffer("perm_t", perm_t)
        self.values = nn.Parameter(weight[rows, cols].clone())
        bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(self.out_features)
        self.bias = nn.Parameter(bias.to(weight.device))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        out = _SparseLinearFunction.apply(flat, self.values, self.bias, self)
        return out.reshape(*x.shape[:-1], self.out_features)

    def mask(self) -> Tensor:
        m = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.values.device)
        m[self._rows(), self.col.long()] = True
        return m

    def _rows(self) -> Tensor:
        counts = (self.crow[1:] - self.crow[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.out_features, device=counts.device), counts)

    def to_linear(self) -> nn.Linear:
        """The dense masked Linear with bit-identical weights (+0.0 where pruned)."""
        linear = nn.Linear(self.in_features, self.out_features, device=self.values.device)
        with torch.no_grad():
            linear.weight.zero_()
            linear.weight[self._rows(), self.col.long()] = self.values
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}"


def _linear_names(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, child, new)


@torch.no_grad()
def convert_to_sparse(
    networks: dict[str, PrunableNetwork],
    masks: dict[str, dict[str, Tensor]],
    optimizers,
) -> int:
    """Replace every masked Linear (in each network and its mask copies) by a SparseLinear and
    point the optimizers at the new parameters. Call before any optimizer step (optimizer state
    must be empty). Returns the number of layers converted."""
    replaced: dict[int, nn.Parameter] = {}
    converted = 0
    for name, net in networks.items():
        for module in (net.module, *net.mask_copies):
            for layer_name, linear in _linear_names(module).items():
                mask = masks[name].get(f"{layer_name}.weight")
                if mask is None:
                    continue
                sparse = SparseLinear(linear, mask)
                replaced[id(linear.weight)] = sparse.values
                replaced[id(linear.bias)] = sparse.bias
                _replace(module, layer_name, sparse)
                converted += 1
    for opt in optimizers:
        if opt.state:
            raise RuntimeError("convert_to_sparse must run before the first optimizer step")
        for group in opt.param_groups:
            group["params"] = [replaced.get(id(p), p) for p in group["params"]]
    return converted


def convert_to_dense(module: nn.Module) -> nn.Module:
    """Turn every SparseLinear inside `module` back into a dense masked nn.Linear (in place)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, SparseLinear):
            _replace(module, name, m.to_linear())
    return module


def has_sparse_layers(module: nn.Module) -> bool:
    return any(isinstance(m, SparseLinear) for m in module.modules())


def _train_step_seconds(layer: nn.Module, x: Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        layer(x).sum().backward()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def choose_kernels(
    networks: dict[str, PrunableNetwork],
    masks: dict[str, dict[str, Tensor]],
    batch_size: int,
    repeats: int = 5,
    margin: float = 1.1,
) -> tuple[str, float]:
    """'sparse' if forward + backward of the masked Linear layers measures at least `margin`
    faster sparse than dense at this batch size, else 'dense'; and the measured ratio."""
    dense_s = sparse_s = 0.0
    for name, net in networks.items():
        for layer_name, linear in _linear_names(net.module).items():
            mask = masks[name].get(f"{layer_name}.weight")
            if mask is None:
                continue
            x = torch.randn(batch_size, linear.in_features, device=linear.weight.device, requires_grad=True)
            probe = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device)
            dense_s += _train_step_seconds(probe, x, repeats)
            sparse_s += _train_step_seconds(SparseLinear(linear, mask), x, repeats)
    ratio = dense_s / sparse_s if sparse_s else 0.0
    return ("sparse" if ratio >= margin else "dense"), ratio
