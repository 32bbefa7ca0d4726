"""Behaviour policies for dataset making, trained online with stable-baselines3 (SAC or PPO).

D4RL's recipe: train an online agent; `expert` data comes from the fully trained policy, `medium`
from a policy stopped at about a third of the expert's return, `medium-replay` from everything
the agent saw while training up to that medium policy. So training here keeps, in
DATASETS/behaviour/ENV-ALGO/:
  state.json              progress: steps done, seconds, one evaluation per snapshot, finished
  snapshots/step_N.zip    the policy every `eval_every` steps (SB3 zip), so data can be drawn
                          later from any stage without retraining
  replay/upto_N.npz       every transition the agent collected (D4RL layout, incl. qpos/qvel
                          and the behaviour log-probabilities), one chunk per snapshot
  checkpoint.zip (+ replay_buffer.pkl, vecnormalize.pkl)   to continue with --resume
Expert = the snapshot with the highest evaluation return; medium = the earlier snapshot whose
return is closest to a third of it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np

from offprune import atomic
from offprune.data.d4rl import ENV_OF_FAMILY, datasets_dir
from offprune.envs import uniform_log_prob
from offprune.errors import UserError

BEHAVIOUR_ALGOS = ("sac", "ppo")
# PPO by default: on a CPU it runs many times more env steps per second than SAC, so within the
# quick profile's wall-clock bound PPO reaches expert returns and SAC does not (the measurements:
# benchmarks/README.md, "Defaults chosen by measurement").
DEFAULT_ALGO = {"hopper": "ppo", "halfcheetah": "ppo", "walker2d": "ppo", "ant": "ppo"}
# Budget profiles: env steps of behaviour training, its wall-clock bound, transitions per dataset,
# env steps between snapshots (each one is evaluated over EVAL_EPISODES episodes).
PROFILES = {
    "quick": {"sac_steps": 100_000, "ppo_steps": 2_000_000, "minutes": 40, "transitions": 100_000,
              "sac_eval_every": 10_000, "ppo_eval_every": 50_000},
    "d4rl": {"sac_steps": 1_000_000, "ppo_steps": 10_000_000, "minutes": None, "transitions": 1_000_000,
             "sac_eval_every": 50_000, "ppo_eval_every": 250_000},
}
# PPO settings per env (stable-baselines3 keyword arguments; empty = SB3's defaults, which are the
# PPO paper's / CleanRL's MuJoCo settings: n_steps 2048, batch 64, 10 epochs, lr 3e-4, gamma 0.99,
# GAE 0.95, clip 0.2, tanh 64-64, orthogonal init). HalfCheetah gets the RL zoo's tuned values:
# with the defaults it stays far below expert returns; with these it reached ~5,300 (normalised
# ~45) in 0.94M steps. The RL zoo's tuned Hopper values stalled at return ~1,000 here, so Hopper
# (and Walker2d, same family of gait) keeps the defaults.
PPO_SETTINGS: dict[str, dict] = {
    "hopper": {},
    "walker2d": {},
    "ant": {},
    "halfcheetah": {"n_steps": 512, "batch_size": 64, "n_epochs": 20, "learning_rate": 2.0633e-5, "gamma": 0.98,
                    "gae_lambda": 0.92, "clip_range": 0.1, "ent_coef": 0.000401762, "vf_coef": 0.58096,
                    "max_grad_norm": 0.8,
                    "policy_kwargs": {"log_std_init": -2.0, "ortho_init": False, "activation": "relu",
                                      "net_arch": [256, 256]}},
}


def ppo_kwargs(env: str) -> dict:
    """PPO_SETTINGS[env] as stable-baselines3 keyword arguments (activation names -> torch classes)."""
    import torch

    kwargs = dict(PPO_SETTINGS.get(env, {}))
    if "policy_kwargs" in kwargs:
        policy = dict(kwargs["policy_kwargs"])
        if "activation" in policy:
            policy["activation_fn"] = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[policy.pop("activation")]
        if "net_arch" in policy:
            policy["net_arch"] = {"pi": list(policy["net_arch"]), "vf": list(policy["net_arch"])}
        kwargs["policy_kwargs"] = policy
    return kwargs
EVAL_EPISODES = 10  # halfcheetah's 5-episode evaluations swung by ~2,000 in return
SAC_LEARNING_STARTS = 10_000  # uniform random actions first, as the RL zoo does for MuJoCo


def behaviour_dir(env: str, algo: str) -> Path:
    return datasets_dir() / "behaviour" / f"{env}-{algo}"


def _write_json(path: Path, data: dict) -> None:
    atomic.write_json(path, data)


def read_state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Policy:
    """A behaviour policy: stochastic actions and their log-probabilities, as D4RL recorded."""

    model: object
    obs_stats: tuple | None  # PPO: VecNormalize's (mean, var, clip, eps) at this snapshot
    step: int
    eval_return: float

    def obs_normalizer(self, obs: np.ndarray) -> np.ndarray:
        if self.obs_stats is None:
            return obs
        mean, var, clip, eps = self.obs_stats
        return np.clip((obs - mean) / np.sqrt(var + eps), -clip, clip).astype(np.float32)

    def act(self, obs: np.ndarray) -> tuple[np.ndarray, float]:
        import torch

        x = self.obs_normalizer(obs[None])
        policy = self.model.policy
        with torch.no_grad():
            obs_t = torch.as_tensor(x, dtype=torch.float32)
            if hasattr(policy, "actor"):  # SAC: tanh-squashed Gaussian
                dist = sac_distribution(policy.actor, obs_t)
                action = dist.sample()
                log_prob = dist.log_prob(action)
                action = policy.unscale_action(action.numpy())
            else:  # PPO: Gaussian, clipped to the action box
                dist = policy.get_distribution(obs_t)
                action = dist.get_actions(deterministic=False)
                log_prob = dist.log_prob(action)
                action = np.clip(action.numpy(), -1.0, 1.0)
        return action[0].astype(np.float32), float(log_prob.reshape(-1)[0])


def sac_distribution(actor, obs):
    """The action distribution of an SB3 SAC actor at `obs` (a batch tensor)."""
    mean, log_std, kwargs = actor.get_action_dist_params(obs)
    return actor.action_dist.proba_distribution(mean, log_std, **kwargs)


def _load_model(algo: str, path: Path):
    from stable_baselines3 import PPO, SAC

    return (SAC if algo == "sac" else PPO).load(path, device="cpu")


def _normalizer_path(folder: Path, step: int) -> Path:
    return folder / "snapshots" / f"step_{step}_obs_norm.pkl"


def _obs_stats(folder: Path, step: int) -> tuple | None:
    """Observation statistics of a PPO snapshot (its VecNormalize mean, var, clip, eps), or None.

    Per snapshot because the statistics keep moving while PPO trains: a medium policy must see
    observations normalised as they were when it was evaluated."""
    import pickle

    path = _normalizer_path(folder, step)
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


def pick_snapshots(state: dict) -> dict[str, dict]:
    """{'expert': evaluation, 'medium': evaluation} from a training run's evaluations."""
    evals = state["evaluations"]
    if not evals:
        raise UserError("the behaviour training has no evaluations yet; continue it with --resume")
    expert = max(evals, key=lambda e: e["return_mean"])
    earlier = [e for e in evals if e["step"] < expert["step"]] or [expert]
    medium = min(earlier, key=lambda e: abs(e["return_mean"] - expert["return_mean"] / 3))
    return {"expert": expert, "medium": medium}


