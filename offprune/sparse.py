"""Sparse execution: train pruned networks holding only their kept weights.

A pruned Linear becomes a `SparseLinear`: a 1-D parameter of the kept values (CSR order), the
mask's fixed CSR structure and its transpose, precomputed once, and a dense bias. Activations
travel feature-major ([features, batch], row-major), so that a row of the activation is one
input feature over the whole batch:

    forward       y^T = W x^T + b        embedding_bag over W's rows (sum of value * x^T[col])
    grad input    dx^T = W^T dy^T        embedding_bag over the transposed structure
    grad values   dW only at kept positions: torch.sparse.sampled_addmm(dy^T x) on W's pattern
    grad bias     db = sum over the batch of dy

Why this shape: on CPU a dense update is compute-bound, and 95% sparsity removes 95% of the
multiply-adds only if no step materialises a dense [out, in] matrix. A CSR row times a
feature-major activation is exactly an embedding bag (rows of the activation gathered by column
index, weighted by the values, summed per output row), and PyTorch's CPU embedding_bag (FBGEMM)
runs it ~2x faster than MKL's CSR x dense product (`torch.addmm` with a CSR weight) at batch
10-1000, one thread (measured here, BCQ's 750x750 layer at 8% density, batch 1000: 3.1 ms vs
6.1 ms; dense 13.4 ms). The same kernel with the transposed structure gives the input gradient
(0.32 ms vs 0.54 ms for the CSR product at batch 100). sampled_addmm computes the weight
gradient at the nnz kept positions only (gathering x[:, cols] * dy[:, rows] allocates
[nnz, batch] and is ~20x slower; letting autograd differentiate embedding_bag is ~5x slower).
COO `torch.sparse.mm` is slower than all of these.

Conversion (`convert_to_sparse`) and the way back (`convert_to_dense`) are exact: a converted
agent turned back gives dense masked modules with bit-identical weights.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offprune.prune.enforce import MaskEnforcer
from offprune.prune.networks import PrunableNetwork

KERNELS = ("auto", "dense", "sparse")

# torch warns that sparse CSR support is in beta on every CSR construction; the CSR tensors built
# here are internal and checked by the tests, so the notice says nothing to the user.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix from its parts, without validating them again (they come from a mask)."""
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _feature_major(t: Tensor) -> Tensor:
    """t.T as a row-major [features, batch] tensor, copying only when it is not one already.

    Consecutive sparse layers hand each other exactly this (their output is the .T view of a
    row-major [out, batch] buffer), so inside a network only the first layer's input is copied.
    """
    t_t = t.T
    return t_t if t_t.is_contiguous() else t_t.contiguous()


# Wide activations (BCQ's critic target decodes 1,000 candidates: a [750, 1000] activation is
# 3 MB) are multiplied in blocks of 128 columns, so the rows a block gathers stay in L2 cache:
# BCQ's 750x750 layer at 8% density, batch 1000, took 2.2 ms instead of 2.9 ms here. Block
# widths that are not a multiple of 16 floats measured slower than no blocking at all.
# Columns are independent, so the result is bit-identical.
BLOCK_COLUMNS = 128


def csr_times(crow: Tensor, col: Tensor, values: Tensor, x_t: Tensor) -> Tensor:
    """W @ x_t for a CSR W (crow, col, values) and a row-major [in, batch] x_t: [out, batch]."""
    batch = x_t.shape[1]
    if batch <= 2 * BLOCK_COLUMNS:
        return F.embedding_bag(col, x_t, crow, mode="sum", per_sample_weights=values, include_last_offset=True)
    out = x_t.new_empty(len(crow) - 1, batch)
    for start in range(0, batch, BLOCK_COLUMNS):
        block = x_t[:, start:start + BLOCK_COLUMNS].contiguous()
        out[:, start:start + BLOCK_COLUMNS] = F.embedding_bag(col, block, crow, mode="sum", per_sample_weights=values,
                                                              include_last_offset=True)
    return out


