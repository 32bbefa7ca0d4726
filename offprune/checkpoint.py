"""A run's folder: its file names, its checkpoint (what it holds, how it is saved and read back),
its lock, and agents rebuilt from it.

OUT/RUN_ID/
  config.json          the RunConfig (written once the run is known to start or resume cleanly)
  masks.pt             the masks computed at initialisation
  checkpoint.pt        everything a resume needs, written at every evaluation
  checkpoint.prev.pt   the one before: a checkpoint that cannot be read falls back to it
  results.parquet      one row per evaluation (written after the checkpoint it describes)
  layers.parquet       per-layer kept counts
  .lock                held by the process writing the run
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from offprune import atomic
from offprune.algos import ALGOS
from offprune.algos.base import stored_modules
from offprune.errors import UserError

CONFIG_FILE = "config.json"
MASKS_FILE = "masks.pt"
CHANGES_FILE = "mask_changes.parquet"  # masks that change in training: per layer and change, kept / grown / dropped
SCORES_FILE = "scores.pt"  # the scores the masks were taken from (score transfer reads them)
CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
LOCK_FILE = ".lock"


class CheckpointError(UserError):
    """No checkpoint of a run could be read; the message says which and what to do."""


# ------------------------------------------------------------------------------ saving / loading
def save(run_dir: Path, state: dict) -> None:
    """Write `state` as the run's checkpoint, keeping the previous one: the new file is complete
    on disk before the old one is renamed to checkpoint.prev.pt."""
    new = run_dir / f".{CHECKPOINT_FILE}.new"
    current = run_dir / CHECKPOINT_FILE
    try:
        atomic.torch_save(state, new)
    except atomic.WriteError as e:
        raise atomic.WriteError(str(e).replace(str(new), str(current))) from None
    try:
        if current.exists():
            os.replace(current, run_dir / PREVIOUS_CHECKPOINT_FILE)
        os.replace(new, current)
    except OSError as e:
        raise atomic.WriteError(f"cannot write {current}: {e.strerror or e}") from None


def _read(path: Path, device) -> dict:
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(ckpt, dict) or "modules" not in ckpt or "step" not in ckpt:
        raise ValueError("not an offprune checkpoint")
    return ckpt


def load(run_dir: Path, device="cpu", log=lambda message: None) -> dict | None:
    """The newest readable checkpoint of a run (None when it has none). Falls back to the previous
    generation, saying so; raises CheckpointError naming the files when none can be read."""
    candidates = [run_dir / CHECKPOINT_FILE, run_dir / PREVIOUS_CHECKPOINT_FILE]
    present = [p for p in candidates if p.is_file()]
    if not present:
        return None
    problems = []
    for path in present:
        try:
            ckpt = _read(path, device)
        except Exception as e:  # truncated, corrupt, foreign: try the older one
            problems.append(f"{path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        if problems:
            log(f"warning: {problems[0]}; resuming from {path.name} (step {ckpt['step']})")
        return ckpt
    raise CheckpointError(f"cannot read the checkpoint of {run_dir} ({'; '.join(problems)}); move it aside to "
                          f"restart the run from scratch (mv {present[0]} {present[0]}.bad) or delete {run_dir}")


def move_aside(run_dir: Path, names: tuple[str, ...] = (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE)) -> list[Path]:
    """Rename the run's checkpoints (or other `names`) to *.unreadable-TIMESTAMP (kept for
    inspection); returns them."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name in names:
        path = run_dir / name
        if path.is_file():
            target = path.with_name(f"{name}.unreadable-{stamp}")
            os.replace(path, target)
            moved.append(target)
    return moved


