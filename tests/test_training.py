"""Algorithms update with finite losses; pruned weights stay exactly zero everywhere."""

import dataclasses

import numpy as np
import pytest
import torch

from offprune.algos import ALGOS
from offprune.prune import MaskEnforcer, compute_masks, realised_sparsity

from conftest import random_batch, random_sequences

OBS, ACT = 11, 3
TINY = {
    "bcq": dict(actor_hidden=(16, 12), critic_hidden=(16, 12), vae_hidden=(24, 24), batch_size=16),
    "bc": dict(vae_hidden=(24, 24), batch_size=16),
    "bc-mlp": dict(hidden=(16, 16), batch_size=16),
    "td3-bc": dict(actor_hidden=(16, 16), critic_hidden=(16, 16), batch_size=16),
    "iql": dict(actor_hidden=(16, 16), critic_hidden=(16, 16), value_hidden=(16, 16), batch_size=16),
    "dreamer": dict(deter=16, stoch=4, hidden=12, embed=8, encoder_hidden=(16,), decoder_hidden=(16,),
                    reward_hidden=(16,), value_hidden=(16,), actor_hidden=(16, 16), ensemble=3, horizon=4,
                    batch_size=4, seq_len=6),
}
SEQUENCE_ALGOS = {"dreamer"}