def load_policy(env: str, algo: str, which: str) -> Policy:
    """The expert or medium policy of a finished behaviour training (UserError says how to make it)."""
    folder = behaviour_dir(env, algo)
    state = read_state(folder)
    if state is None or not state.get("finished"):
        hint = " (it is unfinished: add --resume)" if state else ""
        raise UserError(f"no trained {algo} behaviour policy for {env} in {folder}{hint}; make it with "
                        f"'offprune datasets train {env} --algo {algo}'")
    chosen = pick_snapshots(state)[which]
    model = _load_model(algo, folder / "snapshots" / f"step_{chosen['step']}.zip")
    return Policy(model, _obs_stats(folder, chosen["step"]), chosen["step"], chosen["return_mean"])


def load_snapshot(path: Path) -> Policy:
    """Any PPO snapshot zip (e.g. snapshots/step_N.zip of a training; its step_N_obs_norm.pkl next to it)."""
    try:
        model = _load_model("ppo", path)
    except Exception as e:  # a zip that is not an SB3 PPO model
        raise UserError(f"--policy {path}: not a stable-baselines3 PPO snapshot ({type(e).__name__}: {e})") from None
    step = int(path.stem.split("_")[1]) if path.stem.startswith("step_") and path.stem[5:].isdigit() else -1
    return Policy(model, _obs_stats(path.parent.parent, step) if step >= 0 else None, step, float("nan"))


