"""Offline Dreamer: pruning groups, masks held in the GRU with sparse kernels, the KL, the
imagined-vs-real return gap against a hand computation, held-out episodes, and CLI runs."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from offprune.algos import dreamer
from offprune.algos.dreamer import _kl_normal
from offprune.data import SequenceSampler
from offprune.prune import compute_masks
from offprune.sparse import apply_masks

from conftest import random_sequences, run_cli
from test_sequences import episodes_dataset

OBS, ACT = 11, 3
TINY = dict(deter=16, stoch=4, hidden=12, embed=8, encoder_hidden=(16,), decoder_hidden=(16,), reward_hidden=(16,),
            value_hidden=(16,), actor_hidden=(16, 16), ensemble=3, horizon=4, batch_size=4, seq_len=6)
TINY_OPTS = ["--algo-opt", "deter=16", "--algo-opt", "stoch=4", "--algo-opt", "hidden=12", "--algo-opt", "embed=8",
             "--algo-opt", "encoder_hidden=16", "--algo-opt", "decoder_hidden=16", "--algo-opt", "reward_hidden=16",
             "--algo-opt", "value_hidden=16", "--algo-opt", "actor_hidden=16,16", "--algo-opt", "ensemble=3",
             "--algo-opt", "batch_size=4", "--algo-opt", "metric_horizon=3", "--seq-len", "8"]


def tiny_agent(**overrides):
    torch.manual_seed(0)
    config = dataclasses.replace(dreamer.Config(), **(TINY | overrides))
    return dreamer.Agent(OBS, ACT, 1.0, config, torch.device("cpu"))


def test_groups_and_every_prior_head_survives_snip():
    # an RSSM big enough for a head to hold more than a handful of weights (at the tiniest sizes
    # SNIP can empty a head by chance; at the default sizes each head keeps > 1,000 weights)
    agent = tiny_agent(deter=64, stoch=8, hidden=48)
    networks = agent.prunable_networks()
    assert list(networks) == ["encoder", "rssm", "decoder", "reward", "continuation", "actor", "value"]
    masks = compute_masks(networks, "snip", 0.9, "global", lambda: random_sequences(OBS, ACT, 8, 6),
                          torch.Generator().manual_seed(0))
    rssm = masks["rssm"]
    assert int(sum(m.sum() for m in rssm.values())) == round(0.1 * sum(m.numel() for m in rssm.values()))
    # scored without the free-nats floor: the priors get a gradient, so no head is pruned away
    for head in range(3):
        assert rssm[f"priors.{head}.0.weight"].sum() > 0 and rssm[f"priors.{head}.2.weight"].sum() > 0
    assert {"cell.weight_ih", "cell.weight_hh"} <= set(rssm)


def test_continuation_head_is_its_own_group_and_optional():
    agent = tiny_agent()
    assert "continuation" in agent.prunable_networks()
    info = agent.update(random_sequences(OBS, ACT, 4, 6))
    assert math.isfinite(info["cont_nll"])
    plain = tiny_agent(continuation=False)
    assert "continuation" not in plain.prunable_networks() and "cont_nll" not in plain.update(
        random_sequences(OBS, ACT, 4, 6))


def test_behaviour_cloning_term_matches_a_hand_computation():
    agent = tiny_agent(bc_weight=0.0)
    batch = random_sequences(OBS, ACT, 4, 6)
    post, _, mask = agent.observe(batch)
    starts = agent._real_states(post, mask)
    feat, actions = agent._behaviour(post, batch)
    assert feat.shape == (int(batch.mask.sum()), 16 + 4) and torch.equal(actions, batch.actions[batch.mask > 0])
    torch.manual_seed(1)
    plain, _, returns, _ = agent.actor_loss(starts, (feat, actions))  # bc_weight 0: Dreamer's loss
    agent.config = dataclasses.replace(agent.config, bc_weight=0.5)
    torch.manual_seed(1)
    regularised = agent.actor_loss(starts, (feat, actions))[0]
    imitation = (agent.actor(feat, deterministic=True) - actions).pow(2).mean()
    expected = plain / returns.abs().mean() + 0.5 * imitation
    torch.testing.assert_close(regularised, expected)
    info = agent.update(batch)  # the update path feeds the behaviour pairs
    assert math.isfinite(info["actor_loss"])


def test_gru_masks_hold_with_sparse_kernels():
    agent = tiny_agent(deter=64, hidden=64, encoder_hidden=(128,), actor_hidden=(128, 128))
    networks = agent.prunable_networks()
    masks = compute_masks(networks, "snip", 0.95, "global", lambda: random_sequences(OBS, ACT, 8, 6),
                          torch.Generator().manual_seed(0))
    kernels = apply_masks(networks, masks, agent.optimizers.values(), "sparse").kernels
    assert kernels["rssm"]["cell.weight_hh"] == "dense" and kernels["actor"]["net.2.weight"] == "csr"
    for i in range(5):
        agent.update(random_sequences(OBS, ACT, 4, 6, seed=i))
    for name in ("weight_ih", "weight_hh"):
        w, m = getattr(agent.rssm.cell, name), masks["rssm"][f"cell.{name}"]
        assert (~m).any() and torch.count_nonzero(w[~m]) == 0 and torch.count_nonzero(w[m]) > 0


def test_kl_of_diagonal_gaussians_matches_torch():
    g = torch.Generator().manual_seed(0)
    mq, mp = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    sq, sp = torch.rand(5, 4, generator=g) + 0.1, torch.rand(5, 4, generator=g) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mq, sq), torch.distributions.Normal(mp, sp))
    torch.testing.assert_close(_kl_normal(mq, sq, mp, sp), expected.sum(-1))


def test_imagination_gap_against_a_hand_computation():
    agent = tiny_agent(horizon=3, gamma=0.5)
    with torch.no_grad():  # a reward head that always predicts 2.0
        last = agent.reward[-1]
        last.weight.zero_()
        last.bias.fill_(2.0)
    agent.reset()
    rewards = np.array([1.0, 0.0, 4.0, 2.0])
    for _ in rewards:
        agent.act(np.zeros(OBS, np.float32))
    out = agent.imagination_gap([rewards], agent.visited[-1:])
    # imagined from each of the 2 states with 3 steps ahead: 2 (1 + 0.5 + 0.25) = 3.5
    # real: [1 + 0 + 0.25 * 4, 0 + 0.5 * 4 + 0.25 * 2] = [2.0, 2.5]
    assert out["imagined_return_h"] == pytest.approx(3.5)
    assert out["real_return_h"] == pytest.approx(2.25)
    assert out["imagined_return_gap"] == pytest.approx(1.25)


def test_heldout_episodes_are_never_trained_on():
    data = episodes_dataset([6] * 20)  # obs[:, 0] = episode id
    sampler = SequenceSampler(data, seq_len=4, device="cpu", seed=0, holdout_every=10)
    assert sampler.heldout_episodes == 2
    trained = set(sampler.sample(2000).observations[:, :, 0].unique().tolist())
    assert trained == set(range(20)) - {9, 19}
    heldout = sampler.heldout_batch(6)
    assert set(heldout.observations[:, :, 0].unique().tolist()) == {9, 19}
    assert torch.equal(heldout.observations, sampler.heldout_batch(6).observations)  # the same every time
    agent = tiny_agent(metric_horizon=2)
    errors = agent.model_errors(SequenceSampler(episodes_dataset([6] * 20, obs_dim=OBS, act_dim=ACT), 4, "cpu", 0, 10))
    assert errors["heldout_episodes"] == 2
    assert all(math.isfinite(errors[k]) for k in ("wm_obs_mse_1", "wm_obs_mse_2", "wm_reward_mse_1", "wm_heldout_kl"))


def test_pruned_dreamer_runs_through_the_cli(capsys, tmp_path, hopper_file):
    args = ["run", "--algo", "dreamer", "--dataset", hopper_file, "--out", tmp_path, "--eval-episodes", "1",
            "--no-progress", "--steps", "2", "--eval-every", "1", "--sparsity", "0.9", "--sparsity-of", "rssm=0.7",
            "--kernels", "dense", *TINY_OPTS]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    masks = torch.load(run_dir / "masks.pt")
    for net, sparsity in {"encoder": 0.9, "rssm": 0.7, "decoder": 0.9, "reward": 0.9, "actor": 0.9, "value": 0.9}.items():
        total = sum(m.numel() for m in masks[net].values())
        assert int(sum(m.sum() for m in masks[net].values())) == round(total * (1 - sparsity)), net
    assert run_dir.name == "dreamer_hopper-random-v5_snip_s0.9_rssm0.7_seed0"
    rows = pd.read_parquet(run_dir / "results.parquet")
    assert rows.step.tolist() == [1, 2] and (rows.sparsity_overrides == "rssm=0.7").all()
    for col in ("wm_obs_mse_1", "wm_obs_mse_3", "wm_reward_mse_3", "wm_heldout_kl", "loss_kl", "imagined_return_gap", "normalized_score"):
        assert col in rows and rows[col].notna().all(), col
    gru = masks["rssm"]["cell.weight_hh"]
    assert 0 < gru.sum() < gru.numel()  # the GRU itself is pruned
    # resuming continues from the checkpoint (the held-out split and normaliser come back the same)
    code, _, err = run_cli(capsys, *args[:-len(TINY_OPTS)], *TINY_OPTS, "--steps", "3", "--resume")
    assert code == 0, err
    assert pd.read_parquet(run_dir / "results.parquet").step.tolist() == [1, 2, 3]


@pytest.mark.parametrize("extra, message", [
    (["--sparsity-of", "world=0.5"], "--sparsity-of names unknown network(s) world (this algorithm's prunable "
                                     "networks: encoder, rssm, decoder, reward, continuation, actor, value)"),
    (["--sparsity-of", "rssm=1.5"], "--sparsity-of rssm=1.5: sparsity must be in [0, 1)"),
    (["--sparsity-of", "rssm"], "--sparsity-of expects NAME=VALUE, got 'rssm'"),
    (["--algo-opt", "horizn=5"], "--algo-opt horizn: dreamer has no such option"),
    (["--algo-opt", "horizon=five"], "--algo-opt horizon=five: expected an int (default 15)"),
    (["--seq-len", "5000"], "shorter than the sequence length 5000"),
])
def test_bad_dreamer_input_is_one_line(capsys, tmp_path, hopper_file, extra, message):
    code, _, err = run_cli(capsys, "run", "--algo", "dreamer", "--dataset", hopper_file, "--out", tmp_path,
                           "--steps", "1", "--no-progress", *extra)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_an_unknown_network_in_sparsity_of_fails_before_a_dataset_is_made(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # datasets/ would be made here
    code, _, err = run_cli(capsys, "run", "--algo", "bcq", "--dataset", "hopper-random-v5", "--steps", "1",
                           "--no-progress", "--sparsity-of", "policy=0.5")
    assert code == 2 and err.count("\n") == 1, err
    assert "--sparsity-of names unknown network(s) policy (this algorithm's prunable networks: actor, critic, vae)" in err
    assert not any(tmp_path.iterdir())  # no dataset generated, no run folder


def test_seq_len_is_refused_for_transition_algorithms(capsys, tmp_path, hopper_file):
    code, _, err = run_cli(capsys, "run", "--algo", "bcq", "--dataset", hopper_file, "--seq-len", "10")
    assert code == 2 and "--seq-len: bcq trains on single transitions, not sequences" in err
