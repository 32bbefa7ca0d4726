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
runs it faster than MKL's CSR x dense product (`torch.addmm` with a CSR weight) at batch 10-1000;
the same kernel with the transposed structure gives the input gradient. sampled_addmm computes the
weight gradient at the kept positions only (gathering x[:, cols] * dy[:, rows] allocates
[nnz, batch]; letting autograd differentiate embedding_bag is slower too). COO `torch.sparse.mm`
is slower than all of these. The measurements behind these choices are in benchmarks/README.md.

Fusion: a network's Linear-activation-...-Linear stack (`offprune.nets.MLP`, ReLU or ELU) runs as
ONE autograd function whose backward walks the layers itself (activation gradients from the saved
outputs), and a lone SparseLinear is a chain of one: per-layer autograd and module machinery was
a third of a sparse BCQ update at 95 % before fusion.

Compiled loops: where offprune.native has built its C++ library (on first use; it needs a C++
compiler), a chain's forward pass and backward body run as one C++ call each, with a CSR product of
its own that accumulates exactly as the embedding bag does and weight-gradient dot products that
add up exactly as sampled_addmm does (checked against torch when the library loads); a training
chain is then an autograd node of the library's own (`chains_apply`; twin critics' two chains as
one node, computed side by side on helper threads), so no Python runs per call. BCQ's critic
target (decoder, target actor and target critics on 1,000 candidates, graph-free, with the actor
loss's decoded actions) and its actor loss are one compiled call each (`fused_bcq_target`,
`fused_perturbed_q_loss`), taking the ops BCQ's Python steps take, and BCQ's whole update strings
these pieces together in one call (`fused_bcq_update`), without Python between them. The results
are bit-identical to the Python loops below (`_SparseChainFunction`) and steps, which run wherever
the library is not there.

Conversion (`convert_to_sparse`) and the way back (`convert_to_dense`) are exact: a converted
agent turned back gives dense masked modules with bit-identical weights.
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offprune import native
from offprune.nets import MLP, PRIOR_CLIP, VAE, FusedAdam, module_parameters
from offprune.prune.enforce import MaskEnforcer
from offprune.prune.networks import PrunableNetwork
from offprune.sparse_vae import VAELoss

# auto: a fixed rule from layer shapes and densities (`kernels_by_rule`), so the same command
# computes the same thing whatever the machine's load; measure: time both on this machine (the
# choice is recorded and a resume keeps it).
KERNELS = ("auto", "dense", "sparse", "measure")

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
# 3 MB) are multiplied in blocks of 128 columns, so the rows a block gathers stay in L2 cache
# (block widths not a multiple of 16 floats lose). Columns are independent, so the result is
# bit-identical. Inside one product (the Python loops' `csr_times`) blocking pays only where each
# input row is gathered many times (nnz / in_features); BCQ's 400x300 layers at 95 % lose from it,
# so they are not blocked. Graph-free chains wider than 2 blocks run in row blocks through the
# whole chain instead (`_wide_chain_pass`), which pays for every chain once compiled.
BLOCK_COLUMNS = 128
BLOCK_MIN_REUSE = 24  # kept weights per input feature from which wide products are blocked


def _block_rows(rows: int) -> int:
    """The rows per block a graph-free pass of `rows` rows takes (`_wide_chain_pass`): all of a
    narrow batch, BLOCK_COLUMNS of a wide one. Compiled calls that block a pass keep to it."""
    return rows if rows <= 2 * BLOCK_COLUMNS else BLOCK_COLUMNS


def _bag(x_t: Tensor, col: Tensor, crow: Tensor, values: Tensor) -> Tensor:
    # torch.embedding_bag directly: F.embedding_bag's argument checks cost time on every call
    return torch.embedding_bag(x_t, col, crow, False, 0, False, values, True)[0]  # mode 0 = sum


def _reuses_rows(col: Tensor, in_features: int) -> bool:
    """Whether a product gathers each input row often enough for blocking to pay."""
    return len(col) >= BLOCK_MIN_REUSE * in_features


def csr_times(crow: Tensor, col: Tensor, values: Tensor, x_t: Tensor) -> Tensor:
    """W @ x_t for a CSR W (crow, col, values) and a row-major [in, batch] x_t: [out, batch]."""
    batch = x_t.shape[1]
    if batch <= 2 * BLOCK_COLUMNS or not _reuses_rows(col, x_t.shape[0]):
        return _bag(x_t, col, crow, values)
    out = x_t.new_empty(len(crow) - 1, batch)
    for start in range(0, batch, BLOCK_COLUMNS):
        block = x_t[:, start:start + BLOCK_COLUMNS]  # a strided view: the kernel reads rows in place
        out[:, start:start + BLOCK_COLUMNS] = _bag(block, col, crow, values)
    return out


# How a masked Linear multiplies: one name per layer, used by the code, the CLI's output and the
# `kernel` column of layers.parquet.
LAYER_KERNELS = {
    "dense": "a dense masked weight (nn.Linear); the mask enforcer holds its pruned weights at zero",
    "dense-product": "only the kept values are stored; each product scatters them into a dense matrix",
    "csr": "only the kept values are stored; products are embedding bags over the CSR rows",
    "csr-addmm": "only the kept values are stored; the forward product is torch's CSR addmm (fastest at "
                 "batch 1, for inference), the backward as 'csr'",
}
SPARSE_KERNELS = ("csr", "csr-addmm", "dense-product")  # the kernels of a SparseLinear


class SparseLinear(nn.Module):
    """A Linear layer that stores and trains only the weights its mask keeps.

    `kernel` is how it multiplies (LAYER_KERNELS): 'csr', 'csr-addmm' or 'dense-product'. Either
    way only the kept values are parameters, and activations stay feature-major, so a network can
    mix kernels without transposing between layers. `freeze()` (inference copies) keeps the
    product's weight built once instead of rebuilding it from the values for every product.
    """

    def __init__(self, linear: nn.Linear, mask: Tensor, kernel: str = "csr"):
        super().__init__()
        if kernel not in SPARSE_KERNELS:
            raise ValueError(f"unknown kernel {kernel!r} (one of {', '.join(SPARSE_KERNELS)})")
        self.kernel = kernel
        self.frozen_weight: Tensor | None = None
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
        self._pattern: Tensor | None = None
        self.register_buffer("flat_index", rows * self.in_features + cols, persistent=False)
        self.values = nn.Parameter(weight[rows, cols].clone())
        bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(self.out_features)
        self.bias = nn.Parameter(bias.to(weight.device))

    def pattern(self) -> Tensor:
        """The mask as a CSR tensor (values unused), for sampled_addmm. Built once per device:
        constructing a CSR tensor inside backward is slow (torch raises its 'beta' warning, which
        the autograd engine replays through Python)."""
        if self._pattern is None or self._pattern.device != self.crow.device:
            self._pattern = csr_tensor(self.crow, self.col, self.pattern_values, (self.out_features, self.in_features))
        return self._pattern

    def __getstate__(self) -> dict:
        # copies and pickles leave out the cached pattern: it is rebuilt on use, and a CSR tensor
        # cannot be deep-copied
        return {**self.__dict__, "_pattern": None}

    def forward(self, x: Tensor) -> Tensor:
        return chain_forward((self,), None, x)

    def product_weight(self, values: Tensor) -> Tensor:
        """The weight this layer's non-'csr' forward product multiplies by: dense ('dense-product')
        or a CSR tensor ('csr-addmm'); built once by `freeze()`, else from `values` every time."""
        if self.frozen_weight is not None:
            return self.frozen_weight
        if self.kernel == "csr-addmm":
            return csr_tensor(self.crow, self.col, values, (self.out_features, self.in_features))
        return self.dense_weight(values)

    def freeze(self) -> "SparseLinear":
        """For inference: the values will not change, so build the product's weight once."""
        self.frozen_weight = None
        with torch.no_grad():
            self.frozen_weight = self.product_weight(self.values.detach().clone())
        return self

    def dense_weight(self, values: Tensor) -> Tensor:
        """The [out, in] weight with `values` at the kept positions and +0.0 elsewhere.

        Built anew for every product: caching it by the values' version counter is unsafe
        because fused Adam updates parameters in place without bumping that counter."""
        flat = values.new_zeros(self.out_features * self.in_features)
        return flat.index_copy_(0, self.flat_index, values).view(self.out_features, self.in_features)

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
                f"kernel={self.kernel}")


