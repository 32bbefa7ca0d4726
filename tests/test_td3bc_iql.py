"""TD3+BC and IQL: shapes, losses against hand computations, masks, resume and export."""

import dataclasses

import numpy as np
import pytest
import torch

from offprune.algos import ALGOS, iql
from offprune.data import Batch
from offprune.data.d4rl import load_dataset
from offprune.results import load

from conftest import random_batch, run_cli

OBS, ACT = 11, 3


def agent_of(algo, **config):
    torch.manual_seed(0)
    module = ALGOS[algo]
    return module.Agent(OBS, ACT, 1.0, dataclasses.replace(module.Config(), **config), torch.device("cpu"))


def test_td3_bc_networks_have_the_reference_sizes_and_one_update_touches_only_the_critic():
    agent = agent_of("td3-bc")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # actor: 11-256-256-3; critic: two 14-256-256-1
    assert count(agent.actor) == (11 * 256 + 256) + (256 * 256 + 256) + (256 * 3 + 3)
    assert count(agent.critic) == 2 * ((14 * 256 + 256) + (256 * 256 + 256) + (256 + 1))
    actor_before = [p.detach().clone() for p in agent.actor.parameters()]
    info = agent.update(random_batch(OBS, ACT, 256, 0))
    assert set(info) == {"critic_loss", "q1_mean"}  # the first update is a critic update only (policy_freq 2)
    assert all(torch.equal(a, b) for a, b in zip(actor_before, agent.actor.parameters()))
    info = agent.update(random_batch(OBS, ACT, 256, 1))
    assert {"actor_loss", "bc_loss"} <= set(info)
    assert not all(torch.equal(a, b) for a, b in zip(actor_before, agent.actor.parameters()))


