"""Exact kept counts, scopes, ties."""

import pytest
import torch

from offprune.prune import kept_count, masks_from_scores, realised_sparsity


def scores_of(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.rand(s, generator=g) for i, s in enumerate(shapes)}


SHAPES = [(37, 11), (50, 37), (3, 50)]  # 407 + 1850 + 150 = 2407 weights


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999])
def test_global_keeps_exactly_round_n_times_density(sparsity):
    masks = masks_from_scores(scores_of(SHAPES), sparsity, "global")
    assert sum(int(m.sum()) for m in masks.values()) == round(2407 * (1 - sparsity))
    assert {k: m.shape for k, m in masks.items()} == {f"l{i}": torch.Size(s) for i, s in enumerate(SHAPES)}
    assert all(m.dtype == torch.bool for m in masks.values())


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.95, 0.99])
def test_layer_scope_keeps_exactly_per_layer(sparsity):
    masks = masks_from_scores(scores_of(SHAPES), sparsity, "layer")
    for i, s in enumerate(SHAPES):
        n = s[0] * s[1]
        assert int(masks[f"l{i}"].sum()) == round(n * (1 - sparsity))


def test_global_keeps_the_highest_scores():
    scores = {"a": torch.tensor([[0.1, 0.9], [0.5, 0.3]]), "b": torch.tensor([0.8, 0.2, 0.7])}
    masks = masks_from_scores(scores, 1 - 3 / 7, "global")  # keep 3 of 7
    assert masks["a"].tolist() == [[False, True], [False, False]]
    assert masks["b"].tolist() == [True, False, True]


def test_ties_keep_exactly_k_in_flat_order():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    masks = masks_from_scores(scores, 0.5, "global")  # keep 5 of 10, all tied
    assert masks["a"].flatten().tolist() == [True] * 5 + [False]
    assert masks["b"].tolist() == [False] * 4
    again = masks_from_scores(scores, 0.5, "global")
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_ties_straddling_the_threshold_still_keep_exactly_k():
    scores = {"a": torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0])}
    masks = masks_from_scores(scores, 0.6, "layer")  # keep 2: the 3 and the first tied 1
    assert masks["a"].tolist() == [True, True, False, False, False]


def test_nan_scores_rank_lowest():
    scores = {"a": torch.tensor([float("nan"), 0.1, 0.2])}
    assert masks_from_scores(scores, 1 / 3, "layer")["a"].tolist() == [False, True, True]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_sparsity_raises(bad):
    with pytest.raises(ValueError, match="sparsity"):
        masks_from_scores(scores_of(SHAPES), bad)


def test_kept_count_and_realised_sparsity():
    assert kept_count(120_000, 0.95) == 6000
    assert kept_count(7, 0.5) == 4  # round half to even: 3.5 -> 4
    masks = {"a": torch.tensor([True, False, False, False])}
    assert realised_sparsity(masks) == 0.75


def _mlp_net(seed=0):
    import torch
    from torch import nn

    from offprune.prune import PrunableNetwork

    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    return PrunableNetwork(module, lambda batch: ((module(batch[0]) - batch[1]) ** 2).mean(),
                           output=lambda batch: module(batch[0])), (x, y)


def test_iterative_rounds_keep_exact_counts_restore_weights_and_rescore():
    import torch

    from offprune.prune import compute_masks, round_sparsity

    net, batch = _mlp_net()
    before = {n: p.detach().clone() for n, p in net.module.named_parameters()}
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    once = compute_masks({"n": net}, "snip", 0.95, "global", lambda: batch, g())["n"]
    five = compute_masks({"n": net}, "snip", 0.95, "global", lambda: batch, g(), rounds=5)["n"]
    total = sum(m.numel() for m in five.values())
    assert sum(int(m.sum()) for m in five.values()) == round(total * 0.05) == sum(int(m.sum()) for m in once.values())
    assert any(not torch.equal(once[k], five[k]) for k in once)  # scored again on the masked network
    for n, p in net.module.named_parameters():  # the scoring copy is the network itself: restored
        assert torch.equal(p, before[n])
    # magnitude: masking zeroes the pruned weights, so re-ranking keeps the same weights as one shot
    mag1 = compute_masks({"n": net}, "magnitude", 0.9, "global", lambda: batch, g())["n"]
    mag4 = compute_masks({"n": net}, "magnitude", 0.9, "global", lambda: batch, g(), rounds=4)["n"]
    assert all(torch.equal(mag1[k], mag4[k]) for k in mag1)
    assert round_sparsity(0.99, 1, 2) == pytest.approx(0.9) and round_sparsity(0.99, 2, 2) == pytest.approx(0.99)


def test_a_criterion_receives_the_network_and_the_batch(monkeypatch):
    import torch

    from offprune.prune import CRITERIA, compute_masks

    net, batch = _mlp_net()
    seen = []

    def output_sensitivity(n, params, b, generator):  # a criterion that needs the network's output
        seen.append(b)
        out = n.output(b).sum()
        grads = torch.autograd.grad(out, list(params.values()))
        return {k: (w * g).abs().detach() for (k, w), g in zip(params.items(), grads)}

    monkeypatch.setitem(CRITERIA, "output", output_sensitivity)
    masks = compute_masks({"n": net}, "output", 0.5, "layer", lambda: batch, torch.Generator())["n"]
    assert seen == [batch] and sorted(masks) == ["0.weight", "2.weight", "4.weight"]
    assert [int(m.sum()) for m in masks.values()] == [96, 512, 32]  # half of 192, 1024, 64 per layer


def test_masks_replaced_during_training_zero_weights_and_moments_where_newly_pruned():
    import torch

    from offprune.algos import ALGOS
    from offprune.prune import MaskEnforcer, compute_masks

    from conftest import random_batch

    torch.manual_seed(0)
    agent = ALGOS["bcq"].Agent(11, 3, 1.0, ALGOS["bcq"].Config(actor_hidden=(32, 32), critic_hidden=(32, 32),
                                                             vae_hidden=(32, 32)), torch.device("cpu"))
    networks = agent.prunable_networks()
    dense = compute_masks(networks, "dense", 0.0, "global", lambda: None, torch.Generator())
    enforcer = MaskEnforcer(networks, dense, agent.optimizers.values())  # starts dense, as GMP does
    for step in range(3):
        agent.update(random_batch(11, 3, 16, step))
    new = compute_masks(networks, "magnitude", 0.8, "global", lambda: None, torch.Generator())
    enforcer.set_masks(new)
    critic_opt = agent.optimizers["critic"]
    for step in range(3, 6):
        agent.update(random_batch(11, 3, 16, step))
        for name, module in (("critic", agent.critic.q1), ("critic", agent.critic.q2),
                             ("critic", agent.critic_target.q1), ("actor", agent.actor_target)):
            for pname, mask in new[name].items():
                w = dict(module.named_parameters())[pname]
                assert torch.count_nonzero(w[~mask]) == 0, (name, pname)
        for pname, mask in new["critic"].items():
            w = dict(agent.critic.q1.named_parameters())[pname]
            state = critic_opt.state[w]
            assert torch.count_nonzero(state["exp_avg"][~mask]) == 0
            assert torch.count_nonzero(state["exp_avg_sq"][~mask]) == 0
    # regrowth: a position pruned now and kept later starts from zero and learns again
    regrown = {net: {k: torch.ones_like(m) for k, m in layers.items()} for net, layers in new.items()}
    enforcer.set_masks(regrown)
    agent.update(random_batch(11, 3, 16, 9))
    w = agent.critic.q1[2].weight
    assert torch.count_nonzero(w[~new["critic"]["2.weight"]]) > 0
