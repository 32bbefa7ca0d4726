"""What a pruned agent costs to keep and to run.

Byte counts of every storage format (the paper's torch.sparse COO among them), offprune's packed,
lossless format (`export_packed` / `load_packed`), and a sparse inference path that uses torch's
CSR kernel only for the layers and batch sizes where it measures faster.

The packed file:
    MAGIC | u32 format version | u64 header length | JSON header | payload | sha256 of all before it
Each tensor is stored in the smallest of three encodings:
    raw     its bytes as they are (dense tensors, biases);
    bitmap  one bit per entry marking non-zeros + the non-zero values;
    gaps    LZMA-compressed gaps between non-zeros (a gap g is g//255 bytes of 255 then g%255) +
            the non-zero values; at 95% sparsity this is within ~3% of the mask's entropy.
Sparse encodings also list the positions of any -0.0 (gap-coded; empty for offprune's own runs,
whose pruned weights are +0.0), so every float round-trips bit for bit, NaN payloads included.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import lzma
import math
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import offprune
from offprune import atomic
from offprune.checkpoint import build_agent, load_run, stored_networks  # noqa: F401  (public here too)
from offprune.errors import UserError
from offprune.sparse import csr_tensor, csr_times

MAGIC = b"OFFPRUNE-PACK\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<IQ")  # format version, header length
_DIGEST = 32

FORMATS = ("dense", "coo", "csr_int64", "csr_int32", "bitmap", "packed", "entropy")
FORMAT_NOTES = {
    "dense": "torch.save(state_dict), float32",
    "coo": "torch.save, every parameter .to_sparse() (int64 indices): the paper's Table 1",
    "csr_int64": "torch.save, weight matrices as CSR with int64 indices, biases dense",
    "csr_int32": "torch.save, weight matrices as CSR with int32 indices, biases dense",
    "bitmap": "payload: 1 bit per weight + float32 non-zeros, biases dense",
    "packed": "offprune export file (per tensor the smallest of raw / bitmap / gaps+LZMA)",
    "entropy": "lower bound: mask entropy + float32 non-zeros, biases dense",
}


# --------------------------------------------------------------------------------------------
# Byte counts
# --------------------------------------------------------------------------------------------
def saved_size(obj: object) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def dense_to_csr(t: Tensor, index_dtype: torch.dtype) -> Tensor:
    # Rebuild from cloned parts: to_sparse_csr() can leave indices as views of a bigger buffer,
    # which torch.save would write whole.
    with warnings.catch_warnings():  # torch's notice that sparse CSR support is in beta
        warnings.simplefilter("ignore", UserWarning)
        c = t.detach().to_sparse_csr()
    return csr_tensor(c.crow_indices().to(index_dtype).clone(), c.col_indices().to(index_dtype).clone(),
                      c.values().clone(), tuple(t.shape))


def _nonzero(t: Tensor) -> np.ndarray:
    """Flat bool array of entries that are not zero (NaN counts as non-zero, -0.0 as zero)."""
    return t.detach().contiguous().cpu().numpy().reshape(-1) != 0


def entropy_bits(n: int, nnz: int) -> float:
    """n * H(nnz / n): the fewest bits that can say which of n positions are the nnz non-zeros."""
    if nnz in (0, n):
        return 0.0
    p = nnz / n
    return n * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def tensor_payload_bytes(t: Tensor) -> dict[str, int]:
    """Exact payload bytes of one tensor in each format (no container overhead).

    Weight matrices (2-D) are stored sparse; everything else dense in every format.
    """
    n = t.numel()
    if t.ndim != 2 or t.dtype != torch.float32:
        return {f: n * t.element_size() for f in ("dense", "coo", "csr_int64", "csr_int32", "bitmap", "entropy")}
    nnz = int(_nonzero(t).sum())
    rows = t.shape[0]
    return {
        "dense": 4 * n,
        "coo": nnz * (2 * 8 + 4),
        "csr_int64": nnz * (8 + 4) + (rows + 1) * 8,
        "csr_int32": nnz * (4 + 4) + (rows + 1) * 4,
        "bitmap": math.ceil(n / 8) + 4 * nnz,
        "entropy": math.ceil(entropy_bits(n, nnz) / 8) + 4 * nnz,
    }


def network_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of one network in every format of FORMATS."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    payload = [tensor_payload_bytes(v) for v in state.values()]
    return {
        "dense": saved_size(state),
        "coo": saved_size({k: v.to_sparse() for k, v in state.items()}),
        "csr_int64": saved_size({k: dense_to_csr(v, torch.int64) if v.ndim == 2 else v for k, v in state.items()}),
        "csr_int32": saved_size({k: dense_to_csr(v, torch.int32) if v.ndim == 2 else v for k, v in state.items()}),
        "bitmap": sum(p["bitmap"] for p in payload),
        "packed": len(pack_networks({"net": module})),
        "entropy": sum(p["entropy"] for p in payload),
    }


def storage_table(networks: dict[str, nn.Module]) -> "pd.DataFrame":  # noqa: F821
    """One row per network plus 'total', one column per format (bytes), and kept/total weights."""
    import pandas as pd

    rows = []
    for name, module in networks.items():
        weights = [p for p in module.state_dict().values() if p.ndim == 2]
        rows.append({
            "network": name,
            "weights": sum(w.numel() for w in weights),
            "nonzero_weights": sum(int(_nonzero(w).sum()) for w in weights),
            **network_bytes(module),
        })
    table = pd.DataFrame(rows)
    total = {"network": "total", **{c: int(table[c].sum()) for c in table.columns if c != "network"}}
    total["packed"] = len(pack_networks(networks))  # one file holds them all
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


# --------------------------------------------------------------------------------------------
# Packed format
# --------------------------------------------------------------------------------------------
def _encode_gaps(positions: np.ndarray) -> bytes:
    gaps = np.diff(positions, prepend=-1) - 1
    full, rest = np.divmod(gaps, 255)
    counts = full + 1  # 'full' bytes of 255, then one byte 'rest'
    out = np.full(int(counts.sum()), 255, dtype=np.uint8)
    out[np.cumsum(counts) - 1] = rest
    return lzma.compress(out.tobytes(), preset=9 | lzma.PRESET_EXTREME)


def _decode_gaps(blob: bytes) -> np.ndarray:
    stream = np.frombuffer(lzma.decompress(blob), dtype=np.uint8).astype(np.int64)
    ends = np.flatnonzero(stream != 255)
    gaps = np.diff(np.cumsum(stream)[ends], prepend=0)
    return np.cumsum(gaps + 1) - 1


_NEGATIVE_ZERO = np.uint32(0x80000000)
_SPARSE_HEAD = struct.Struct("<QQ")  # bytes of the position part, bytes of the -0.0 part


def _encode_tensor(t: Tensor) -> tuple[str, bytes, int]:
    array = t.detach().contiguous().cpu().numpy()
    raw = array.tobytes()
    if array.dtype != np.float32 or array.size == 0:
        return "raw", raw, array.size
    flat = array.reshape(-1)
    bits = flat.view(np.uint32)
    nonzero = flat != 0
    values = bits[nonzero].tobytes()
    negative_zeros = np.flatnonzero(bits == _NEGATIVE_ZERO)
    neg = _encode_gaps(negative_zeros) if len(negative_zeros) else b""
    bitmap = np.packbits(nonzero).tobytes()
    candidates = [("raw", raw)]
    if len(bitmap) + len(values) < len(raw):  # sparse encodings only pay when the tensor is sparse
        for encoding, positions in (("bitmap", bitmap), ("gaps", _encode_gaps(np.flatnonzero(nonzero)))):
            candidates.append((encoding, _SPARSE_HEAD.pack(len(positions), len(neg)) + positions + neg + values))
    encoding, blob = min(candidates, key=lambda c: len(c[1]))
    return encoding, blob, int(nonzero.sum())


def _decode_tensor(entry: dict, blob: bytes) -> Tensor:
    dtype = np.dtype(entry["dtype"])
    shape = tuple(entry["shape"])
    n = int(np.prod(shape, dtype=np.int64))
    if entry["encoding"] == "raw":
        return torch.from_numpy(np.frombuffer(blob, dtype=dtype, count=n).copy().reshape(shape))
    if entry["encoding"] not in ("bitmap", "gaps"):
        raise UserError(f"unknown tensor encoding '{entry['encoding']}' in packed file")
    position_bytes, neg_bytes = _SPARSE_HEAD.unpack_from(blob)
    start = _SPARSE_HEAD.size
    part = blob[start : start + position_bytes]
    if entry["encoding"] == "bitmap":
        positions = np.flatnonzero(np.unpackbits(np.frombuffer(part, np.uint8), count=n))
    else:
        positions = _decode_gaps(part)
    start += position_bytes
    bits = np.zeros(n, dtype=np.uint32)
    if neg_bytes:
        bits[_decode_gaps(blob[start : start + neg_bytes])] = _NEGATIVE_ZERO
    start += neg_bytes
    values = np.frombuffer(blob[start:], dtype=np.uint32)
    if len(values) != len(positions) or len(positions) != entry["nnz"]:
        raise UserError("packed file is inconsistent: position count differs from value count")
    bits[positions] = values
    return torch.from_numpy(bits.view(np.float32).reshape(shape))


def pack_networks(networks: dict[str, nn.Module], agent_spec: dict | None = None) -> bytes:
    """The packed file's bytes for `networks` (name -> module)."""
    payload = bytearray()
    entries: dict[str, list[dict]] = {}
    for name, module in networks.items():
        entries[name] = []
        for key, t in module.state_dict().items():
            encoding, blob, nnz = _encode_tensor(t)
            entries[name].append({
                "name": key, "shape": list(t.shape), "dtype": str(t.detach().cpu().numpy().dtype),
                "encoding": encoding, "offset": len(payload), "nbytes": len(blob), "nnz": nnz,
            })
            payload += blob
    header = json.dumps({
        "format_version": FORMAT_VERSION,
        "offprune_version": offprune.__version__,
        "torch_version": torch.__version__,
        "agent": agent_spec,
        "payload_bytes": len(payload),
        "networks": entries,
    }, separators=(",", ":")).encode()
    body = MAGIC + _PREFIX.pack(FORMAT_VERSION, len(header)) + header + bytes(payload)
    return body + hashlib.sha256(body).digest()