def _sparse_linear(x: Tensor, values: Tensor, bias: Tensor, layer: "SparseLinear") -> tuple[Tensor, Tensor]:
    """The forward product: (y as a [batch, out] view of a feature-major buffer, x_t)."""
    x_t = _feature_major(x)
    if layer.product == "csr":
        return csr_times(layer.crow, layer.col, values, x_t).add_(bias.unsqueeze(1)).T, x_t
    return torch.addmm(bias.unsqueeze(1), layer.dense_weight(values), x_t).T, x_t


class _SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, layer):
        out, x_t = _sparse_linear(x, values, bias, layer)
        ctx.save_for_backward(x_t, values)
        ctx.layer = layer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_t, values = ctx.saved_tensors
        layer = ctx.layer
        grad_t = _feature_major(grad_out)  # [out, batch], shared by both products below
        grad_x = grad_values = grad_bias = None
        if layer.product == "csr":
            if ctx.needs_input_grad[0]:
                grad_x = csr_times(layer.crow_t, layer.col_t, values[layer.perm_t], grad_t).T
            if ctx.needs_input_grad[1]:
                pattern = csr_tensor(layer.crow, layer.col, layer.pattern_values, (layer.out_features, layer.in_features))
                grad_values = torch.sparse.sampled_addmm(pattern, grad_t, x_t.T, beta=0.0).values()
        else:  # small layer: the dense [out, in] products are cheaper than any sparse bookkeeping
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(layer.dense_weight(values).T, grad_t).T
            if ctx.needs_input_grad[1]:
                grad_values = torch.mm(grad_t, x_t.T).view(-1)[layer.flat_index]
        if ctx.needs_input_grad[2]:
            grad_bias = grad_t.sum(1)
        return grad_x, grad_values, grad_bias, None


class SparseLinear(nn.Module):
    """A Linear layer that stores and trains only the weights its mask keeps.

    `product` is how it multiplies: 'csr' (embedding-bag kernels over the kept weights) or
    'dense' (the kept weights scattered into a dense matrix for each product: for layers too
    small for sparse kernels to pay). Either way only the kept values are parameters, and
    activations stay feature-major, so a network can mix both without transposing between layers.
    """

    def __init__(self, linear: nn.Linear, mask: Tensor, product: str = "csr"):
        super().__init__()
        if product not in ("csr", "dense"):
            raise ValueError(f"unknown product {product!r}")
        self.product = product
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
        # sampled_addmm needs a CSR pattern; with beta=0 its values are never read
        self.register_buffer("pattern_values", torch.zeros(len(rows), device=weight.device), persistent=False)
        self.register_buffer("flat_index", rows * self.in_features + cols, persistent=False)
        self.values = nn.Parameter(weight[rows, cols].clone())
        bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(self.out_features)
        self.bias = nn.Parameter(bias.to(weight.device))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and (flat.requires_grad or self.values.requires_grad or self.bias.requires_grad):
            out = _SparseLinearFunction.apply(flat, self.values, self.bias, self)
        else:  # no autograd graph to build (targets, acting): skip autograd.Function's overhead (~30 us)
            out = _sparse_linear(flat, self.values.detach(), self.bias.detach(), self)[0]
        return out.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self, values: Tensor) -> Tensor:
        """The [out, in] weight with `values` at the kept positions and +0.0 elsewhere.

        Built anew for every product: caching it by the values' version counter is unsafe
        because fused Adam updates parameters in place without bumping that counter."""
        flat = values.new_zeros(self.out_features * self.in_features)
        return flat.index_copy(0, self.flat_index, values).view(self.out_features, self.in_features)

    def mask(self) -> Tensor:
        flat = torch.zeros(self.out_features * self.in_features, dtype=torch.bool, device=self.values.device)
        return flat.index_fill_(0, self.flat_index, True).view(self.out_features, self.in_features)

    def to_linear(self) -> nn.Linear:
        """The dense masked Linear with bit-identical weights (+0.0 where pruned)."""
        linear = nn.Linear(self.in_features, self.out_features, device=self.values.device)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight(self.values))
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}, "
                f"product={self.product}")