def batch_for(algo, n=32, seed=0):
    """A random batch of the kind the algorithm trains on: transitions, or sequences of 6 steps."""
    if algo in SEQUENCE_ALGOS:
        return random_sequences(OBS, ACT, max(n // 8, 2), 6, seed)
    return random_batch(OBS, ACT, n, seed)


def tiny_agent(algo, seed=0):
    torch.manual_seed(seed)
    module = ALGOS[algo]
    return module.Agent(OBS, ACT, 1.0, dataclasses.replace(module.Config(), **TINY[algo]), torch.device("cpu"))


def test_bcq_sizes_match_the_reference():
    torch.manual_seed(0)
    agent = ALGOS["bcq"].Agent(17, 6, 1.0, ALGOS["bcq"].Config(), torch.device("cpu"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(agent.actor), count(agent.critic), count(agent.vae)) == (131_706, 260_402, 1_189_530)


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_one_update_gives_finite_losses_and_valid_actions(algo):
    agent = tiny_agent(algo)
    info = agent.update(batch_for(algo))
    assert info and all(np.isfinite(v) for v in info.values())
    action = agent.act(np.zeros(OBS, np.float32))
    assert action.shape == (ACT,) and action.dtype == np.float32 and np.isfinite(action).all()


def test_bc_mlp_acts_with_its_policy_computed_by_hand():
    agent = tiny_agent("bc-mlp")
    agent.update(batch_for("bc-mlp"))
    obs = np.linspace(-1, 1, OBS).astype(np.float32)
    layers = [m for m in agent.policy.net if isinstance(m, torch.nn.Linear)]
    x = torch.as_tensor(obs)
    for i, layer in enumerate(layers):
        x = x @ layer.weight.detach().T + layer.bias.detach()
        x = torch.relu(x) if i < len(layers) - 1 else torch.tanh(x)
    np.testing.assert_allclose(agent.act(obs), x.numpy(), rtol=1e-6, atol=1e-6)


def pruned_values(agent, masks):
    """Every value at a pruned position: in modules, mask copies (twin, targets), Adam moments."""
    state_of = {id(p): s for opt in agent.optimizers.values() for p, s in opt.state.items()}
    out = []
    for name, net in agent.prunable_networks().items():
        for module in (net.module, *net.mask_copies):
            params = dict(module.named_parameters())
            for pname, mask in masks[name].items():
                p = params[pname]
                out.append(p.detach()[~mask])
                for key in ("exp_avg", "exp_avg_sq"):
                    if id(p) in state_of:
                        out.append(state_of[id(p)][key][~mask])
    return torch.cat(out)


@pytest.mark.parametrize("algo", sorted(ALGOS))
@pytest.mark.parametrize("method", ["snip", "grasp", "random"])
def test_pruned_weights_and_adam_moments_stay_zero(algo, method):
    agent = tiny_agent(algo)
    networks = agent.prunable_networks()
    masks = compute_masks(networks, method, 0.8, "global", lambda: batch_for(algo, 20, 5),
                          torch.Generator().manual_seed(0))
    for name, m in masks.items():
        assert realised_sparsity(m) == pytest.approx(0.8, abs=1e-2)
    MaskEnforcer(networks, masks, agent.optimizers.values())
    kept_before = {n: p.detach().clone() for n, p in networks[next(iter(networks))].module.named_parameters()}
    for i in range(60):
        agent.update(batch_for(algo, 16, seed=100 + i))
    values = pruned_values(agent, masks)
    assert values.numel() > 0 and torch.count_nonzero(values) == 0
    # training did happen on the kept weights
    after = dict(networks[next(iter(networks))].module.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in kept_before.items())


def test_twin_critic_and_targets_share_q1_mask():
    agent = tiny_agent("bcq")
    networks = agent.prunable_networks()
    masks = compute_masks(networks, "snip", 0.7, "global", lambda: random_batch(OBS, ACT), torch.Generator())
    MaskEnforcer(networks, masks, agent.optimizers.values())
    for i in range(5):
        agent.update(random_batch(OBS, ACT, seed=i))
    for module in (agent.critic.q2, agent.critic_target.q1, agent.critic_target.q2, agent.critic.q1):
        for pname, mask in masks["critic"].items():
            w = dict(module.named_parameters())[pname]
            assert torch.count_nonzero(w[~mask]) == 0
    assert set(masks) == {"actor", "critic", "vae"}


def test_dense_masks_keep_everything_and_add_no_hooks():
    agent = tiny_agent("bc-mlp")
    networks = agent.prunable_networks()
    masks = compute_masks(networks, "dense", 0.0, "global", lambda: None, torch.Generator())
    assert all(bool(m.all()) for m in masks["policy"].values())
    optimizer = agent.optimizers["policy"]
    assert MaskEnforcer(networks, masks, agent.optimizers.values()).pairs == []
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    sparse_masks = compute_masks(networks, "snip", 0.5, "global", lambda: batch_for("bc-mlp"), torch.Generator())
    MaskEnforcer(networks, sparse_masks, agent.optimizers.values())  # the same check sees hooks when there are some
    assert optimizer._optimizer_step_pre_hooks and optimizer._optimizer_step_post_hooks


def test_the_algorithm_contract_is_declared_and_a_misspelt_hook_fails():
    import pytest

    from offprune.algos import ALGOS
    from offprune.algos.base import AgentBase, stored_modules

    for name, module in ALGOS.items():
        assert issubclass(module.Agent, AgentBase), name
    assert ALGOS["dreamer"].Agent.sequential and not ALGOS["bcq"].Agent.sequential
    assert ALGOS["bcq"].Agent.targets == {"actor_target": "actor", "critic_target": "critic"}
    bcq = ALGOS["bcq"].Agent(11, 3, 1.0, ALGOS["bcq"].Config(act_candidates=7), torch.device("cpu"))
    assert bcq.act_batch == 7 and bcq.rows_per_update == 100
    assert set(stored_modules(bcq)) == {"actor", "critic", "vae"}
    with pytest.raises(TypeError, match="evaluation_metric looks like a misspelt hook 'evaluation_metrics'"):
        class Typo(AgentBase):
            def evaluation_metric(self, sampler, episode_rewards):
                return {}


def test_a_mask_schedule_changes_the_masks_at_its_step(capsys, tmp_path, hopper_file, monkeypatch):
    from conftest import run_cli

    from offprune import train
    from offprune.results import load

    class PruneOnceAt3:
        def __init__(self, networks):
            self.networks = networks

        def masks_at(self, step):
            if step != 3:
                return None
            return compute_masks(self.networks, "magnitude", 0.8, "global", lambda: None, torch.Generator())

    monkeypatch.setattr(train, "mask_schedule", lambda cfg, setup, progress: PruneOnceAt3(setup.networks))
    code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--prune", "dense", "--dataset", hopper_file,
                           "--out", tmp_path, "--steps", "4", "--eval-every", "2", "--eval-episodes", "1",
                           "--no-progress")
    assert code == 0, err
    rows = load(tmp_path).set_index("step")
    assert rows.loc[2, "realised_sparsity"] == 0.0 and rows.loc[4, "realised_sparsity"] == pytest.approx(0.8, abs=1e-4)
    ckpt = torch.load(tmp_path / "bc-mlp_hopper-random-v5_dense_s0_seed0" / "checkpoint.pt", weights_only=False)
    for pname, mask in ckpt["masks"]["policy"].items():  # the new masks held through step 4
        w = ckpt["modules"]["policy"][pname]
        assert (~mask).any() and torch.count_nonzero(w[~mask]) == 0
