"""What a pruned agent costs to keep: byte counts of every storage format (the paper's
torch.sparse COO among them, offprune's packed format), per run and for the paper's Table 1.
The packed format itself is `offprune.packed`; inference latency `offprune.speed`.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from offprune.checkpoint import build_agent, load_run, stored_networks
from offprune.packed import pack_networks
from offprune.sparse import csr_tensor

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