# ------------------------------------------------------------------------------ the lock
@contextlib.contextmanager
def locked(run_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold the run's lock while writing it. `wait`: block until another process releases it
    (a sweep waiting for an orphaned worker), else fail at once with one line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"run {run_dir} is being written by another process; wait for it to end "
                            "or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock."""
    try:
        with open(run_dir / LOCK_FILE, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


# ------------------------------------------------------------------------------ the dense layout
# Checkpoints hold every module and optimizer state in the dense masked layout (an [out, in]
# weight with zeros where pruned, and moments of the same shape), whatever kernels trained the
# run, so any tool loads them into a freshly built agent. A run on sparse kernels converts on save
# and back on resume (values = dense[kept positions]: bit for bit).
LAYOUT = "dense"


def _sparse_layers(agent) -> dict[int, object]:
    from offprune.sparse import SparseLinear

    return {id(m.values): m for module in agent.modules.values() for m in module.modules() if isinstance(m, SparseLinear)}


def dense_module_states(agent) -> dict[str, dict]:
    from offprune.sparse import SparseLinear
    from offprune.supermask import effective_state_dict

    states = {}
    for name, module in agent.modules.items():
        state = effective_state_dict(module)  # learned masks: the weights as trained, zero where pruned
        for prefix, m in module.named_modules():
            if isinstance(m, SparseLinear):
                head = f"{prefix}." if prefix else ""
                for key in [k for k in state if k.startswith(head) and k[len(head):].count(".") == 0]:
                    del state[key]
                state[f"{head}weight"] = m.dense_weight(m.values.detach()).clone()
                state[f"{head}bias"] = m.bias.detach().clone()
        states[name] = state
    return states


def _optimizer_params(opt) -> list:
    return [p for group in opt.param_groups for p in group["params"]]


def dense_optimizer_states(agent) -> dict[str, dict]:
    layers = _sparse_layers(agent)
    states = {}
    for name, opt in agent.optimizers.items():
        state = opt.state_dict()
        for index, p in enumerate(_optimizer_params(opt)):
            layer = layers.get(id(p))
            if layer is not None and index in state["state"]:
                state["state"][index] = {k: layer.dense_weight(v) if torch.is_tensor(v) and v.shape == p.shape else v
                                         for k, v in state["state"][index].items()}
        states[name] = state
    return states


def load_optimizer_states(agent, states: dict[str, dict]) -> None:
    """Optimizer states saved in the dense layout, into optimizers whose parameters may be sparse."""
    layers = _sparse_layers(agent)
    for name, opt in agent.optimizers.items():
        state = states[name]
        params = _optimizer_params(opt)
        converted = {}
        for index, entry in state["state"].items():
            layer = layers.get(id(params[int(index)]))
            if layer is None:
                converted[index] = entry
                continue
            converted[index] = {k: v.flatten()[layer.flat_index].clone() if torch.is_tensor(v) and v.dim() == 2 else v
                                for k, v in entry.items()}
        opt.load_state_dict({**state, "state": converted})


# ------------------------------------------------------------------------------ agents from runs
def config_from_dict(config_cls, values: dict):
    """Rebuild a config dataclass (an algorithm's Config, a RunConfig) from JSON, which turns
    tuples into lists (nested ones too): turn them back; keys it does not know are left out."""
    def as_tuples(v):
        return tuple(as_tuples(x) for x in v) if isinstance(v, list) else v

    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: as_tuples(v) for k, v in values.items() if k in names})


def build_agent(spec: dict, device: str | torch.device = "cpu"):
    algo = ALGOS[spec["algo"]]
    config = config_from_dict(algo.Config, spec["config"])
    return algo.Agent(spec["obs_dim"], spec["act_dim"], spec["max_action"], config, torch.device(device))


def stored_networks(agent) -> dict[str, nn.Module]:
    """The networks an agent needs to act and to keep training; target copies (AgentBase.targets)
    are left out: they are training-time copies, rebuilt from their sources."""
    return stored_modules(agent)


def load_masks(run_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """A run's masks (network -> weight name -> bool tensor), for training another run with them."""
    path = Path(run_dir) / MASKS_FILE
    if not path.is_file():
        raise UserError(f"no masks at {path} (a run writes them when it prunes, before training)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not readable masks ({type(e).__name__})") from None


def load_scores(run_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """A run's pruning scores (network -> weight name -> float tensor)."""
    path = Path(run_dir) / SCORES_FILE
    if not path.is_file():
        raise UserError(f"no scores at {path} (runs pruned by a criterion keep them; runs made before "
                        "offprune saved scores, and dense runs, have none)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not readable scores ({type(e).__name__})") from None


def load_run(path: str | Path):
    """(agent on CPU with dense masked modules, checkpoint dict) from a run folder or a checkpoint file."""
    from offprune.sparse import convert_to_dense, convert_to_sparse

    path = Path(path)
    if path.is_dir():
        ckpt = load(path)
        if ckpt is None:
            raise UserError(f"no checkpoint at {path / CHECKPOINT_FILE} (a run writes one at its first evaluation)")
    else:
        if not path.is_file():
            raise UserError(f"no checkpoint at {path} (a run writes one at its first evaluation)")
        try:
            ckpt = _read(path, "cpu")
        except Exception as e:
            raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if "agent" not in ckpt:
        raise UserError(f"{path}: not an offprune checkpoint (or written before offprune recorded agent specs)")
    agent = build_agent(ckpt["agent"])
    # checkpoints before the dense layout kept a sparse run's modules in its sparse layout
    sparse = ckpt.get("kernels") == "sparse" and ckpt.get("layout") != LAYOUT
    if sparse:  # trained with sparse kernels: rebuild that layout, load, then turn back to dense
        convert_to_sparse(agent.prunable_networks(), ckpt["masks"], [])
    for name, module in agent.modules.items():
        module.load_state_dict(ckpt["modules"][name])
        if sparse:
            convert_to_dense(module)
    return agent, ckpt