def _linear_names(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, child, new)


# Which product each converted layer uses. Measured here (one thread, batch 100, forward +
# backward): a CSR (embedding-bag) layer costs ~0.2 ms fixed per update plus ~3x dense BLAS's
# time per kept multiply-add, so small layers (BCQ's 14-wide inputs, 1- to 6-wide output heads)
# and layers denser than ~1/3 are faster multiplied as dense matrices. The rule is fixed, not
# measured per run, so a run's kernels (and so its exact floating-point results) do not depend
# on the machine's load.
MIN_CSR_WEIGHTS = 16_384  # in_features * out_features below this: dense product
MAX_CSR_DENSITY = 0.25  # a layer keeping more than this fraction: dense product


def product_for(mask: Tensor) -> str:
    """'csr' or 'dense': how a SparseLinear with this mask multiplies."""
    csr = mask.numel() >= MIN_CSR_WEIGHTS and float(mask.float().mean()) <= MAX_CSR_DENSITY
    return "csr" if csr else "dense"


@torch.no_grad()
def convert_to_sparse(
    networks: dict[str, PrunableNetwork],
    masks: dict[str, dict[str, Tensor]],
    optimizers,
    product: str | None = None,
) -> dict[str, dict[str, str]]:
    """Replace every masked Linear (in each network and its mask copies) by a SparseLinear and
    point the optimizers at the new parameters. Call before any optimizer step (optimizer state
    must be empty). `product` forces 'csr' or 'dense' for every layer (default: `product_for`).
    Returns, per network, each converted weight's product."""
    replaced: dict[int, nn.Parameter] = {}
    products: dict[str, dict[str, str]] = {name: {} for name in networks}
    for name, net in networks.items():
        for module in (net.module, *net.mask_copies):
            for layer_name, linear in _linear_names(module).items():
                pname = f"{layer_name}.weight"
                mask = masks[name].get(pname)
                if mask is None:
                    continue
                products[name][pname] = product or product_for(mask)
                sparse = SparseLinear(linear, mask, products[name][pname])
                replaced[id(linear.weight)] = sparse.values
                replaced[id(linear.bias)] = sparse.bias
                _replace(module, layer_name, sparse)
    for opt in optimizers:
        if opt.state:
            raise RuntimeError("convert_to_sparse must run before the first optimizer step")
        for group in opt.param_groups:
            group["params"] = [replaced.get(id(p), p) for p in group["params"]]
    return products


def apply_masks(
    networks: dict[str, PrunableNetwork],
    masks: dict[str, dict[str, Tensor]],
    optimizers,
    kernels: str,
) -> dict[str, dict[str, str]]:
    """Make training keep the masks: the one call a training loop makes after pruning.

    'dense': masked weights stay dense matrices, held at zero by a MaskEnforcer. 'sparse': every
    masked Linear becomes a SparseLinear (its zeros are structural). Returns, per network, each
    masked weight's kernel: 'dense', or the SparseLinear product 'csr' / 'dense-product'."""
    optimizers = list(optimizers)
    products: dict[str, dict[str, str]] = {name: {} for name in masks}
    if kernels == "sparse":
        products = convert_to_sparse(networks, masks, optimizers)
    # what stays dense (all of it, or the weights SparseLinear cannot hold, e.g. a GRU's) is
    # held at zero by the enforcer
    rest = {net: {p: m for p, m in layer.items() if p not in products[net]} for net, layer in masks.items()}
    MaskEnforcer(networks, rest, optimizers)
    return {net: {p: {"csr": "csr", "dense": "dense-product"}[products[net][p]] if p in products[net] else "dense"
                  for p in layer_masks} for net, layer_masks in masks.items()}


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
            sparse_s += _train_step_seconds(SparseLinear(linear, mask, product_for(mask)), x, repeats)
    ratio = dense_s / sparse_s if sparse_s else 0.0
    return ("sparse" if ratio >= margin else "dense"), ratio
