"""Edge-popup and biprop: frozen weights, learned scores, top-k masks in every forward pass."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from offprune.algos import ALGOS
from offprune.prune import kept_count
from offprune.results import load
from offprune.supermask import Supermasks, top_k_masks

from conftest import random_batch, run_cli


def small_agent(algo: str, **config):
    torch.manual_seed(0)
    module = ALGOS[algo]
    cfg = module.Config(**config)
    agent = module.Agent(11, 3, 1.0, cfg, torch.device("cpu"))
    return agent, agent.prunable_networks()


def layers_of(policy):
    return [m for m in policy.net if isinstance(m, torch.nn.Linear)]


def hand_forward(x, weights, max_action=1.0):
    """TanhPolicy's forward with explicit weight matrices and zero biases."""
    for i, w in enumerate(weights):
        x = F.linear(x, w)
        if i < len(weights) - 1:
            x = F.relu(x)
    return max_action * torch.tanh(x)


@pytest.mark.parametrize("method", ["edge-popup", "biprop"])
def test_forward_is_the_masked_forward_of_the_top_scores_and_scores_get_the_straight_through_gradient(method):
    agent, nets = small_agent("bc-mlp", hidden=(16, 12))
    supermasks = Supermasks(method, agent, nets, 0.75, "layer", {}, seed=0)
    linears = layers_of(agent.policy)
    names = ["net.0.weight", "net.2.weight", "net.4.weight"]
    frozen = [lin.parametrizations.weight.original.detach().clone() for lin in linears]
    scores = [lin.parametrizations.weight[0].scores for lin in linears]
    masks = supermasks.masks()["policy"]
    effective = []
    for name, w, s, lin in zip(names, frozen, scores, linears):
        # exactly the kept count, and exactly the largest |scores|
        m = masks[name]
        assert int(m.sum()) == kept_count(m.numel(), 0.75)
        assert s.detach().abs()[m].min() > s.detach().abs()[~m].max()
        if method == "edge-popup":  # signed Kaiming constant, fan scaled by the kept fraction
            assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / (w.shape[1] * 0.25))))
            expected = w * m
        else:
            alpha = w.abs()[m].mean()
            expected = torch.sign(w) * alpha * m
        assert torch.allclose(lin.weight, expected, rtol=0, atol=1e-7)
        assert torch.count_nonzero(lin.bias) == 0 and not lin.bias.requires_grad
        effective.append(expected.clone().requires_grad_(True))
    x = torch.randn(5, 11)
    out = agent.policy(x)
    assert torch.allclose(out, hand_forward(x, effective), atol=1e-6)
    out.pow(2).sum().backward()
    hand_forward(x, effective).pow(2).sum().backward()
    for w, s, e in zip(frozen, scores, effective):
        # d loss / d score = (d loss / d effective weight) * w * sign(score)  (biprop: g sign(w) |w| = g w)
        assert torch.allclose(s.grad, e.grad * w * torch.sign(s.detach()), rtol=1e-5, atol=1e-8)


def test_training_moves_scores_only_and_q2_and_targets_follow_the_source():
    agent, nets = small_agent("bcq", actor_hidden=(16, 16), critic_hidden=(16, 16), vae_hidden=(16, 16), batch_size=8)
    supermasks = Supermasks("edge-popup", agent, nets, 0.8, "layer", {}, seed=1)
    q1, q2 = agent.critic.q1, agent.critic.q2
    assert q1[0].parametrizations.weight[0].scores is q2[0].parametrizations.weight[0].scores  # Q2 shares Q1's
    target_scores = agent.critic_target.q1[0].parametrizations.weight[0].scores
    assert target_scores is not q1[0].parametrizations.weight[0].scores
    assert agent.critic_target.q2[0].parametrizations.weight[0].scores is target_scores
    frozen = {name: p.detach().clone() for name, p in agent.critic.named_parameters() if "original" in name}
    before = supermasks.masks()
    source_before = q1[0].parametrizations.weight[0].scores.detach().clone()
    target_before = target_scores.detach().clone()
    for seed in range(5):
        agent.update(random_batch(11, 3, 8, seed))
    after = supermasks.masks()
    assert any(not torch.equal(before[n][k], after[n][k]) for n in after for k in after[n])  # masks moved
    for n in after:
        for k, m in after[n].items():
            assert int(m.sum()) == kept_count(m.numel(), 0.8)
    for name, p in agent.critic.named_parameters():
        if "original" in name:
            assert torch.equal(p, frozen[name])  # the weights never train
    assert all(torch.count_nonzero(layer.bias) == 0 for layer in q1 if isinstance(layer, torch.nn.Linear))
    assert not torch.equal(q1[0].parametrizations.weight[0].scores, source_before)
    # the target's scores are soft-updated: strictly between where they were and the source's
    moved = target_scores.detach() - target_before
    assert torch.count_nonzero(moved) > 0 and moved.abs().max() < 0.01