def ship_policies(env: str, algo: str = "ppo", folder: Path | None = None, episodes: int = 20,
                  log: Callable[[str], None] = print) -> list[Path]:
    """Write the expert and medium policies of the finished local training of `env` in the shipped
    format (offprune.data.policies) with their cards, each evaluated again over `episodes` episodes."""
    import gymnasium
    import mujoco
    import stable_baselines3

    from offprune.data import policies
    from offprune.data.d4rl import normalized_score
    from offprune.envs import make_env
    from offprune.evaluate import evaluate

    if algo != "ppo":
        raise UserError("only PPO behaviour policies can be shipped (SAC's tanh-Gaussian is not converted)")
    folder = folder or policies.SHIPPED_DIR
    state = read_state(behaviour_dir(env, algo))
    written = []
    for quality in ("expert", "medium"):
        snapshot = load_policy(env, algo, quality)
        policy = policies.from_sb3_ppo(snapshot.model, snapshot.obs_stats)
        policy.seed(12_345)
        eval_env = make_env(ENV_OF_FAMILY[env])
        returns = evaluate(lambda obs: policy.act(obs)[0], eval_env, episodes, seed=20_000)
        eval_env.close()
        card = {
            "env": env, "quality": quality, "env_id": ENV_OF_FAMILY[env], "algo": algo,
            "step": snapshot.step, "training_steps": state["steps_done"],
            "training_minutes": round(state["seconds"] / 60, 1), "training_seed": state.get("seed", 0),
            "ppo_settings": PPO_SETTINGS.get(env, {}),
            "training_eval_return_mean": snapshot.eval_return,
            "eval_episodes": episodes, "eval_return_mean": float(returns.mean()), "eval_return_std": float(returns.std()),
            "eval_normalized_score": normalized_score(ENV_OF_FAMILY[env], float(returns.mean())),
            "gymnasium_version": gymnasium.__version__, "mujoco_version": mujoco.__version__,
            "stable_baselines3_version": stable_baselines3.__version__,
        }
        written.append(policies.save(policy, card, folder, f"{env}-{quality}"))
        log(f"{written[-1]}: step {snapshot.step}, return {card['eval_return_mean']:.1f} +- "
            f"{card['eval_return_std']:.1f} over {episodes} episodes (normalised {card['eval_normalized_score']:.1f})")
    return written


class TransitionRecorder(gym.Wrapper):
    """Wraps the training env (inside SB3's vector env) and keeps every transition in D4RL's
    layout: raw observations and rewards, the qpos/qvel of the observed state, terminals vs time
    limits. The training callback adds the behaviour log-probabilities."""

    KEYS = ("observations", "actions", "next_observations", "rewards", "terminals", "timeouts", "infos/qpos",
            "infos/qvel")

    def __init__(self, env):
        super().__init__(env)
        self.rows: dict[str, list] = {k: [] for k in self.KEYS}
        self.log_probs: list[float] = []
        self.obs = None

    def reset(self, **kwargs):
        self.obs, info = self.env.reset(**kwargs)
        return self.obs, info

    def step(self, action):
        data = self.env.unwrapped.data
        qpos, qvel = data.qpos.copy(), data.qvel.copy()
        next_obs, reward, terminated, truncated, info = self.env.step(action)
        for key, value in zip(self.KEYS, (self.obs, action, next_obs, reward, terminated, truncated and not terminated,
                                          qpos, qvel)):
            self.rows[key].append(value)
        self.obs = next_obs
        return next_obs, reward, terminated, truncated, info

    def take(self) -> dict[str, np.ndarray]:
        """The transitions recorded since the last call, as arrays."""
        out = {k: np.asarray(v, dtype=bool if k in ("terminals", "timeouts") else np.float32)
               for k, v in self.rows.items()}
        out["infos/action_log_probs"] = np.asarray(self.log_probs, np.float32)
        for rows in self.rows.values():
            rows.clear()
        self.log_probs.clear()
        return out


