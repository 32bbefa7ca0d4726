import os
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from offprune.data import Batch, SequenceBatch, write_d4rl_file
from offprune.data.generate import generate_random


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `offprune ARGS` run in-process."""
    from offprune.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def repeat_until_a_helper_runs(ext, step: Callable[[], None], seconds: float = 30.0) -> None:
    """Calls `step` (which checks its own results) until a helper thread of the compiled library
    `ext` has run a part of it, for at most `seconds`. One call proves nothing: a helper asleep, or
    without a CPU on a busy machine, may start after the caller has finished small work and taken
    the helper's part itself (the same bits either way); a helper polls for a while after a task, so
    later calls find it awake (call this inside `sparse_threads(2)`: leaving it sends the helper to
    sleep). Where this process may use one CPU, no helper starts and one call is made."""
    before = ext.helper_parts_run()
    if len(os.sched_getaffinity(0)) < 2:
        step()
        return
    calls, start = 0, time.monotonic()
    while calls == 0 or time.monotonic() - start < seconds:
        step()
        calls += 1
        if ext.helper_parts_run() > before:
            return
    raise AssertionError(f"no helper thread ran a part in {calls} calls ({seconds:.0f} s)")


@pytest.fixture(scope="session")
def hopper_file(tmp_path_factory):
    """A small real Hopper-v5 random-policy dataset, written by offprune's generator."""
    path = tmp_path_factory.mktemp("data") / "hopper-random-v5.hdf5"
    return generate_random("hopper", 400, seed=0, out=path, progress=False)


def random_batch(obs_dim: int, act_dim: int, n: int = 32, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(n, obs_dim, generator=g),
        torch.rand(n, act_dim, generator=g) * 2 - 1,
        torch.randn(n, 1, generator=g),
        torch.randn(n, obs_dim, generator=g),
        (torch.rand(n, 1, generator=g) > 0.1).float(),
    )


def random_sequences(obs_dim: int, act_dim: int, n: int = 4, seq_len: int = 6, seed: int = 0) -> SequenceBatch:
    """Random chunks; the last row is a 3-step episode end (terminated, then padding)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq_len)
    mask[-1, 3:] = 0
    terminals = torch.zeros(n, seq_len)
    terminals[-1, 2] = 1
    pad = mask.unsqueeze(-1)
    return SequenceBatch(
        torch.randn(n, seq_len, obs_dim, generator=g) * pad,
        (torch.rand(n, seq_len, act_dim, generator=g) * 2 - 1) * pad,
        torch.randn(n, seq_len, generator=g) * mask,
        torch.randn(n, seq_len, obs_dim, generator=g) * pad,
        terminals,
        mask,
    )


def d4rl_arrays(n: int = 12, obs_dim: int = 11, act_dim: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays in D4RL's exact layout: one terminated episode, one cut by a time limit, one unfinished."""
    rng = np.random.default_rng(seed)
    terminals = np.zeros(n, bool)
    timeouts = np.zeros(n, bool)
    terminals[2] = True  # episode 0: steps 0-2, terminated
    timeouts[6] = True  # episode 1: steps 3-6, time limit
    timeouts[n - 1] = True  # episode 2: steps 7..n-1
    obs = rng.normal(size=(n, obs_dim)).astype(np.float32)
    return {
        "observations": obs,
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "next_observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
        "infos/qpos": rng.normal(size=(n, 6)).astype(np.float32),
        "infos/qvel": rng.normal(size=(n, 6)).astype(np.float32),
        "infos/action_log_probs": np.zeros(n, np.float32),
        "metadata/algorithm": np.array("SAC"),
    }


@pytest.fixture
def write_d4rl(tmp_path):
    def write(name: str, arrays: dict, attrs: dict | None = None):
        return write_d4rl_file(tmp_path / name, arrays, attrs)

    return write
