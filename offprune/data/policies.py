"""Behaviour policies that ship with offprune, so expert and medium data are a minute away.

A shipped policy is a PPO snapshot reduced to what acting needs: the policy MLP's weights, the
Gaussian's state-independent log-std and the observation statistics it was trained with, in
`offprune/data/policies/ENV-QUALITY.pt` (a torch file of tensors, loaded with weights_only), and a
card `ENV-QUALITY.json`: env id, training steps and minutes, evaluation return and normalised score
(>= 10 episodes), gymnasium / mujoco / stable-baselines3 versions and the sha256 of the .pt.

Acting samples a ~ N(mean(obs), std) from the policy's own seeded generator and clips it to the
action box, as stable-baselines3's PPO does; the log-probability is the unclipped sample's (what
D4RL recorded). Same seed, same actions: the dataset files are byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from offprune import atomic
from offprune.errors import UserError

SHIPPED_DIR = Path(__file__).parent / "policies"
ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


class GaussianMLPPolicy:
    """obs -> (stochastic action, its log-probability); a PPO actor without stable-baselines3."""

    def __init__(self, tensors: dict[str, torch.Tensor], activation: str, card: dict | None = None):
        self.layers = [(tensors[f"layer{i}.weight"], tensors[f"layer{i}.bias"])
                       for i in range(sum(k.endswith(".weight") for k in tensors if k.startswith("layer")))]
        self.log_std = tensors["log_std"]
        self.obs_mean, self.obs_var = tensors["obs_mean"], tensors["obs_var"]
        self.obs_clip, self.obs_eps = float(tensors["obs_clip"]), float(tensors["obs_eps"])
        self.activation = activation
        self.card = card or {}
        self.generator = torch.Generator().manual_seed(0)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def mean(self, obs: np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(obs, dtype=torch.float64)
        x = ((x - self.obs_mean) / torch.sqrt(self.obs_var + self.obs_eps)).clamp(-self.obs_clip, self.obs_clip)
        x = x.float()
        act = ACTIVATIONS[self.activation]
        for i, (w, b) in enumerate(self.layers):
            x = torch.nn.functional.linear(x, w, b)
            if i < len(self.layers) - 1:
                x = act(x)
        return x

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> tuple[np.ndarray, float]:
        mean = self.mean(obs)
        std = self.log_std.exp()
        action = mean + std * torch.randn(mean.shape, generator=self.generator)
        log_prob = float((-((action - mean) ** 2) / (2 * std**2) - self.log_std - 0.5 * math.log(2 * math.pi)).sum())
        return np.clip(action.numpy(), -1.0, 1.0).astype(np.float32), log_prob

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (w, b) in enumerate(self.layers):
            out[f"layer{i}.weight"], out[f"layer{i}.bias"] = w, b
        return {**out, "log_std": self.log_std, "obs_mean": self.obs_mean, "obs_var": self.obs_var,
                "obs_clip": torch.tensor(self.obs_clip), "obs_eps": torch.tensor(self.obs_eps)}


def from_sb3_ppo(model, obs_stats: tuple | None) -> GaussianMLPPolicy:
    """The acting part of a stable-baselines3 PPO model (MlpPolicy, Gaussian actions) and its
    VecNormalize statistics (mean, var, clip, eps) at the snapshot (None: no normalisation)."""
    policy = model.policy
    linears = [m for m in policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)] + [policy.action_net]
    acts = {type(m).__name__ for m in policy.mlp_extractor.policy_net if not isinstance(m, torch.nn.Linear)}
    activation = {"Tanh": "tanh", "ReLU": "relu"}.get(acts.pop() if len(acts) == 1 else "", None)
    if activation is None:
        raise UserError(f"cannot convert a PPO policy with activations {sorted(acts)} (tanh or relu only)")
    obs_dim = linears[0].in_features
    mean, var, clip, eps = obs_stats if obs_stats is not None else (np.zeros(obs_dim), np.ones(obs_dim), np.inf, 0.0)
    tensors = {}
    for i, lin in enumerate(linears):
        tensors[f"layer{i}.weight"] = lin.weight.detach().clone()
        tensors[f"layer{i}.bias"] = lin.bias.detach().clone()
    tensors.update(log_std=policy.log_std.detach().clone(), obs_mean=torch.as_tensor(mean, dtype=torch.float64),
                   obs_var=torch.as_tensor(var, dtype=torch.float64), obs_clip=torch.tensor(float(clip)),
                   obs_eps=torch.tensor(float(eps)))
    return GaussianMLPPolicy(tensors, activation)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save(policy: GaussianMLPPolicy, card: dict, folder: Path, name: str) -> Path:
    """Write NAME.pt and NAME.json (the card, with the .pt's sha256) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = atomic.torch_save(policy.tensors(), folder / f"{name}.pt")
    card = {**card, "activation": policy.activation, "file": weights.name, "sha256": sha256_of(weights)}
    atomic.write_json(folder / f"{name}.json", card)
    return weights


def load(path: str | Path) -> GaussianMLPPolicy:
    """A policy from NAME.pt (its card NAME.json next to it); the sha256 is checked."""
    path = Path(path)
    card_path = path.with_suffix(".json")
    if not path.is_file() or not card_path.is_file():
        raise UserError(f"no policy at {path} (a .pt file with its .json card next to it)")
    try:
        card = json.loads(card_path.read_text())
    except ValueError as e:
        raise UserError(f"policy card {card_path} is not valid JSON: {e}") from None
    if card.get("sha256") != sha256_of(path):
        raise UserError(f"policy {path} does not match the sha256 in its card {card_path.name} (corrupt or replaced)")
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    return GaussianMLPPolicy(tensors, card.get("activation", "tanh"), card)


def shipped_path(env: str, quality: str) -> Path:
    return SHIPPED_DIR / f"{env}-{quality}.pt"


def shipped(env: str, quality: str) -> GaussianMLPPolicy | None:
    """The policy offprune ships for this env and quality ('expert' or 'medium'), or None."""
    path = shipped_path(env, quality)
    return load(path) if path.is_file() else None


def shipped_cards() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(SHIPPED_DIR.glob("*.json"))]