@pytest.mark.parametrize("scope", ["layer", "erk", "global"])
def test_top_k_masks_equal_offprunes_mask_rule_with_ties_and_any_hint(scope):
    from offprune.prune import masks_from_scores

    g = torch.Generator().manual_seed(3)
    # rounded scores: many ties at every threshold
    scores = {"a": (torch.rand(40, 30, generator=g) * 50).round(), "b": (torch.rand(20, 40, generator=g) * 50).round()}
    expected = masks_from_scores(scores, 0.8, scope)
    plain, kths = top_k_masks(scores, 0.8, scope)
    for hints in (kths, {k: v + 3.0 for k, v in kths.items()}, {k: -100.0 for k in kths}):
        hinted, again = top_k_masks(scores, 0.8, scope, hints)
        assert again == kths
        for name in scores:
            assert torch.equal(hinted[name], expected[name]) and torch.equal(plain[name], expected[name])


def test_top_k_masks_keep_exact_counts_in_every_scope():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(30, 20, generator=g), "b": torch.rand(10, 30, generator=g)}
    for scope in ("layer", "erk", "global"):
        masks, _ = top_k_masks(scores, 0.9, scope)
        total = sum(int(m.sum()) for m in masks.values())
        if scope == "layer":
            assert [int(m.sum()) for m in masks.values()] == [60, 30]
        if scope == "global":
            assert total == kept_count(900, 0.9)
            flat = torch.cat([s.flatten() for s in scores.values()])
            kept = torch.cat([m.flatten() for m in masks.values()])
            assert flat[kept].min() > flat[~kept].max()


def run(capsys, out, hopper_file, method, *extra):
    code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--prune", method, "--sparsity", "0.8", "--dataset",
                           str(hopper_file), "--out", str(out), "--eval-episodes", "1", "--no-progress",
                           "--steps", "8", "--eval-every", "4", "--algo-opt", "batch_size=32", *extra)
    assert code == 0, err


@pytest.mark.parametrize("method", ["edge-popup", "biprop"])
def test_a_learned_mask_run_resumes_exactly_and_its_checkpoint_is_a_masked_network(method, tmp_path, hopper_file,
                                                                                    capsys):
    from offprune import checkpoint

    run(capsys, tmp_path, hopper_file, method)
    straight = load(tmp_path)
    name = straight.run_id.iloc[0]
    assert name.endswith(f"_{method}_layer_s0.8_seed0") and (straight.scope == "layer").all()
    folder = tmp_path / name
    (folder / "checkpoint.prev.pt").replace(folder / "checkpoint.pt")  # interrupted after update 4
    pd.read_parquet(folder / "results.parquet").iloc[:1].to_parquet(folder / "results.parquet")
    run(capsys, tmp_path, hopper_file, method, "--resume")
    resumed = load(tmp_path)
    cols = ["loss_policy_loss", "realised_sparsity", "mask_changes", "normalized_score"]
    assert straight[cols].reset_index(drop=True).equals(resumed[cols].reset_index(drop=True))
    assert (straight.mask_changes > 0).all() and straight.mask_changes.is_monotonic_increasing
    changes = pd.read_parquet(folder / "mask_changes.parquet")
    assert sorted(set(changes.step)) == [4, 8] and len(changes) == 2 * 3
    assert (changes.grown == changes.dropped).all() and changes.grown.sum() > 0
    # storage and export read the checkpoint as a statically masked network
    agent, ckpt = checkpoint.load_run(folder)
    for pname, mask in ckpt["masks"]["policy"].items():
        w = dict(agent.policy.named_parameters())[pname]
        assert torch.count_nonzero(w[~mask]) == 0 and torch.count_nonzero(w[mask]) == int(mask.sum())


def test_learned_masks_refuse_what_they_cannot_do(tmp_path, hopper_file, capsys):
    code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--prune", "edge-popup", "--dataset", str(hopper_file),
                           "--out", str(tmp_path), "--kernels", "sparse")
    assert code == 2 and "dense kernels" in err and err.count("\n") == 1


def test_a_sweep_ranks_learned_masks_per_layer_unless_told_otherwise():
    from offprune.config import SweepConfig
    from offprune.sweep import grid

    runs = grid(SweepConfig.build(algo="bc", prune="edge-popup,biprop+erk,snip", sparsity="0.9", seeds="0",
                                  dataset="d"))
    scopes = {(cfg.prune, cfg.scope) for cfg in runs}
    assert scopes == {("dense", "global"), ("edge-popup", "layer"), ("biprop", "erk"), ("snip", "global")}