# --- fused chains: a whole Linear-activation-...-Linear stack as one autograd function ---------

# Activations a chain can fuse: applied in place on the layer's output, differentiated from that
# output (both are exact for these two: relu'(x) = [y > 0], elu'(x) = y + alpha where y <= 0).
CHAIN_ACTIVATIONS = (nn.ReLU, nn.ELU)


ChainLayer = Union["SparseLinear", nn.Linear]


def chain_supported(mlp: nn.Sequential, dense_layers: bool = False) -> bool:
    """True for Linear-act-...-Linear stacks whose Linears are all SparseLinear (or, with
    `dense_layers`, SparseLinear or nn.Linear: inference copies) and whose activations are
    identical instances of one of CHAIN_ACTIVATIONS (the chain applies the first one's settings,
    e.g. ELU's alpha, everywhere)."""
    layers, acts = list(mlp)[0::2], list(mlp)[1::2]
    linear_types = (SparseLinear, nn.Linear) if dense_layers else (SparseLinear,)
    return (len(mlp) % 2 == 1 and all(isinstance(m, linear_types) for m in layers)
            and all(isinstance(a, CHAIN_ACTIVATIONS) and type(a) is type(acts[0])
                    and getattr(a, "alpha", None) == getattr(acts[0], "alpha", None) for a in acts))


def chain_parts(mlp: nn.Sequential) -> tuple[list[ChainLayer], nn.Module | None]:
    """The chain's layers and its activation (slicing the Sequential would build a new module)."""
    modules = list(mlp._modules.values())
    return modules[0::2], (modules[1] if len(modules) > 1 else None)


def _activate_(y: Tensor, act: nn.Module) -> Tensor:
    return y.relu_() if isinstance(act, nn.ReLU) else F.elu_(y, act.alpha)


def _activation_grad(grad: Tensor, y: Tensor, act: nn.Module) -> Tensor:
    if isinstance(act, nn.ReLU):
        return torch.ops.aten.threshold_backward(grad, y, 0)
    return torch.ops.aten.elu_backward(grad, act.alpha, 1, 1, True, y)


def _product_weights(layers: Sequence[ChainLayer], params: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Per layer, what its forward product multiplies by and its bias: (w0, b0, w1, b1, ...).
    `params` are the layers' parameters (a SparseLinear's kept values or an nn.Linear's weight,
    and the bias). A 'dense-product' or 'csr-addmm' layer's weight is built from its values here,
    once per chain pass: a wide pass's row blocks share it and the backward reuses it."""
    weights = list(params)
    for i, layer in enumerate(layers):
        if isinstance(layer, SparseLinear) and layer.kernel != "csr":
            weights[2 * i] = layer.product_weight(params[2 * i])
    return tuple(weights)


def _layer_product(layer: ChainLayer, weight: Tensor, bias: Tensor, h_t: Tensor) -> Tensor:
    """W h_t + b for a feature-major h_t: a row-major [out, batch] tensor. `weight` is what the
    layer multiplies by (`_product_weights`): kept values for 'csr', else a dense or CSR matrix."""
    if isinstance(layer, SparseLinear) and layer.kernel == "csr":
        return csr_times(layer.crow, layer.col, weight, h_t if h_t.is_contiguous() else h_t.contiguous()).add_(
            bias.unsqueeze(1))
    return torch.addmm(bias.unsqueeze(1), weight, h_t)


# --- the same loops in C++ (offprune.native): bit-identical, used whenever the library is there ---

_NO_TENSOR = torch.empty(0)  # a place holder in the C++ loops' per-layer lists


def _native(x: Tensor):
    """The compiled chain loops, or None: not built (offprune.native) or not on the CPU."""
    return native.chain_kernels() if x.device.type == "cpu" else None