def export_packed(run: str | Path, out: str | Path) -> Path:
    """Write every stored network of a run (or checkpoint) to `out` in the packed format, atomically."""
    return write_packed(*load_run(run), out)


def write_packed(agent, ckpt: dict, out: str | Path) -> Path:
    """Write an agent loaded by load_run to `out` in the packed format, atomically."""
    data = pack_networks(stored_networks(agent), ckpt["agent"])
    return atomic.write_bytes(out, data)


def read_packed(path: str | Path) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """(header, {network: state_dict}) after checking magic, version, length and checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read packed file {path} ({e.strerror or e})") from None
    fixed = len(MAGIC) + _PREFIX.size
    if not data.startswith(MAGIC):
        raise UserError(f"{path}: not an offprune packed file")
    if len(data) < fixed + _DIGEST:
        raise UserError(f"{path}: packed file is truncated")
    version, header_len = _PREFIX.unpack_from(data, len(MAGIC))
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: packed format version {version} is newer than this offprune reads "
                        f"({FORMAT_VERSION}); upgrade offprune")
    try:
        header = json.loads(data[fixed : fixed + header_len])
        expected = fixed + header_len + header["payload_bytes"] + _DIGEST
    except (ValueError, KeyError, UnicodeDecodeError):
        raise UserError(f"{path}: packed file is truncated or its header is corrupt") from None
    if len(data) < expected:
        raise UserError(f"{path}: packed file is truncated ({len(data)} of {expected} bytes)")
    body, digest = data[: expected - _DIGEST], data[expected - _DIGEST : expected]
    if len(data) != expected or hashlib.sha256(body).digest() != digest:
        raise UserError(f"{path}: checksum mismatch: the packed file was altered or is corrupt")
    payload = memoryview(body)[fixed + header_len :]
    states = {
        name: {e["name"]: _decode_tensor(e, bytes(payload[e["offset"] : e["offset"] + e["nbytes"]])) for e in entries}
        for name, entries in header["networks"].items()
    }
    return header, states


def load_packed_agent(path: str | Path):
    """An agent (on CPU) whose stored networks hold exactly the packed weights."""
    header, states = read_packed(path)
    if not header.get("agent"):
        raise UserError(f"{path}: packed file has no agent description")
    agent = build_agent(header["agent"])
    for name, state in states.items():
        agent.modules[name].load_state_dict(state)
    for name, module in agent.modules.items():  # targets start as copies of their sources
        if name.endswith("_target"):
            module.load_state_dict(agent.modules[name.removesuffix("_target")].state_dict())
    return agent


def load_packed(path: str | Path) -> dict[str, nn.Module]:
    """Network name -> nn.Module with weights bit-identical to those exported."""
    return stored_networks(load_packed_agent(path))


# --------------------------------------------------------------------------------------------
# Sparse inference
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Tables for runs and for the paper
# --------------------------------------------------------------------------------------------

# The paper's Table 1 (BCQ, s=17, a=6), 10^6 bytes: dense torch.save and SNIP 95% torch.sparse.
PAPER_TABLE1 = {"actor": (0.5287, 0.14297), "critic": (1.04492, 0.2824), "vae": (4.7621, 1.2303)}


def run_storage(run: str | Path, loaded: tuple | None = None):
    """Storage table of a run's stored networks, also written as RUN_DIR/storage.parquet in long
    form (one row per network and format, with the run's identity) for reports. `loaded` is the
    (agent, checkpoint) of load_run(run) when the caller has it already."""
    import pandas as pd

    from offprune.results import STORAGE_FILE, write_parquet_atomic

    agent, ckpt = loaded or load_run(run)
    table = storage_table(stored_networks(agent))
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    cfg = ckpt.get("config", {})
    identity = {"run_id": run_dir.name, "algo": cfg.get("algo"), "dataset": Path(str(cfg.get("dataset"))).stem,
                "prune": cfg.get("prune"), "target_sparsity": cfg.get("sparsity"), "seed": cfg.get("seed"),
                "step": ckpt["step"]}
    long = table.melt(id_vars=["network", "weights", "nonzero_weights"], value_vars=list(FORMATS),
                      var_name="format", value_name="bytes")
    write_parquet_atomic(pd.DataFrame([{**identity, **r} for r in long.to_dict("records")]), run_dir / STORAGE_FILE)
    return table


def table1(seed: int = 0):
    """The paper's Table 1 recomputed from fresh BCQ networks (s=17, a=6) pruned by SNIP to 95%
    on one random batch (sizes depend only on how many weights are kept)."""
    import pandas as pd

    from offprune.data import Batch
    from offprune.prune import MaskEnforcer, compute_masks

    torch.manual_seed(seed)
    agent = build_agent({"algo": "bcq", "obs_dim": 17, "act_dim": 6, "max_action": 1.0, "config": {}})
    dense = {n: network_bytes(m) for n, m in stored_networks(agent).items()}
    g = torch.Generator().manual_seed(seed)
    batch = Batch(torch.randn(100, 17, generator=g), torch.rand(100, 6, generator=g) * 2 - 1,
                  torch.randn(100, 1, generator=g), torch.randn(100, 17, generator=g), torch.ones(100, 1))
    networks = agent.prunable_networks()
    MaskEnforcer(networks, compute_masks(networks, "snip", 0.95, "global", lambda: batch, g), [])
    sparse = {n: network_bytes(m) for n, m in stored_networks(agent).items()}
    rows = []
    for name, (paper_dense, paper_sparse) in PAPER_TABLE1.items():
        rows.append({
            "network": name,
            "paper_dense_MB": paper_dense, "dense_MB": dense[name]["dense"] / 1e6,
            "paper_snip95_MB": paper_sparse, "coo95_MB": sparse[name]["coo"] / 1e6,
            "csr_int32_95_MB": sparse[name]["csr_int32"] / 1e6, "packed95_MB": sparse[name]["packed"] / 1e6,
            "entropy95_MB": sparse[name]["entropy"] / 1e6,
        })
    table = pd.DataFrame(rows)
    table["dense_vs_paper_%"] = 100 * (table.dense_MB / table.paper_dense_MB - 1)
    table["coo_vs_paper_%"] = 100 * (table.coo95_MB / table.paper_snip95_MB - 1)
    return table
