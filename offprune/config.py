"""Run configuration: one frozen dataclass, validated with messages a user can act on."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from offprune.errors import UserError
from offprune.prune import DEFAULT_PRUNE_BATCH, METHODS, SCOPES

# Budget profiles: steps, evaluation cadence and episodes. `paper` is the pruning paper's protocol.
PROFILES: dict[str, dict[str, int]] = {
    "quick": {"steps": 5_000, "eval_every": 1_000, "eval_episodes": 5},
    "paper": {"steps": 1_000_000, "eval_every": 5_000, "eval_episodes": 10},
}

# Fields a resumed run may change: they extend or relocate the run without changing what it is.
RESUMABLE_CHANGES = ("steps", "device", "threads", "progress")


@dataclass(frozen=True)
class RunConfig:
    algo: str = "bcq"  # key of offprune.algos.ALGOS
    dataset: str = "hopper-random-v5"  # dataset name (under $OFFPRUNE_DATASETS or ./datasets) or path
    prune: str = "snip"  # pruning criterion, or 'dense'
    sparsity: float = 0.9  # fraction of prunable weights removed, in [0, 1)
    scope: str = "global"  # 'global': one ranking per network (paper); 'layer': per weight matrix
    seed: int = 0
    steps: int = PROFILES["quick"]["steps"]  # gradient updates
    eval_every: int = PROFILES["quick"]["eval_every"]  # updates between evaluations (and checkpoints)
    eval_episodes: int = PROFILES["quick"]["eval_episodes"]
    prune_batch: int | None = None  # samples in the ONE pruning batch; None: SNIP 100, GraSP 200
    env: str | None = None  # gymnasium id to evaluate in; None: from the file or the dataset name
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    threads: int | None = None  # torch intra-op threads; None: torch's default (1 for sparse kernels)
    kernels: str = "auto"  # 'dense' (masked dense matrices), 'sparse' (kept weights only), 'auto' (measured)
    out: str = "runs"  # results folder; this run writes to OUT/RUN_ID/
    run_id: str | None = None  # None: derived from algo, dataset, criterion, sparsity and seed
    progress: bool | None = None  # progress bar; None: only on a terminal

    def validate(self) -> "RunConfig":
        from offprune.algos import ALGOS

        if self.algo not in ALGOS:
            raise UserError(f"unknown algo '{self.algo}' (choose from {', '.join(ALGOS)})")
        if self.prune not in METHODS:
            raise UserError(f"unknown prune method '{self.prune}' (choose from {', '.join(METHODS)})")
        if not isinstance(self.sparsity, (int, float)) or math.isnan(self.sparsity) or not 0 <= self.sparsity < 1:
            raise UserError(f"--sparsity must be in [0, 1) (the fraction of weights removed), got {self.sparsity}")
        if self.prune == "dense" and self.sparsity > 0:
            raise UserError(f"--prune dense removes no weights; drop --sparsity {self.sparsity} or choose a criterion")
        if self.prune != "dense" and self.sparsity == 0:
            raise UserError(f"--prune {self.prune} at sparsity 0 removes nothing; use --prune dense")
        if self.scope not in SCOPES:
            raise UserError(f"unknown scope '{self.scope}' (choose from {', '.join(SCOPES)})")
        for name in ("steps", "eval_every", "eval_episodes"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.prune_batch is not None and self.prune_batch < 1:
            raise UserError("--prune-batch must be at least 1")
        if self.kernels not in ("auto", "dense", "sparse"):
            raise UserError(f"unknown kernels '{self.kernels}' (choose from auto, dense, sparse)")
        if self.kernels == "sparse" and self.prune == "dense":
            raise UserError("--kernels sparse needs pruned networks (sparsity > 0); use --kernels dense or auto")
        if self.threads is not None and self.threads < 1:
            raise UserError("--threads must be at least 1")
        return self

    @property
    def pruning_batch_size(self) -> int:
        return self.prune_batch or DEFAULT_PRUNE_BATCH.get(self.prune, 100)

    @property
    def name(self) -> str:
        if self.run_id:
            return self.run_id
        scope = "" if self.scope == "global" else f"_{self.scope}"
        return f"{self.algo}_{Path(self.dataset).stem}_{self.prune}{scope}_s{self.sparsity:g}_seed{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def differences(self, other: dict) -> list[str]:
        """Fields (other than RESUMABLE_CHANGES) whose value differs from a saved config."""
        mine = self.to_dict()
        return [k for k in mine if k not in RESUMABLE_CHANGES and other.get(k) != mine[k]]
