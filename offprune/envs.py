"""Making gymnasium MuJoCo environments, with the user's mistakes turned into one-line errors."""

from __future__ import annotations

import gymnasium as gym

from offprune.errors import UserError


def make_env(env_id: str) -> gym.Env:
    try:
        return gym.make(env_id)
    except gym.error.DependencyNotInstalled as e:
        raise UserError(f"environment {env_id} needs a package that is not installed: {e}") from None
    except (gym.error.Error, ModuleNotFoundError, ImportError) as e:
        raise UserError(f"cannot make environment '{env_id}': {e}") from None


def env_versions() -> dict[str, str]:
    import mujoco

    return {"gymnasium": gym.__version__, "mujoco": mujoco.__version__}
