"""Algorithms: one readable file each. Every module exposes `Config` (a frozen dataclass) and
`Agent(obs_dim, act_dim, max_action, config, device)` with `modules`, `optimizers`,
`prunable_networks()`, `update(batch) -> dict[str, float]` and `act(obs) -> action`.
"""

from types import ModuleType

from offprune.algos import bc, bc_mlp, bcq

ALGOS: dict[str, ModuleType] = {"bcq": bcq, "bc": bc, "bc-mlp": bc_mlp}

__all__ = ["ALGOS"]
