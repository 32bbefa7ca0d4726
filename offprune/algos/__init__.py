"""Algorithms: one readable file each. Every module exposes `Config` (a frozen dataclass) and
`Agent(obs_dim, act_dim, max_action, config, device)` with `modules`, `optimizers`,
`prunable_networks()`, `update(batch) -> dict[str, float]` and `act(obs) -> action`.

Optional, used by the generic loop when present: module-level `make_sampler(dataset, config,
device, seed)` (default: uniform transitions), `Agent.prepare(dataset)` (once, before pruning),
`Agent.reset()` (before each evaluation episode) and `Agent.evaluation_metrics(sampler,
episode_rewards) -> dict[str, float]` (extra result columns at each evaluation).
"""

from types import ModuleType

from offprune.algos import bc, bc_mlp, bcq, dreamer

ALGOS: dict[str, ModuleType] = {"bcq": bcq, "bc": bc, "bc-mlp": bc_mlp, "dreamer": dreamer}

__all__ = ["ALGOS"]