def test_the_plan_probes_learned_masks_as_their_own_kind_and_rigl_as_any_mask():
    from offprune.config import RunConfig
    from offprune.plan import kind_of

    base = RunConfig(algo="bc", dataset="hopper-expert-v5", sparsity=0.9)
    assert kind_of(RunConfig(**{**base.to_dict(), "prune": "edge-popup"})).kernels == "edge-popup"
    assert kind_of(RunConfig(**{**base.to_dict(), "prune": "biprop"})).kernels == "biprop"
    assert kind_of(RunConfig(**{**base.to_dict(), "prune": "rigl"})).kernels == "auto"
    assert kind_of(RunConfig(**{**base.to_dict(), "prune": "snip"})).kernels == "auto"


def plain_supermask_forward(self, weight):
    """The textbook form, rebuilt at every call: weight * (base + (|s| - |s|.detach()) * factor)."""
    mask = self.ranking.float_mask(self.layer)
    factor = None
    if self.binary:
        base = (weight.abs() * mask).sum() / mask.sum().clamp(min=1) * mask
        factor, weight = weight.abs(), weight.sign()
    else:
        base = mask
    if torch.is_grad_enabled() and self.scores.requires_grad:
        a = self.scores.abs()
        through = a - a.detach()
        base = base + (through * factor if factor is not None else through)
    return weight * base


@pytest.mark.parametrize("method", ["edge-popup", "biprop"])
def test_effective_weights_built_once_per_mask_train_exactly_as_the_formula_rebuilt_at_every_call(method,
                                                                                                 monkeypatch):
    from offprune.supermask import Supermask

    def trained(forward):
        with monkeypatch.context() as m:
            if forward is not None:
                m.setattr(Supermask, "forward", forward)
            agent, nets = small_agent("bcq", actor_hidden=(24, 16), critic_hidden=(24, 16), vae_hidden=(24, 24),
                                      batch_size=16)
            supermasks = Supermasks(method, agent, nets, 0.7, "layer", {}, seed=2)
            obs = random_batch(11, 3, 1, 99).observations[0].numpy()
            for module in agent.modules.values():  # as a resume does: every frozen weight written (versions move)
                module.load_state_dict(module.state_dict())
            actions, losses = [], []
            for seed in range(12):  # acting between updates: nothing built in inference mode may be kept for training
                if seed % 4 == 0:
                    with torch.inference_mode():
                        actions.append(agent.act(obs))
                losses.append(agent.update(random_batch(11, 3, 16, seed)))
            action = np.concatenate(actions)
            state = {name: p.detach().clone() for name, module in agent.modules.items()
                     for name, p in module.named_parameters(prefix=name)}
            return losses, state, supermasks.masks(), supermasks.changes, action

    fast, plain = trained(None), trained(plain_supermask_forward)
    assert fast[0] == plain[0]  # every loss of every update, exactly
    assert fast[1].keys() == plain[1].keys() and all(torch.equal(fast[1][k], plain[1][k]) for k in fast[1])
    assert all(torch.equal(fast[2][n][k], plain[2][n][k]) for n in fast[2] for k in fast[2][n])
    assert fast[3] == plain[3] > 0 and (fast[4] == plain[4]).all()


def test_speed_times_learned_masks_beside_the_unpruned_update(capsys):
    code, out, err = run_cli(capsys, "speed", "--algo", "bc-mlp", "--sparsity", "0.8", "--learned", "--repeats", "1",
                             "--steps", "2")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert list(rows) == ["dense_unmasked", "edge-popup", "biprop"]
    assert all(float(r[1]) > 0 for r in rows.values()) and rows["dense_unmasked"][3] == "1.00x"
    code, _, err = run_cli(capsys, "speed", "--algo", "dreamer", "--sparsity", "0.8", "--learned", "--repeats", "1",
                           "--steps", "1")
    assert code == 2 and err.count("\n") == 1 and "masks Linear layers" in err


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_top_k_masks_rank_other_float_types_as_the_mask_rule_does(dtype):
    from offprune.prune import masks_from_scores

    g = torch.Generator().manual_seed(5)
    scores = {"a": (torch.rand(40, 30, generator=g) * 50).round().to(dtype), "b": torch.rand(20, 40, generator=g).to(dtype)}
    masks, kths = top_k_masks(scores, 0.8, "layer")
    hinted, _ = top_k_masks(scores, 0.8, "layer", kths)
    expected = masks_from_scores({k: v.float() for k, v in scores.items()}, 0.8, "layer")
    assert all(torch.equal(masks[k], expected[k]) and torch.equal(hinted[k], expected[k]) for k in scores)