def test_td3_bc_actor_loss_equals_a_hand_computation():
    agent = agent_of("td3-bc", actor_hidden=(4,), critic_hidden=(4,))
    batch = random_batch(OBS, ACT, 5, 3)
    loss, _ = agent.actor_loss(batch)
    w = [m for m in agent.actor.net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        pi = torch.tanh(torch.relu(batch.observations @ w[0].weight.T + w[0].bias) @ w[1].weight.T + w[1].bias)
        c = [m for m in agent.critic.q1 if isinstance(m, torch.nn.Linear)]
        q = torch.relu(torch.cat([batch.observations, pi], 1) @ c[0].weight.T + c[0].bias) @ c[1].weight.T + c[1].bias
        expected = -(2.5 / q.abs().mean()) * q.mean() + ((pi - batch.actions) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_iql_expectile_loss_weights_errors_0_7_above_and_0_3_below():
    diff = torch.tensor([2.0, -1.0, 0.5, -3.0])
    expected = (0.7 * 4.0 + 0.3 * 1.0 + 0.7 * 0.25 + 0.3 * 9.0) / 4
    assert iql.expectile_loss(diff, 0.7).item() == pytest.approx(expected)


def test_iql_update_order_shapes_and_learning_rate_decay():
    agent = agent_of("iql", actor_decay_steps=4)
    assert agent.actor.log_std.shape == (ACT,)
    assert agent.value(torch.zeros(7, OBS)).shape == (7, 1)
    assert agent.actor.log_prob(torch.zeros(7, OBS), torch.zeros(7, ACT)).shape == (7, 1)
    lrs = []
    for step in range(5):
        agent.update(random_batch(OBS, ACT, 32, step))
        lrs.append(agent.actor_optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([3e-4 * 0.5 * (1 + np.cos(np.pi * min(k, 4) / 4)) for k in range(5)])
    assert agent.critic_optimizer.param_groups[0]["lr"] == 3e-4


def test_iql_reward_scale_is_1000_over_the_spread_of_episode_returns(hopper_file):
    dataset = load_dataset(str(hopper_file))
    returns = np.add.reduceat(dataset.rewards.astype(np.float64), dataset.episode_starts)
    agent = ALGOS["iql"].Agent(dataset.obs_dim, dataset.act_dim, 1.0, ALGOS["iql"].Config(), torch.device("cpu"))
    agent.prepare(dataset)
    assert agent.value.reward_scale.item() == pytest.approx(1000.0 / (returns.max() - returns.min()), rel=1e-6)
    batch = Batch(*(torch.ones(2, n) for n in (dataset.obs_dim, dataset.act_dim, 1, dataset.obs_dim, 1)))
    assert torch.allclose(agent._scaled(batch).rewards, agent.value.reward_scale * torch.ones(2, 1))


def test_iql_deterministic_actor_loss_is_the_advantage_weighted_squared_error():
    agent = agent_of("iql", actor_hidden=(8,), critic_hidden=(8,), value_hidden=(8,), deterministic_actor=True)
    batch = random_batch(OBS, ACT, 6, 2)
    loss, _ = agent.actor_loss(batch)
    with torch.no_grad():
        advantage = torch.min(*agent.critic_target(batch.observations, batch.actions)) - agent.value(batch.observations)
        weights = torch.exp(3.0 * advantage).clamp(max=100.0)
        squared = (agent.actor.mean(batch.observations) - batch.actions).pow(2).sum(1, keepdim=True)
    assert loss.item() == pytest.approx((weights * squared).mean().item(), rel=1e-5)
    gaussian, _ = agent_of("iql", actor_hidden=(8,), critic_hidden=(8,), value_hidden=(8,)).actor_loss(batch)
    assert gaussian.item() != pytest.approx(loss.item(), rel=1e-3)


def test_iql_acts_with_the_policy_mean():
    agent = agent_of("iql", actor_hidden=(8,))
    obs = np.linspace(-1, 1, OBS).astype(np.float32)
    lin = [m for m in agent.actor.net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        x = torch.as_tensor(obs)
        expected = torch.tanh(torch.relu(x @ lin[0].weight.T + lin[0].bias) @ lin[1].weight.T + lin[1].bias)
    np.testing.assert_allclose(agent.act(obs), expected.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("algo", ["td3-bc", "iql"])
def test_sparse_run_resumes_bit_exactly_and_its_export_acts_identically(algo, tmp_path, hopper_file, capsys):
    from offprune import checkpoint, packed

    def run(out, steps, *extra):
        code, _, err = run_cli(capsys, "run", "--algo", algo, "--sparsity", "0.9", "--kernels", "sparse",
                               "--dataset", str(hopper_file), "--out", str(out), "--steps", str(steps),
                               "--eval-every", "4", "--eval-episodes", "1", "--no-progress",
                               "--algo-opt", "batch_size=32", *extra)
        assert code == 0, err

    run(tmp_path / "straight", 8)
    run(tmp_path / "resumed", 4)
    run(tmp_path / "resumed", 8, "--resume")
    straight, resumed = load(tmp_path / "straight"), load(tmp_path / "resumed")
    loss_columns = [c for c in straight.columns if c.endswith("_loss")]
    assert loss_columns and straight[loss_columns].equals(resumed[loss_columns])
    run_dir = next((tmp_path / "straight").iterdir())
    agent, ckpt = checkpoint.load_run(run_dir)
    masks = ckpt["masks"]
    for name, net in agent.prunable_networks().items():  # pruned weights are zero in every copy
        for module in (net.module, *net.mask_copies):
            params = dict(module.named_parameters())
            assert all(torch.count_nonzero(params[p][~m]) == 0 for p, m in masks[name].items())
    assert run_cli(capsys, "export", str(run_dir), "--out", str(tmp_path / "a.pack"))[0] == 0
    loaded = packed.load_packed_agent(tmp_path / "a.pack")
    obs = np.linspace(-1, 1, ckpt["agent"]["obs_dim"]).astype(np.float32)
    np.testing.assert_array_equal(loaded.act(obs), agent.act(obs))