def _native_chain_pass(ext, layers: Sequence[ChainLayer], act: nn.Module | None, x: Tensor,
                       weights: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
    out, *inputs = ext.chain_pass(x, *_native_forward_args(_structure(layers, act), weights))
    return out, inputs


def _native_forward_args(structure: "_ChainStructure", weights: tuple[Tensor, ...]) -> tuple:
    """chain_pass's arguments after the input: per layer its kind, CSR structure, weight and bias."""
    kinds, crows, cols, code, alpha = structure.forward
    return kinds, crows, cols, list(weights[0::2]), list(weights[1::2]), code, alpha, INFERENCE_CSR_MIN_ROWS


def _native_chain_backward(ext, layers: Sequence[ChainLayer], act: nn.Module | None, grad_out: Tensor,
                           inputs: Sequence[Tensor], matrices: Sequence[Tensor], needs: Sequence[bool],
                           needs_x: bool, lowest: int) -> tuple[list[Tensor | None], Tensor | None]:
    kinds, patterns, flat_indices, crows_t, cols_t, perms_t, code, alpha = _structure(layers, act).backward
    *grads, grad_x = ext.chain_backward(grad_out, kinds, list(inputs), list(matrices), patterns, flat_indices,
                                        crows_t, cols_t, perms_t, list(needs), needs_x, lowest, code, alpha)
    return grads, grad_x


_STRUCTURE_BUFFERS = ("crow", "col", "crow_t", "col_t", "perm_t", "flat_index", "pattern_values")


@dataclass(frozen=True, eq=False)
class _ChainStructure:
    """What a chain's C++ calls take besides activations and parameters: layer kinds and the CSR
    structures (lists assembled once, not on every call: ~3-4 % of a sparse BCQ update), and the
    parameters and cost the calls look up. Valid while the chain has the same layers, kernels,
    buffer tensors and parameters (`matches`): a layer swap or a device move (`Module.to` replaces
    buffers) makes a new one."""
    layers: tuple[ChainLayer, ...]
    act: nn.Module | None
    buffers: tuple[tuple[Tensor | None, ...], ...]
    kernels: tuple[str, ...]
    forward: tuple
    backward: tuple
    compiled: object | None  # the library's Chain for `chains_apply` (training chains of SparseLinear layers)
    params: tuple[Tensor, ...] | None  # (values_0, bias_0, ...) where every layer is a SparseLinear
    cost: int  # multiply-adds per row (`_chain_cost`)

    @staticmethod
    def of(layers: Sequence[ChainLayer], act: nn.Module | None) -> "_ChainStructure":
        kinds = [native.LINEAR if isinstance(layer, nn.Linear) else native.CSR if layer.kernel == "csr"
                 else native.MATRIX for layer in layers]
        grad_kinds = [native.GRAD_CSR if _is_csr(layer) else native.GRAD_LINEAR if isinstance(layer, nn.Linear)
                      else native.GRAD_DENSE_PRODUCT for layer in layers]
        code, alpha = _activation_code(act), getattr(act, "alpha", 1.0)

        crows, cols, flat_indices, crows_t, cols_t, perms_t = (
            [getattr(layer, name, _NO_TENSOR) for layer in layers]
            for name in ("crow", "col", "flat_index", "crow_t", "col_t", "perm_t"))
        patterns = [layer.pattern() if kind == native.GRAD_CSR else _NO_TENSOR for layer, kind in zip(layers, grad_kinds)]
        backward = (grad_kinds, patterns, flat_indices, crows_t, cols_t, perms_t, code, alpha)
        ext = native.chain_kernels()
        compiled = None
        if ext is not None and all(isinstance(layer, SparseLinear) and layer.frozen_weight is None for layer in layers):
            compiled = ext.Chain(
                kinds, grad_kinds, crows, cols, patterns, flat_indices, crows_t, cols_t, perms_t,
                [layer.out_features for layer in layers], [layer.in_features for layer in layers],
                [layer.kernel == "dense-product" for layer in layers], [layer.kernel == "csr-addmm" for layer in layers],
                code, alpha, INFERENCE_CSR_MIN_ROWS)
        params = (tuple(p for layer in layers for p in (layer.values, layer.bias))
                  if all(isinstance(layer, SparseLinear) for layer in layers) else None)
        return _ChainStructure(tuple(layers), act, _buffers_of(layers), _kernels_of(layers),
                               forward=(kinds, crows, cols, code, alpha), backward=backward, compiled=compiled,
                               params=params, cost=_chain_cost(layers))

    def matches(self, layers: Sequence[ChainLayer], act: nn.Module | None) -> bool:
        if act is not self.act or len(layers) != len(self.layers):
            return False
        params = self.params
        for i, (layer, known, kernel, buffers) in enumerate(zip(layers, self.layers, self.kernels, self.buffers)):  # plain loops: runs per call
            if layer is not known or getattr(layer, "kernel", "dense") != kernel:
                return False
            held = layer._buffers
            for name, tensor in zip(_STRUCTURE_BUFFERS, buffers):
                if held.get(name) is not tensor:
                    return False
            if params is not None:
                held = layer._parameters
                if held.get("values") is not params[2 * i] or held.get("bias") is not params[2 * i + 1]:
                    return False
        return True


def _buffers_of(layers: Sequence[ChainLayer]) -> tuple[tuple[Tensor | None, ...], ...]:
    return tuple(tuple(layer._buffers.get(name) for name in _STRUCTURE_BUFFERS) for layer in layers)


def _kernels_of(layers: Sequence[ChainLayer]) -> tuple[str, ...]:
    return tuple(getattr(layer, "kernel", "dense") for layer in layers)


# keyed by the chain's first layer; dropped with it
_structures: "weakref.WeakKeyDictionary[nn.Module, _ChainStructure]" = weakref.WeakKeyDictionary()


def _structure(layers: Sequence[ChainLayer], act: nn.Module | None) -> _ChainStructure:
    cached = _structures.get(layers[0])
    if cached is None or not cached.matches(layers, act):
        cached = _structures[layers[0]] = _ChainStructure.of(layers, act)
    return cached


def _activation_code(act: nn.Module | None) -> int:
    return native.ELU if isinstance(act, nn.ELU) else native.RELU


def _is_csr(layer: ChainLayer) -> bool:
    """A SparseLinear on 'csr' or 'csr-addmm' (its gradients are computed from the CSR structure)."""
    return isinstance(layer, SparseLinear) and layer.kernel != "dense-product"


def _chain_pass(layers: Sequence[ChainLayer], act: nn.Module | None, x: Tensor,
                weights: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
    """Forward through the chain (`weights` from `_product_weights`): the output ([batch, out]
    view) and each layer's feature-major input.

    An inference copy's dense first layer (nn.Linear) on a few rows runs batch-major, x W^T, and
    hands on the transposed view: torch's W x^T is up to 4x slower there (benchmarks/README.md).
    Training chains have no nn.Linear layers, so their products never depend on the batch."""
    ext = _native(x)
    if ext is not None:
        return _native_chain_pass(ext, layers, act, x, weights)
    h_t, inputs = x.T, []
    for i, layer in enumerate(layers):
        inputs.append(h_t)
        if i == 0 and isinstance(layer, nn.Linear) and x.shape[0] < INFERENCE_CSR_MIN_ROWS:
            h_t = torch.addmm(weights[1], x, weights[0].T).T
        else:
            h_t = _layer_product(layer, weights[2 * i], weights[2 * i + 1], h_t)
        if i < len(layers) - 1:
            _activate_(h_t, act)
    return h_t.T, inputs


def _wide_chain_pass(layers: Sequence[ChainLayer], act: nn.Module | None, x: Tensor,
                     params: tuple[Tensor, ...]) -> Tensor:
    """The graph-free forward. A wide batch runs in blocks of BLOCK_COLUMNS rows through the whole
    chain, so each block's activations stay in cache from layer to layer (BCQ's target: decoder,
    actor and critics on 1,000 candidates), faster than blocking inside each product. Under
    `sparse_threads` the blocks are shared out in contiguous groups, one per thread (the compiled
    loops in one call, `blocked_chain_pass`, on their helper threads): the same blocks whatever
    the thread count, so the same result (splitting rows anywhere else would not be: a dense
    product's rounding can depend on how many rows it gets)."""
    rows = x.shape[0]
    weights = _product_weights(layers, params)
    if _block_rows(rows) == rows or len(layers) < 2:
        return _chain_pass(layers, act, x, weights)[0]
    ext = _native(x)
    if ext is not None:
        structure = _structure(layers, act)
        return ext.blocked_chain_pass(x, *_native_forward_args(structure, weights), BLOCK_COLUMNS,
                                      rows * structure.cost)
    blocks = [slice(start, start + BLOCK_COLUMNS) for start in range(0, rows, BLOCK_COLUMNS)]
    groups = _groups(blocks, rows * _chain_cost(layers))
    inference = torch.is_inference_mode_enabled()

    def group_pass(group: list[slice]) -> list[Tensor]:
        with torch.inference_mode(inference), torch.no_grad():
            return [_chain_pass(layers, act, x[block], weights)[0] for block in group]

    futures = [_pool().submit(group_pass, group) for group in groups[1:]]
    outputs = group_pass(groups[0])
    for future in futures:
        outputs += future.result()
    return torch.cat(outputs)


class _SparseChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layers, act, *params):
        weights = _product_weights(layers, params)
        out, inputs = _chain_pass(layers, act, x, weights)
        ctx.layers, ctx.act = layers, act
        # what the input gradient multiplies by: a dense matrix (the one the forward built for a
        # 'dense-product' layer) or, for the CSR kernels, the kept values
        ctx.save_for_backward(*inputs, *(params[2 * i] if _is_csr(layer) else weights[2 * i]
                                         for i, layer in enumerate(layers)))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        inputs, matrices = saved[:len(ctx.layers)], saved[len(ctx.layers):]
        needs_x, needs = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]  # needs: values_0, bias_0, ...
        grads, grad_x = chain_backward(ctx.layers, ctx.act, grad_out, inputs, matrices, needs, needs_x)
        return grad_x, None, None, *grads


