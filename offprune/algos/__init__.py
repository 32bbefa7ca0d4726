"""Algorithms: one readable file each, every one a `Config` dataclass and an `Agent` built on
`offprune.algos.base.AgentBase`, which states the contract the loop and the tools use."""

from types import ModuleType

from offprune.algos import bc, bc_mlp, bcq, dreamer, iql, td3_bc

ALGOS: dict[str, ModuleType] = {"bcq": bcq, "bc": bc, "bc-mlp": bc_mlp, "dreamer": dreamer, "td3-bc": td3_bc,
                                "iql": iql}

__all__ = ["ALGOS"]
