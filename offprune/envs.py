"""Making gymnasium MuJoCo environments, with the user's mistakes turned into one-line errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np

from offprune.errors import UserError


def _mujoco_warning(message: str) -> None:
    # HalfCheetah-v5's model file uses an attribute mujoco 4 deprecates; the notice says nothing to
    # a user and would repeat at every environment made (once per run and per sweep worker)
    if "settotalmass" not in message:
        warnings.warn(f"mujoco: {message}", stacklevel=2)


def make_env(env_id: str) -> gym.Env:
    try:
        import mujoco

        mujoco.set_mju_user_warning(_mujoco_warning)
    except (ImportError, AttributeError):
        pass
    try:
        return gym.make(env_id)
    except gym.error.DependencyNotInstalled as e:
        raise UserError(f"environment {env_id} needs a package that is not installed: {e}") from None
    except (gym.error.Error, ModuleNotFoundError, ImportError) as e:
        raise _cannot_make(env_id, e) from None


def check_env_id(env_id: str) -> None:
    """A one-line error for an id gymnasium does not know, before any dataset is loaded or made."""
    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        raise _cannot_make(env_id, e) from None


def _cannot_make(env_id: str, error: Exception) -> UserError:
    return UserError(f"cannot make environment '{env_id}': {error}")


def env_versions() -> dict[str, str]:
    import mujoco

    return {"gymnasium": gym.__version__, "mujoco": mujoco.__version__}


def uniform_log_prob(space) -> float:
    """Log-density of a uniform random action over a Box: the random policy's log-probability."""
    return -float(np.sum(np.log(space.high - space.low)))


def cpu_model() -> str:
    """The CPU's model name (e.g. 'AMD EPYC 7B13'), for results and speed figures; else the architecture."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