def chain_backward(layers: Sequence[ChainLayer], act: nn.Module | None, grad_out: Tensor, inputs: Sequence[Tensor],
                   matrices: Sequence[Tensor], needs: Sequence[bool], needs_x: bool
                   ) -> tuple[list[Tensor | None], Tensor | None]:
    """A chain's backward from the gradient of its output ([batch, out]): the parameters' gradients
    (values_0, bias_0, ...; None where `needs` is False) and the input's (None unless `needs_x`).
    `inputs` are each layer's feature-major input and `matrices` what its input gradient multiplies
    by, as the forward kept them (`_SparseChainFunction`)."""
    # below the lowest layer with a trainable parameter, only the input gradient is left
    lowest = 0 if needs_x else min((i for i in range(len(layers)) if needs[2 * i] or needs[2 * i + 1]),
                                   default=len(layers))
    ext = _native(grad_out)
    if ext is not None:
        return _native_chain_backward(ext, layers, act, grad_out, inputs, matrices, needs, needs_x, lowest)
    grads: list[Tensor | None] = [None] * (2 * len(layers))
    grad_x = None
    grad_t = _feature_major(grad_out)
    for i in range(len(layers) - 1, lowest - 1, -1):
        layer, h_t = layers[i], inputs[i]
        dense = isinstance(layer, nn.Linear)
        if needs[2 * i]:
            if dense:
                grads[2 * i] = torch.mm(grad_t, h_t.T)
            elif layer.kernel == "dense-product":
                grads[2 * i] = torch.mm(grad_t, h_t.T).view(-1).index_select(0, layer.flat_index)
            else:
                grads[2 * i] = torch.sparse.sampled_addmm(layer.pattern(), grad_t, h_t.T, beta=0.0).values()
        if needs[2 * i + 1]:
            grads[2 * i + 1] = grad_t.sum(1)
        if i == 0 and not needs_x:
            break
        if _is_csr(layer):
            below = csr_times(layer.crow_t, layer.col_t, matrices[i].index_select(0, layer.perm_t), grad_t)
        else:
            below = torch.mm(matrices[i].T, grad_t)
        if i == 0:
            grad_x = below.T
        else:
            grad_t = _activation_grad(below, h_t, act)
    return grads, grad_x


# --- sparse kernels on more than one thread ------------------------------------------------------

# Each of torch's parallel ops wakes the sleeping OpenMP threads (OMP_WAIT_POLICY=PASSIVE), which
# costs more than most of a sparse update's ops take: with 2 threads a sparse BCQ update was slower
# than with one (benchmarks/README.md). So under `sparse_threads(n)` torch's own ops run on one
# thread, and work is shared two ways, both splitting only what is independent, so results do not
# depend on the thread count:
# - the compiled loops (offprune/_chain.cpp) share each large CSR product by columns and each
#   weight gradient by rows with n - 1 helper threads that keep polling for work between products;
# - a wide graph-free chain's row blocks (BCQ's decoder on a critic target's 1,000 candidates) go
#   in contiguous groups to n - 1 worker threads, each block through the whole chain (the same
#   blocks as on one thread); the compiled products do not share their own work meanwhile.
MIN_SHARED_WORK = 3_000_000  # multiply-adds from which row blocks are shared (a hand-off costs ~10-50 us)

_threads = 1
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    with _pools_lock:
        if _threads not in _pools:
            _pools[_threads] = ThreadPoolExecutor(_threads - 1, "offprune-sparse",
                                                  initializer=torch.set_num_threads, initargs=(1,))
        return _pools[_threads]


def _groups(blocks: list[slice], work: int) -> list[list[slice]]:
    """`blocks` in one contiguous group per sparse thread when the work is worth sharing, else one group."""
    count = min(_threads, len(blocks)) if work >= MIN_SHARED_WORK else 1
    bounds = [len(blocks) * k // count for k in range(count + 1)]
    return [blocks[start:end] for start, end in zip(bounds, bounds[1:])]


def _chain_cost(layers: Sequence[ChainLayer]) -> int:
    """Multiply-adds per row of a chain's products."""
    return sum(len(layer.col) if isinstance(layer, SparseLinear) and layer.kernel == "csr"
               else layer.in_features * layer.out_features for layer in layers)


@contextmanager
def sparse_threads(threads: int) -> Iterator[None]:
    """Run sparse kernels on `threads` threads inside the block (torch's own ops on one of them,
    see above); torch's thread count is restored after."""
    global _threads
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous_torch, previous = torch.get_num_threads(), _threads
    torch.set_num_threads(1)
    _threads = threads
    ext = native.chain_kernels()
    if ext is not None:
        ext.set_threads(threads)
    try:
        yield
    finally:
        _threads = previous
        if ext is not None:
            ext.set_threads(previous)
        torch.set_num_threads(previous_torch)


def chain_forward(layers: Sequence[ChainLayer], act: nn.Module | None, x: Tensor) -> Tensor:
    """layers[-1](act(...act(layers[0](x)))) for x [..., in]: one autograd node for the whole stack."""
    flat = x if x.dim() == 2 else x.reshape(-1, layers[0].in_features)
    ext, compiled, params, _ = _chains_call([(layers, act)], flat)
    if _builds_graph(flat, params):
        if ext is not None:  # the compiled loops as an autograd node of their own
            out = ext.chains_apply(flat, compiled, params)[0]
        else:
            out = _SparseChainFunction.apply(flat, layers, act, *params)
    else:  # no graph to build (targets, acting): skip autograd.Function's overhead
        out = _wide_chain_pass(layers, act, flat, params)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], layers[-1].out_features)