def train_behaviour(
    env: str,
    algo: str,
    steps: int,
    minutes: float | None,
    seed: int = 0,
    eval_every: int = 10_000,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Train (or with `resume`, continue) the behaviour agent for `steps` env steps or `minutes`."""
    import torch
    from stable_baselines3.common.vec_env import DummyVecEnv

    from offprune.envs import make_env

    if env not in ENV_OF_FAMILY:
        raise UserError(f"unknown env '{env}' (choose from {', '.join(ENV_OF_FAMILY)})")
    if algo not in BEHAVIOUR_ALGOS:
        raise UserError(f"unknown behaviour algo '{algo}' (choose from {', '.join(BEHAVIOUR_ALGOS)})")
    if steps < 1 or eval_every < 1:
        raise UserError("--steps and --eval-every must be at least 1")
    env_id = ENV_OF_FAMILY[env]
    folder = behaviour_dir(env, algo)
    state = read_state(folder)
    if state and not resume:
        raise UserError(f"{folder} already holds a behaviour training ({state['steps_done']} steps); "
                        "continue it with --resume, or delete the folder to start again")
    if resume and not (state and (folder / "checkpoint.zip").exists()):
        raise UserError(f"nothing to resume in {folder}; start with 'offprune datasets train {env} --algo {algo}'")
    (folder / "snapshots").mkdir(parents=True, exist_ok=True)
    (folder / "replay").mkdir(exist_ok=True)
    torch.manual_seed(seed)
    # SB3's networks are small: one thread is fastest, and two trainings can share this 2-core machine.
    torch.set_num_threads(1)

    recorder_env = TransitionRecorder(make_env(env_id))
    eval_env = make_env(env_id)
    venv = DummyVecEnv([lambda: recorder_env])
    venv.seed(seed)
    if resume:
        model = _resumed_model(folder, algo, venv, state["steps_done"])
    else:
        state = {"env": env, "env_id": env_id, "algo": algo, "seed": seed, "steps_done": 0, "seconds": 0.0,
                 "evaluations": [], "finished": False}
        model = _new_model(env, algo, venv, seed)
    state.update(target_steps=steps, finished=False)
    deadline = None if minutes is None else time.time() + minutes * 60 - state["seconds"]
    writer = _SnapshotWriter(folder, algo, env_id, state, recorder_env, eval_env, log)
    callback = _recorder_callback(writer, steps, eval_every, deadline, uniform_log_prob(model.env.action_space),
                                  progress)
    model.learn(total_timesteps=max(steps - state["steps_done"], 1), callback=callback,
                reset_num_timesteps=not resume)
    state.update(finished=True)
    _write_json(folder / "state.json", state)
    return folder


def _new_model(env: str, algo: str, venv, seed: int):
    """A fresh SAC, or PPO on observation- and reward-normalised `venv`."""
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.vec_env import VecNormalize

    if algo == "sac":
        return SAC("MlpPolicy", venv, seed=seed, device="cpu", learning_starts=SAC_LEARNING_STARTS, verbose=0)
    venv = VecNormalize(venv, norm_obs=True, norm_reward=True)
    return PPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **ppo_kwargs(env))


def _resumed_model(folder: Path, algo: str, venv, steps_done: int):
    """The checkpointed agent (with its replay buffer or normaliser) on `venv`; replay chunks
    collected after the checkpoint are deleted, because they will be collected again."""
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.vec_env import VecNormalize

    if algo == "ppo":
        venv = VecNormalize.load(str(folder / "vecnormalize.pkl"), venv)
    model = (SAC if algo == "sac" else PPO).load(folder / "checkpoint.zip", env=venv, device="cpu")
    if algo == "sac":
        model.load_replay_buffer(folder / "replay_buffer.pkl")
    for chunk in (folder / "replay").glob("upto_*.npz"):
        if int(chunk.stem.split("_")[1]) > steps_done:
            chunk.unlink()
    return model


@dataclass
class _SnapshotWriter:
    """What a behaviour training writes at each snapshot: the policy (and PPO's observation
    statistics), its evaluation, the transitions collected since the last snapshot, the checkpoint
    to resume from, and state.json."""

    folder: Path
    algo: str
    env_id: str
    state: dict
    recorder_env: TransitionRecorder
    eval_env: gym.Env
    log: Callable[[str], None]

    def __post_init__(self) -> None:
        self.started, self.seconds_before = time.time(), self.state["seconds"]

    def write(self, model, training_env, step: int) -> None:
        from offprune.evaluate import evaluate

        if step == self.state["steps_done"]:
            return
        folder = self.folder
        model.save(folder / "snapshots" / f"step_{step}.zip")
        if self.algo == "ppo":
            import pickle

            training_env.save(str(folder / "vecnormalize.pkl"))
            rms = training_env.obs_rms
            stats = (rms.mean, rms.var, training_env.clip_obs, training_env.epsilon)
            atomic.write_bytes(_normalizer_path(folder, step), pickle.dumps(stats))
        policy = Policy(model, _obs_stats(folder, step), step, 0.0)
        returns = evaluate(lambda obs: policy.act(obs)[0], self.eval_env, EVAL_EPISODES, seed=10_000 + step)
        mean, std = float(returns.mean()), float(returns.std())
        arrays = self.recorder_env.take()

        def save_chunk(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **{k.replace("/", "__"): v for k, v in arrays.items()})

        atomic.write_with(folder / "replay" / f"upto_{step}.npz", save_chunk)
        model.save(folder / "checkpoint.zip")
        if self.algo == "sac":
            model.save_replay_buffer(folder / "replay_buffer.pkl")
        self.state["evaluations"].append({"step": step, "return_mean": mean, "return_std": std})
        self.state.update(steps_done=step, seconds=self.seconds_before + time.time() - self.started)
        _write_json(folder / "state.json", self.state)
        self.log(f"behaviour {self.algo} {self.env_id}: step {step}, return {mean:.1f} ± {std:.1f}, "
                 f"{self.state['seconds'] / 60:.1f} min")


def _recorder_callback(writer: _SnapshotWriter, steps: int, eval_every: int, deadline: float | None,
                       random_log_prob: float, progress: bool):
    """The SB3 callback of a behaviour training: the behaviour log-probability of every step into
    the recorder, a snapshot every `eval_every` steps and at the end, a stop at `steps` or `deadline`."""
    import torch
    from stable_baselines3.common.callbacks import BaseCallback

    algo = writer.algo

    class Recorder(BaseCallback):
        def _on_training_start(self) -> None:
            self.bar = None
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=steps, initial=self.num_timesteps, desc=f"behaviour {algo} {writer.env_id}",
                                unit="step")

        def _on_step(self) -> bool:
            if algo == "ppo":
                log_prob = float(self.locals["log_probs"][0])
            elif self.num_timesteps <= SAC_LEARNING_STARTS:
                log_prob = random_log_prob
            else:
                with torch.no_grad():
                    dist = sac_distribution(self.model.policy.actor,
                                            torch.as_tensor(self.model._last_obs, dtype=torch.float32))
                    log_prob = float(dist.log_prob(torch.as_tensor(self.locals["buffer_actions"],
                                                                   dtype=torch.float32)))
            writer.recorder_env.log_probs.append(log_prob)
            if self.bar is not None:
                self.bar.update(1)
            if self.num_timesteps % eval_every == 0:
                writer.write(self.model, self.training_env, self.num_timesteps)
            return self.num_timesteps < steps and (deadline is None or time.time() < deadline)

        def _on_training_end(self) -> None:
            writer.write(self.model, self.training_env, self.num_timesteps)
            if self.bar is not None:
                self.bar.close()

    return Recorder()


def replay_until(env: str, algo: str, step: int) -> dict[str, np.ndarray]:
    """Every transition the behaviour agent collected up to `step`, in order (medium-replay)."""
    folder = behaviour_dir(env, algo) / "replay"
    chunks = sorted((int(p.stem.split("_")[1]), p) for p in folder.glob("upto_*.npz"))
    chunks = [p for n, p in chunks if n <= step]
    if not chunks:
        raise UserError(f"no recorded training transitions in {folder}")
    parts = [dict(np.load(p)) for p in chunks]
    for before, after in zip(parts, parts[1:]):
        # A resume restarts the env: an episode open at a chunk's end that the next chunk does not
        # continue was cut there by the interruption (a time-limit cut, not a termination).
        open_end = not (before["terminals"][-1] or before["timeouts"][-1])
        if open_end and not np.array_equal(before["next_observations"][-1], after["observations"][0]):
            before["timeouts"][-1] = True
    return {k.replace("__", "/"): np.concatenate([z[k] for z in parts]) for k in parts[0]}