def _builds_graph(x: Tensor, params: tuple[Tensor, ...]) -> bool:
    """Whether a chain called on x now is part of an autograd graph (else the graph-free pass)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


class _ChainsCall(NamedTuple):
    """What a compiled call over some chains takes (`_chains_call`)."""

    ext: ModuleType | None  # the compiled library; None where any chain has no compiled Chain
    compiled: list | None  # each chain's compiled Chain
    params: tuple[Tensor, ...]  # every chain's (values_0, bias_0, ...), one chain after the other
    cost: int  # multiply-adds per row of all the chains' products (0 without the library)


def _chains_call(chains: Sequence[tuple[Sequence[ChainLayer], nn.Module | None]], x: Tensor) -> _ChainsCall:
    """The library, compiled Chains, parameters and cost for chains called on x; the library and
    Chains are None where any chain has none (no library, not on the CPU, an inference copy's layers)."""
    ext = _native(x)
    structures = [_structure(layers, act) for layers, act in chains] if ext is not None else []
    if structures and all(s.params is not None for s in structures):
        params = structures[0].params if len(structures) == 1 else tuple(p for s in structures for p in s.params)
    else:
        params = tuple(p for layers, _ in chains for layer in layers for p in _layer_params(layer))
    compiled = [s.compiled for s in structures]
    if ext is None or None in compiled:
        return _ChainsCall(None, None, params, 0)
    return _ChainsCall(ext, compiled, params, sum(s.cost for s in structures))


def _layer_params(layer: ChainLayer) -> tuple[Tensor, Tensor]:
    if isinstance(layer, nn.Linear):
        bias = layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
        return layer.weight, bias
    return layer.values, layer.bias


def _fused_mlp_forward(mlp: MLP, x: Tensor) -> Tensor:
    return chain_forward(*chain_parts(mlp), x)


def _fused_pair_forward(a: MLP, b: MLP, x: Tensor) -> tuple[Tensor, Tensor]:
    """(a(x), b(x)) for two fused chains: one compiled autograd node when both build a graph (each
    chain computed as its own node would compute it), else each on its own path."""
    ext, compiled, params, _ = _chains_call([chain_parts(a), chain_parts(b)], x)
    if x.dim() == 2 and _builds_graph(x, params) and ext is not None:
        first, second = ext.chains_apply(x, compiled, params)
        return first, second
    return a(x), b(x)


def _mark_chains(module: nn.Module, dense_layers: bool = False) -> None:
    """Fuse every MLP `chain_supported` (with `dense_layers`: nn.Linear layers too) that has a
    SparseLinear: an all-dense stack stays torch's own, whose batch-major products are up to 4x
    faster at a few rows (a 750x750 layer at 10 rows: 0.2 ms, feature-major 0.8 ms)."""
    for m in module.modules():
        if isinstance(m, MLP):
            fuse = chain_supported(m, dense_layers) and any(isinstance(layer, SparseLinear) for layer in m)
            m.fused_forward = _fused_mlp_forward if fuse else None
            m.fused_pair = _fused_pair_forward if fuse else None
    for m in module.modules():  # after the MLPs: a VAE's loss is fused when its chains are
        if isinstance(m, VAE):
            m.fused_loss = fused_vae_loss if vae_fusable(m) else None


# --- BCQ's VAE loss as one node (offprune.sparse_vae: its steps, and their Python version) -------

def vae_fusable(vae: VAE) -> bool:
    """Whether `vae`'s loss can run as one node: encoder and decoder fused ReLU chains and every
    layer, heads included, a SparseLinear on the 'csr' kernel (what sparse training mostly gives)."""
    if not all(m.sparse_chain and isinstance(chain_parts(m)[1], nn.ReLU) for m in (vae.encoder, vae.decoder)):
        return False
    return all(isinstance(layer, SparseLinear) and layer.kernel == "csr" and layer.frozen_weight is None
               for layers, _ in _vae_chains(vae) for layer in layers)


def _vae_chains(vae: VAE) -> list[tuple[list[ChainLayer], nn.Module | None]]:
    """Encoder, mean head, log-std head, decoder: each a chain's layers and activation."""
    return [chain_parts(vae.encoder), ([vae.mean], None), ([vae.log_std], None), chain_parts(vae.decoder)]


class _VAEChains:
    """`sparse_vae.VAEChains` over this module's chain passes (compiled or Python loops)."""

    def __init__(self, vae: VAE, obs_dim: int):
        self.chains = _vae_chains(vae)
        self.sizes = [len(layers) for layers, _ in self.chains]
        self.obs_dim, self.max_action = obs_dim, float(vae.max_action)

    def forward(self, k: int, x: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        layers, act = self.chains[k]
        return _chain_pass(layers, act, x, _product_weights(layers, tuple(params)))

    def backward(self, k: int, grad_out: Tensor, inputs: Sequence[Tensor], values: Sequence[Tensor],
                 needs: Sequence[bool], needs_x: bool) -> tuple[list[Tensor | None], Tensor | None]:
        layers, act = self.chains[k]
        return chain_backward(layers, act, grad_out, inputs, values, needs, needs_x)


def fused_vae_loss(vae: VAE, obs: Tensor, action: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, reconstruction MSE, KL) of a `vae_fusable` VAE for the latent noise `noise` [batch,
    latent] as one node: the compiled one where the chain loops are built, else `VAELoss`."""
    ext, compiled, params, _ = _chains_call(_vae_chains(vae), obs)
    if ext is not None and obs.dtype == torch.float32:
        loss, recon, kl = ext.vae_loss(obs, action, noise, compiled, params, float(vae.max_action))
        return loss, recon, kl
    return VAELoss.apply(obs, action, noise, _VAEChains(vae, obs.shape[1]), *params)


# --- BCQ's critic target as one compiled call --------------------------------------------------

@dataclass(frozen=True)
class CandidateTarget:
    """The numbers of BCQ's critic target (`offprune.algos.bcq.Agent.td_target`)."""

    candidates: int  # decoded actions per next state
    decoder_scale: float  # the VAE's max_action: a = decoder_scale * tanh(decoder([s; z]))
    perturb_scale: float  # the actor's phi * max_action: a + perturb_scale * tanh(actor([s; a]))
    max_action: float  # the perturbed action's clamp
    lmbda: float  # weight of min(Q1, Q2); 1 - lmbda on the max
    discount: float


def fused_bcq_target(decoder: MLP, actor: MLP, q1: MLP, q2: MLP, next_obs: Tensor, z: Tensor, rewards: Tensor,
                     not_done: Tensor, numbers: CandidateTarget, decode_obs: Tensor | None = None,
                     decode_z: Tensor | None = None) -> tuple[Tensor, Tensor | None] | None:
    """BCQ's critic target [states, 1] in one compiled call (`bcq_target` in offprune/_chain.cpp:
    the Python steps' bits, its blocks shared over `sparse_threads`), for the prior's clipped latent
    draw z [states * candidates, latent]; with `decode_obs` and `decode_z`, also the decoded actions
    decoder_scale * tanh(decoder([decode_obs; decode_z])) (`VAE.decode`'s bits: BCQ's actor loss's
    candidates), one more piece of the work the threads share. (target, decoded or None), or None
    where it does not apply (no compiled library, a network not a fused sparse chain of two or more
    layers, grad enabled, not float32), and the caller takes the Python steps."""
    nets = (decoder, actor, q1, q2)
    if torch.is_grad_enabled() or not all(m.sparse_chain for m in nets):
        return None
    chains = [chain_parts(m) for m in nets]
    states, rows = next_obs.shape[0], z.shape[0]
    decoding = (decode_obs, decode_z) if decode_obs is not None else ()
    if (any(len(layers) < 2 for layers, _ in chains) or rows != states * numbers.candidates
            or rewards.shape != (states, 1) or not_done.shape != (states, 1)
            or (decoding and (decode_z is None or decode_obs.shape[0] != decode_z.shape[0]))
            or any(t.dtype != torch.float32 for t in (next_obs, z, rewards, not_done, *decoding))):
        return None
    ext, compiled, params, cost = _chains_call(chains, next_obs)
    if ext is None:
        return None
    target, decoded = ext.bcq_target(next_obs, z, rewards, not_done, decode_obs, decode_z, compiled, params,
                                     numbers.candidates, numbers.decoder_scale, numbers.perturb_scale,
                                     numbers.max_action, numbers.lmbda, numbers.discount, _block_rows(rows),
                                     rows * cost)
    return target, decoded


def fused_bcq_update(vae: VAE, actor: nn.Module, actor_target: nn.Module, critic: nn.Module,
                     critic_target: nn.Module, optimizers: Sequence[torch.optim.Optimizer], numbers: CandidateTarget,
                     tau: float, batch) -> dict[str, float] | None:
    """BCQ's whole update (`offprune.algos.bcq.Agent.update`: VAE step, critic target with the actor
    loss's decoded actions, critic step, actor step with the critic frozen, soft updates) in one
    compiled call (`bcq_update` in offprune/_chain.cpp): each piece the node or call the Python
    steps take, the ops between them the same, the same random draws in the same order: the same
    bits, without the Python between the pieces. `optimizers`: the VAE's, the critic's, the
    actor's. Its info, or None where any piece would not take the compiled path (then the caller
    takes the Python steps)."""
    obs, actions, rewards, next_obs, not_done = (batch.observations, batch.actions, batch.rewards,
                                                 batch.next_observations, batch.not_done)
    if (not torch.is_grad_enabled() or torch.is_inference_mode_enabled() or vae.fused_loss is None
            or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (obs, actions, rewards, next_obs, not_done))
            or obs.requires_grad or rewards.shape != (obs.shape[0], 1) or not_done.shape != (obs.shape[0], 1)):
        return None
    nets = (vae.decoder, actor_target.net, critic_target.q1, critic_target.q2, critic.q1, critic.q2, actor.net)
    if not all(m.sparse_chain and len(chain_parts(m)[0]) >= 2 for m in nets):
        return None
    ext = _native(obs)
    if ext is None or not all(isinstance(o, FusedAdam) for o in optimizers):
        return None
    plans = [o.compiled_plan(ext) for o in optimizers]
    calls = [_chains_call(_vae_chains(vae), obs),
             _chains_call([chain_parts(m) for m in nets[:4]], next_obs),
             _chains_call([chain_parts(critic.q1), chain_parts(critic.q2)], obs),
             _chains_call([chain_parts(actor.net), chain_parts(critic.q1)], obs)]
    if None in plans or any(call.ext is None for call in calls):
        return None
    rows = next_obs.shape[0] * numbers.candidates
    vae_call, target_call, critic_call, actor_call = calls
    values = ext.bcq_update(
        obs, actions, rewards, next_obs, not_done, vae_call.compiled, list(vae_call.params), float(vae.max_action),
        vae.latent_dim, PRIOR_CLIP, target_call.compiled, list(target_call.params), numbers.candidates,
        numbers.decoder_scale, numbers.perturb_scale, numbers.max_action, numbers.lmbda, numbers.discount,
        _block_rows(rows), rows * target_call.cost,
        critic_call.compiled, list(critic_call.params), actor_call.compiled, list(actor_call.params),
        actor.phi * actor.max_action, float(actor.max_action), *plans,
        module_parameters(critic_target), module_parameters(critic), module_parameters(actor_target),
        module_parameters(actor), tau)
    return dict(zip(("vae_loss", "vae_recon", "vae_kl", "critic_loss", "q1_mean", "actor_loss"), values))


def fused_perturbed_q_loss(actor: MLP, q1: MLP, obs: Tensor, sampled: Tensor, perturb_scale: float,
                           max_action: float) -> Tensor | None:
    """BCQ's actor loss -mean(q1([obs; clamp(sampled + perturb_scale * tanh(actor([obs; sampled])),
    -max_action, max_action)])) as one compiled autograd node (`perturbed_q_loss` in
    offprune/_chain.cpp: torch's graph's bits, forward and gradients). None where it does not apply
    (no compiled library, not fused sparse chains, no graph to build, obs or sampled wanting a
    gradient, not float32), and the caller takes torch's ops."""
    if not (torch.is_grad_enabled() and actor.sparse_chain and q1.sparse_chain) or obs.requires_grad \
            or sampled.requires_grad or obs.dtype != torch.float32 or sampled.dtype != torch.float32:
        return None
    ext, compiled, params, _ = _chains_call([chain_parts(actor), chain_parts(q1)], obs)
    if ext is None:
        return None
    return ext.perturbed_q_loss(obs, sampled, compiled, params, perturb_scale, max_action)


def _linear_names(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, child, new)


# Which kernel each converted layer uses. A 'dense-product' layer multiplies by a dense weight built
# from its kept values on every forward and picks its kept gradients out of dense products; a
# 'csr' layer's compiled products do only the kept multiply-adds, at ~2-3x dense BLAS's cost each
# and little per call. Measured per layer and on whole updates (one thread; benchmarks/README.md):
# 'csr' wins on large layers up to ~25 % density at 100-1,000 rows, and on small ones (14-wide
# inputs, 1- to 6-wide heads) at nearly any density. The rule is fixed, not measured per run, so a
# run's kernels (and so its exact floating-point results) do not depend on the machine or its load.
MAX_CSR_DENSITY = 0.25  # a layer keeping more than this fraction: dense-product...
SMALL_LAYER_WEIGHTS = 16_384  # ...unless it has fewer weights than this
MAX_SMALL_CSR_DENSITY = 0.9  # and keeps at most this fraction


def kernel_for(mask: Tensor) -> str:
    """'csr' or 'dense-product': the kernel a trained SparseLinear with this mask uses."""
    density = float(mask.float().mean())
    small = mask.numel() < SMALL_LAYER_WEIGHTS
    return "csr" if density <= (MAX_SMALL_CSR_DENSITY if small else MAX_CSR_DENSITY) else "dense-product"


@torch.no_grad()
def convert_to_sparse(
    networks: dict[str, PrunableNetwork],
    masks: dict[str, dict[str, Tensor]],
    optimizers,
    kernel: str | None = None,
) -> dict[str, dict[str, str]]:
    """Replace every masked Linear (in each network and its mask copies) by a SparseLinear and
    point the optimizers at the new parameters. `kernel` forces one of SPARSE_KERNELS for every
    layer (default: `kernel_for`).
    Returns, per network, each converted weight's kernel. Optimizer state already there (a run that
    turns sparse during training) moves with the parameters: per-weight tensors (Adam's moments) at
    the kept positions, the rest as it is."""
    replaced: dict[int, nn.Parameter] = {}
    moved: list[tuple[Tensor, Tensor, Tensor | None]] = []  # (old parameter, new, kept flat positions)
    kernels: dict[str, dict[str, str]] = {name: {} for name in networks}
    for name, net in networks.items():
        for module in (net.module, *net.mask_copies):
            for layer_name, linear in _linear_names(module).items():
                pname = f"{layer_name}.weight"
                mask = masks[name].get(pname)
                if mask is None:
                    continue
                kernels[name][pname] = kernel or kernel_for(mask)
                sparse = SparseLinear(linear, mask, kernels[name][pname])
                replaced[id(linear.weight)] = sparse.values
                moved.append((linear.weight, sparse.values, sparse.flat_index))
                if linear.bias is not None:
                    replaced[id(linear.bias)] = sparse.bias
                    moved.append((linear.bias, sparse.bias, None))
                _replace(module, layer_name, sparse)
            _mark_chains(module)
    native.chain_kernels()  # built here, on the first sparse run, not inside a timed training step
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [replaced.get(id(p), p) for p in group["params"]]
        for old, new, kept in moved:
            state = opt.state.pop(old, None)
            if state is not None:
                opt.state[new] = {key: value.flatten().index_select(0, kept)
                                  if kept is not None and isinstance(value, Tensor) and value.shape == old.shape
                                  else value for key, value in state.items()}
    return kernels


@dataclass
class MaskHolder:
    """The masks a run trains under, and the one place that can change them during training."""

    kernels: dict[str, dict[str, str]]  # per network, each masked weight's kernel (LAYER_KERNELS)
    enforcer: MaskEnforcer
    sparse: bool  # some weights are SparseLinear values (their zeros are structural)

    networks: dict[str, PrunableNetwork]
    optimizers: list[torch.optim.Optimizer]
    # dense kernels under --kernels auto: the rows per update with which `kernels_by_rule` is asked
    # again at every mask change, turning the run sparse when the masks have become sparse enough
    # (gmp starts unpruned); None: the kernels stay as they are
    rule_rows: int | None = None

    def set_masks(self, masks: dict[str, dict[str, Tensor]]) -> None:
        """New masks at a step (schedules, regrowth). Dense layers: MaskEnforcer.set_masks.
        SparseLinear layers are rebuilt on the new structure (`rebuild_sparse_layers`). Either way
        newly pruned weights and their optimizer moments become zero and newly kept weights start
        at zero with zero moments, so dense and sparse kernels train the same."""
        rebuilt = rebuild_sparse_layers(self.networks, masks, self.optimizers) if self.sparse else {}
        for net, layer_kernels in rebuilt.items():
            self.kernels[net].update(layer_kernels)
        self.enforcer.set_masks({net: {p: m for p, m in layer.items() if p not in rebuilt.get(net, {})}
                                 for net, layer in masks.items()})
        if not self.sparse and self.rule_rows and kernels_by_rule(self.networks, masks, self.rule_rows)[0] == "sparse":
            self.turn_sparse(masks)

    def turn_sparse(self, masks: dict[str, dict[str, Tensor]]) -> None:
        """From dense to sparse kernels in the middle of training: the masked Linear layers become
        SparseLinear with their weights and optimizer state (`convert_to_sparse`); the enforcer
        keeps holding only what stays dense (e.g. a GRU's weights)."""
        self.enforcer.remove()
        converted = convert_to_sparse(self.networks, masks, self.optimizers)
        rest = {net: {p: m for p, m in layer.items() if p not in converted[net]} for net, layer in masks.items()}
        self.enforcer = MaskEnforcer(self.networks, rest, self.optimizers)
        self.kernels = {net: {p: converted[net].get(p, "dense") for p in layer} for net, layer in masks.items()}
        self.sparse = True


def apply_masks(
    networks: dict[str, PrunableNetwork],
    masks: dict[str, dict[str, Tensor]],
    optimizers,
    kernels: str,
) -> MaskHolder:
    """Make training keep the masks: the one call a training loop makes after pruning.

    'dense': masked weights stay dense matrices, held at zero by a MaskEnforcer. 'sparse': every
    masked Linear becomes a SparseLinear (its zeros are structural)."""
    optimizers = list(optimizers)
    converted: dict[str, dict[str, str]] = {name: {} for name in masks}
    if kernels == "sparse":
        converted = convert_to_sparse(networks, masks, optimizers)
    # what stays dense (all of it, or the weights SparseLinear cannot hold, e.g. a GRU's) is
    # held at zero by the enforcer
    rest = {net: {p: m for p, m in layer.items() if p not in converted[net]} for net, layer in masks.items()}
    enforcer = MaskEnforcer(networks, rest, optimizers)
    layer_kernels = {net: {p: converted[net].get(p, "dense") for p in layer_masks} for net, layer_masks in masks.items()}
    return MaskHolder(layer_kernels, enforcer, kernels == "sparse", networks, optimizers)


@torch.no_grad()
def _rebuilt(layer: SparseLinear, mask: Tensor) -> SparseLinear:
    """`layer` on a new mask: kept weights keep their values, newly kept ones start at 0. The bias
    stays the same Parameter (its optimizer state stays valid)."""
    new = SparseLinear(layer.to_linear(), mask, kernel_for(mask))
    new.bias = layer.bias
    return new


def _move_optimizer_state(optimizers: Sequence[torch.optim.Optimizer], old: SparseLinear, new: SparseLinear) -> None:
    """Point the optimizer holding `old.values` at `new.values`, carrying per-weight state
    (Adam's moments) over by position: zero where a weight is newly kept, dropped where pruned."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [new.values if p is old.values else p for p in group["params"]]
        state = opt.state.pop(old.values, None)
        if state is None:
            continue
        moved = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == old.values.shape:
                flat = value.new_zeros(old.out_features * old.in_features).index_copy_(0, old.flat_index, value)
                value = flat.index_select(0, new.flat_index)
            moved[key] = value
        opt.state[new.values] = moved


def rebuild_sparse_layers(networks: dict[str, PrunableNetwork], masks: dict[str, dict[str, Tensor]],
                          optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, dict[str, str]]:
    """Give the SparseLinear layers named in `masks` (in each network and its mask copies) the
    new masks' structure, moving the optimizers' state with them. Returns, per network, each
    rebuilt weight's kernel (`kernel_for` the new mask)."""
    kernels: dict[str, dict[str, str]] = {}
    for name, net in networks.items():
        for module in (net.module, *net.mask_copies):
            for layer_name, layer in [(n, m) for n, m in module.named_modules() if isinstance(m, SparseLinear)]:
                pname = f"{layer_name}.weight"
                mask = masks.get(name, {}).get(pname)
                if mask is None:
                    continue
                new = _rebuilt(layer, mask)
                _move_optimizer_state(optimizers, layer, new)
                _replace(module, layer_name, new)
                kernels.setdefault(name, {})[pname] = new.kernel
            _mark_chains(module)
    return kernels


@contextmanager
def dense_view(module: nn.Module) -> Iterator[dict[str, nn.Linear]]:
    """Inside the block every SparseLinear of `module` is replaced by a dense masked nn.Linear copy
    (yielded by name), so a loss differentiates with respect to every weight, pruned ones included
    (RigL's grow signal); after it the very same SparseLinear modules are back (their parameters,
    and so the optimizers' state, untouched)."""
    sparse = {name: m for name, m in module.named_modules() if isinstance(m, SparseLinear)}
    dense = {name: layer.to_linear() for name, layer in sparse.items()}
    for name, linear in dense.items():
        _replace(module, name, linear)
    _mark_chains(module)
    try:
        yield dense
    finally:
        for name, layer in sparse.items():
            _replace(module, name, layer)
        _mark_chains(module)


def convert_to_dense(module: nn.Module) -> nn.Module:
    """Turn every SparseLinear inside `module` back into a dense masked nn.Linear (in place)."""
    for name, m in list(module.named_modules()):
        if isinstance(m, SparseLinear):
            _replace(module, name, m.to_linear())
    _mark_chains(module)
    return module


def has_sparse_layers(module: nn.Module) -> bool:
    return any(isinstance(m, SparseLinear) for m in module.modules())


# The rule behind --kernels auto: an update's cost in dense multiply-adds. A 'dense' (or
# 'dense-product') layer costs in * out per row; a CSR layer costs CSR_COST_PER_KEPT per kept
# weight per row, plus CSR_FIXED_COST per update (autograd and indexing work that does not shrink
# with the batch), but no more than its dense product (small layers, measured). The constants are
# fitted to `offprune speed` (the estimates against the measurements are in benchmarks/README.md);
# the rule only has to rank, not to predict exactly.
CSR_COST_PER_KEPT = 4.0
CSR_FIXED_COST = 2_000_000
MIN_ESTIMATED_SPEEDUP = 1.5  # below this the estimate is too close to call: train dense


def estimated_speedup(masks: dict[str, dict[str, Tensor]], linear_shapes: dict[str, dict[str, tuple[int, int]]],
                      rows: int) -> float:
    """Estimated dense-masked / sparse cost of one update of the masked Linear layers (`rows`
    rows per layer, weights named as in `masks`; `linear_shapes` gives their (out, in) shapes)."""
    dense = sparse = 0.0
    for net, layer_masks in masks.items():
        for pname, mask in layer_masks.items():
            if pname not in linear_shapes.get(net, {}):
                continue  # not a Linear (e.g. a GRU's weights): dense in both cases
            out_f, in_f = linear_shapes[net][pname]
            dense += out_f * in_f * rows
            if kernel_for(mask) == "csr":  # a small dense-ish layer on csr costs about its dense product
                sparse += min(CSR_COST_PER_KEPT * int(mask.sum()) * rows + CSR_FIXED_COST, out_f * in_f * rows)
            else:
                sparse += out_f * in_f * rows
    return dense / sparse if sparse else 0.0


def kernels_by_rule(networks: dict[str, PrunableNetwork], masks: dict[str, dict[str, Tensor]],
                    rows: int) -> tuple[str, float]:
    """'sparse' when `estimated_speedup` is at least MIN_ESTIMATED_SPEEDUP, else 'dense'; and the estimate.
    Depends only on layer shapes, masks and the batch: never on timing."""
    shapes = {name: {f"{layer}.weight": tuple(linear.weight.shape) for layer, linear in _linear_names(net.module).items()}
              for name, net in networks.items()}
    ratio = estimated_speedup(masks, shapes, rows)
    return ("sparse" if ratio >= MIN_ESTIMATED_SPEEDUP else "dense"), ratio


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of `call()` over `repeats` timed calls after `warmup` untimed ones: the
    one timing loop behind every measured kernel choice and latency table."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
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
    faster sparse than dense at this batch size, else 'dense'; and the measured ratio.

    Timing depends on the machine's load, so this is only behind --kernels measure. Its probe
    draws from a private random stream: it never moves the run's own (global) generator."""
    dense_s = sparse_s = 0.0
    with torch.random.fork_rng(devices=[]):
        for name, net in networks.items():
            for layer_name, linear in _linear_names(net.module).items():
                mask = masks[name].get(f"{layer_name}.weight")
                if mask is None:
                    continue
                x = torch.randn(batch_size, linear.in_features, device=linear.weight.device, requires_grad=True)
                probe = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device)
                sparse = SparseLinear(linear, mask, kernel_for(mask))
                dense_s += median_seconds(lambda: probe(x).sum().backward(), repeats)
                sparse_s += median_seconds(lambda: sparse(x).sum().backward(), repeats)
    ratio = dense_s / sparse_s if sparse_s else 0.0
    return ("sparse" if ratio >= margin else "dense"), ratio


# --- inference copies: the same layers, each on a kernel suited to acting ---------------------

INFERENCE_KERNELS = ("auto", "dense", "sparse")  # per copy: by `inference_kernel_for` / all dense / all csr-addmm
# From this many rows per call embedding bags ('csr') beat torch's CSR addmm (at 1-10 rows the
# addmm is fastest, at 100 the bags; benchmarks/README.md has the per-layer timings).
INFERENCE_CSR_MIN_ROWS = 32


def inference_kernel_for(mask: Tensor, rows: int) -> str:
    """'dense', 'csr-addmm' or 'csr': the kernel of an inference copy's layer with this mask, for
    `rows` rows per call. A fixed rule, not a timing, so a copy computes the same actions on any
    machine and in every run: small layers (under SMALL_LAYER_WEIGHTS weights: acting on a few
    rows, their dense product costs less than a CSR product's call) and dense-ish ones (over
    MAX_CSR_DENSITY) stay dense; the others take CSR addmm for a few rows and bags from
    INFERENCE_CSR_MIN_ROWS rows."""
    if mask.numel() < SMALL_LAYER_WEIGHTS or float(mask.float().mean()) > MAX_CSR_DENSITY:
        return "dense"
    return "csr" if rows >= INFERENCE_CSR_MIN_ROWS else "csr-addmm"


def _inference_layer(linear: nn.Linear, rows: int, kernels: str) -> nn.Module:
    """`linear` itself, or a frozen SparseLinear over its non-zero weights on the kernel `kernels`
    asks for ('sparse': csr-addmm; 'auto': `inference_kernel_for`)."""
    mask = linear.weight.detach() != 0
    kernel = {"dense": "dense", "sparse": "csr-addmm"}.get(kernels) or inference_kernel_for(mask, rows)
    return linear if kernel == "dense" else SparseLinear(linear, mask, kernel).freeze()


def inference_copy(module: nn.Module, rows: int, kernels: str = "auto") -> nn.Module:
    """A copy of a trained (dense masked) `module` for inference on `rows` rows per call: each
    Linear keeps its dense weight or becomes a frozen SparseLinear over its non-zero weights
    (INFERENCE_KERNELS), and every MLP with a sparse layer runs as one fused chain, dense layers
    included (one loop without per-module overhead, which dominates when acting on a few rows)."""
    if kernels not in INFERENCE_KERNELS:
        raise ValueError(f"unknown inference kernels {kernels!r}")
    module = copy.deepcopy(module)
    for name, linear in _linear_names(module).items():
        _replace(module, name, _inference_layer(linear, rows, kernels))
    _mark_chains(module, dense_layers=True)
    for m in module.modules():
        if isinstance(m, MLP) and m.sparse_chain:
            m.fused_forward = _FrozenChain(m)
    return module


class _FrozenChain:
    """An inference copy's fused MLP, its arguments to the C++ loop prepared once (the weights of
    an inference copy never change): acting on a few rows, the per-call preparation in
    `chain_forward` costs as much as a small layer's product. Anything else (no C++ library,
    gradients wanted, wide batches that run in row blocks) takes the general path."""

    def __init__(self, mlp: MLP):
        layers, act = chain_parts(mlp)
        params = tuple(p.detach() for layer in layers for p in _layer_params(layer))
        self.args = _native_forward_args(_structure(layers, act), _product_weights(layers, params))

    def __call__(self, mlp: MLP, x: Tensor) -> Tensor:
        ext = _native(x)
        if ext is None or x.dim() != 2 or x.shape[0] > 2 * BLOCK_COLUMNS or torch.is_grad_enabled():
            return _fused_mlp_forward(mlp, x)
        return ext.chain_pass(x, *self.args)[0]


def layer_kernels_in(module: nn.Module) -> list[str]:
    """Each Linear's kernel in module order ('dense' for an nn.Linear)."""
    return [m.kernel if isinstance(m, SparseLinear) else "dense" for m in module.modules()
            if isinstance(m, (SparseLinear, nn.Linear))]
