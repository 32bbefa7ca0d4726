"""Masks that change during training: gmp, set, rigl."""

import numpy as np
import pandas as pd
import pytest
import torch

from offprune.config import RunConfig
from offprune.dynamic import DropAndGrow, GradualMagnitude, change_steps, drop_fraction_at, gmp_sparsity
from offprune.nets import mlp
from offprune.prune import PrunableNetwork, compute_masks, masks_from_scores
from offprune.results import load

from conftest import run_cli


def test_gmp_sparsity_follows_the_cubic_schedule():
    assert gmp_sparsity(100, 0.9, 200, 800) == 0.0 and gmp_sparsity(900, 0.9, 200, 800) == 0.9
    for t in (200, 350, 500, 650, 800):
        assert gmp_sparsity(t, 0.9, 200, 800) == pytest.approx(0.9 * (1 - (1 - (t - 200) / 600) ** 3))
    assert change_steps(1000, 200, 800, 200) == [200, 400, 600, 800]
    assert drop_fraction_at(0, 0.3, 800) == pytest.approx(0.3) and drop_fraction_at(400, 0.3, 800) == pytest.approx(0.15)


def one_net(seed=0):
    torch.manual_seed(seed)
    net = mlp(10, (40,), 5)
    return {"n": PrunableNetwork(net, lambda b: net(torch.ones(3, 10)).pow(2).mean())}


def test_gmp_prunes_the_smallest_weights_to_the_scheduled_count():
    nets = one_net()
    dense = {"n": {k: torch.ones_like(p, dtype=torch.bool) for k, p in nets["n"].module.named_parameters()
                   if k.endswith("weight")}}
    schedule = GradualMagnitude(nets, dense, 0, {"n": 0.8}, start=0, end=10, every=5, scope="global")
    assert schedule.masks_at(3) is None
    masks = schedule.masks_at(5)["n"]
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(total * (1 - gmp_sparsity(5, 0.8, 0, 10)))
    weights = {k: p.detach().abs() for k, p in nets["n"].module.named_parameters() if k.endswith("weight")}
    expected = masks_from_scores(weights, gmp_sparsity(5, 0.8, 0, 10), "global")
    assert all(torch.equal(masks[k], expected[k]) for k in masks)


def test_set_regrows_exactly_as_many_as_it_drops_and_rigl_grows_the_largest_gradients():
    nets = one_net()
    g = torch.Generator().manual_seed(0)
    start = {"n": {k: torch.rand(p.shape, generator=g) < 0.2 for k, p in nets["n"].module.named_parameters()
                   if k.endswith("weight")}}
    schedule = DropAndGrow(nets, start, 0, end=100, every=10, drop_fraction=0.3)
    new = schedule.masks_at(10)["n"]
    for row in schedule.changes:
        old = start["n"][row["layer"]]
        k = round(drop_fraction_at(10, 0.3, 100) * int(old.sum()))
        assert row["grown"] == row["dropped"] == k and row["kept"] == int(old.sum())
        assert int(new[row["layer"]].sum()) == int(old.sum())
    # rigl: a hand-made gradient whose largest entries sit at known pruned positions
    layer = "0.weight"
    old = start["n"][layer]
    grad = torch.zeros_like(old, dtype=torch.float32)
    pruned = (~old).flatten().nonzero().squeeze(1)
    k = round(drop_fraction_at(10, 0.3, 100) * int(old.sum()))
    chosen = pruned[torch.randperm(len(pruned), generator=g)[:k]]
    grad.view(-1)[chosen] = torch.arange(1, k + 1, dtype=torch.float32) + 100
    grads = {"0.weight": grad, "2.weight": torch.zeros(5, 40)}
    rigl = DropAndGrow(nets, start, 0, end=100, every=10, drop_fraction=0.3, gradients=lambda name, net: grads)
    grown = rigl.masks_at(10)["n"][layer] & ~old
    assert set(grown.flatten().nonzero().squeeze(1).tolist()) == set(chosen.tolist())


def run(capsys, out, hopper_file, *extra):
    code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--sparsity", "0.8", "--dataset", str(hopper_file),
                           "--out", str(out), "--eval-episodes", "1", "--no-progress", "--prune-every", "3",
                           "--algo-opt", "batch_size=32", *extra)
    assert code == 0, err


@pytest.mark.parametrize("method", ["gmp", "set", "rigl"])
def test_a_run_across_mask_changes_resumes_exactly_and_keeps_pruned_weights_zero(method, tmp_path, hopper_file,
                                                                                   capsys):
    from offprune import checkpoint

    window = ("--prune-start", "0", "--prune-end", "1") if method == "gmp" else ("--prune-end", "1")
    run(capsys, tmp_path / "straight", hopper_file, "--prune", method, "--steps", "8", "--eval-every", "4", *window)
    straight = load(tmp_path / "straight")
    name = straight.run_id.iloc[0]
    # interrupt it after update 4: the previous checkpoint generation back in place, the last row gone
    folder = tmp_path / "straight" / name
    (folder / "checkpoint.prev.pt").replace(folder / "checkpoint.pt")
    pd.read_parquet(folder / "results.parquet").iloc[:1].to_parquet(folder / "results.parquet")
    run(capsys, tmp_path / "straight", hopper_file, "--prune", method, "--steps", "8", "--eval-every", "4", *window,
        "--resume")
    resumed = load(tmp_path / "straight")
    cols = [c for c in straight.columns if c.startswith("loss_")] + ["realised_sparsity", "mask_changes"]
    pd_equal = straight[cols].reset_index(drop=True).equals(resumed[cols].reset_index(drop=True))
    assert pd_equal, (straight[cols], resumed[cols])
    assert straight.mask_changes.tolist() == [1, 2]  # changes after updates 3 and 6
    options = straight.iloc[0]
    assert options.prune_every == 3 and options.prune_end == 1.0
    assert options.drop_fraction == (0.0 if method == "gmp" else 0.3)  # recorded where the method uses it
    changes = pd.read_parquet(tmp_path / "straight" / name / "mask_changes.parquet")
    assert sorted(set(changes.step)) == [3, 6] and set(changes.network) == {"policy"}
    assert len(changes) == 2 * 3  # one row per layer (3 weight matrices) and change
    agent, ckpt = checkpoint.load_run(tmp_path / "straight" / name)
    for pname, mask in ckpt["masks"]["policy"].items():
        w = dict(agent.policy.named_parameters())[pname]
        assert torch.count_nonzero(w[~mask]) == 0
    if method == "gmp":
        assert straight.realised_sparsity.tolist() == pytest.approx(
            [gmp_sparsity(3, 0.8, 0, 8), gmp_sparsity(6, 0.8, 0, 8)], abs=1e-3)
    else:
        assert np.allclose(straight.realised_sparsity, 0.8, atol=1e-3)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_set_and_rigl_learn_the_same_on_dense_and_sparse_kernels_across_changes(method, tmp_path, hopper_file,
                                                                                capsys):
    for kernels in ("dense", "sparse"):
        run(capsys, tmp_path / kernels, hopper_file, "--prune", method, "--steps", "8", "--eval-every", "4",
            "--prune-end", "1", "--kernels", kernels)
    dense, sparse = load(tmp_path / "dense"), load(tmp_path / "sparse")
    assert (sparse.kernels == "sparse").all() and (dense.kernels == "dense").all()
    np.testing.assert_allclose(sparse.loss_policy_loss, dense.loss_policy_loss, rtol=1e-4)
    name = dense.run_id.iloc[0]
    changes = {k: pd.read_parquet(tmp_path / k / name / "mask_changes.parquet") for k in ("dense", "sparse")}
    assert changes["dense"].equals(changes["sparse"])  # the same weights dropped and grown at every change


def test_gmp_under_auto_kernels_turns_sparse_when_the_masks_are_sparse_enough_and_resumes_exactly(
        tmp_path, hopper_file, capsys, monkeypatch):
    from offprune import sparse

    # unpruned layers are dense products (estimate exactly 1.0): dense at first, sparse once layers thin out
    monkeypatch.setattr(sparse, "MIN_ESTIMATED_SPEEDUP", 1.01)
    monkeypatch.setattr(sparse, "CSR_FIXED_COST", 0)  # a batch of 32 would never pay it
    args = ("--prune", "gmp", "--steps", "9", "--eval-every", "3", "--prune-start", "0", "--prune-end", "1")
    run(capsys, tmp_path / "auto", hopper_file, *args)
    run(capsys, tmp_path / "dense", hopper_file, *args, "--kernels", "dense")
    auto, dense = load(tmp_path / "auto"), load(tmp_path / "dense")
    assert auto.kernels.tolist() == ["dense", "sparse", "sparse"]  # changes after updates 3 and 6: sparse from 6
    assert (dense.kernels == "dense").all()
    np.testing.assert_allclose(auto.loss_policy_loss, dense.loss_policy_loss, rtol=1e-4)
    assert auto.realised_sparsity.tolist() == dense.realised_sparsity.tolist()
    # interrupted after the switch (the checkpoint of update 6 back in place): it resumes on sparse kernels
    folder = tmp_path / "auto" / auto.run_id.iloc[0]
    (folder / "checkpoint.prev.pt").replace(folder / "checkpoint.pt")
    pd.read_parquet(folder / "results.parquet").iloc[:2].to_parquet(folder / "results.parquet")
    run(capsys, tmp_path / "auto", hopper_file, *args, "--resume")
    resumed = load(tmp_path / "auto")
    cols = [c for c in auto.columns if c.startswith("loss_")] + ["realised_sparsity", "kernels", "normalized_score"]
    assert auto[cols].reset_index(drop=True).equals(resumed[cols].reset_index(drop=True))


def test_rigls_dense_gradient_on_sparse_layers_equals_the_dense_masked_networks():
    from offprune.algos import ALGOS
    from offprune.dynamic import dense_gradients
    from offprune.sparse import SparseLinear, apply_masks
    from offprune.speed import algo_config, update_batches

    config = algo_config("bcq")
    batch = update_batches("bcq", config, 11, 3, 1)[0]
    grads, layers = {}, {}
    for kernels in ("dense", "sparse"):
        torch.manual_seed(0)
        agent = ALGOS["bcq"].Agent(11, 3, 1.0, config, torch.device("cpu"))
        nets = agent.prunable_networks()
        masks = compute_masks(nets, "random", 0.95, "erk", lambda: None, torch.Generator().manual_seed(0))
        apply_masks(nets, masks, agent.optimizers.values(), kernels)
        layers[kernels] = [m for m in agent.critic.q1.modules() if isinstance(m, SparseLinear)]
        torch.manual_seed(1)  # the target's decoded candidates
        grads[kernels] = dense_gradients(lambda: batch)("critic", nets["critic"])
    assert len(layers["sparse"]) == 3 and not layers["dense"]
    assert layers["sparse"] == [m for m in nets["critic"].module.modules() if isinstance(m, SparseLinear)]  # put back
    assert grads["dense"].keys() == grads["sparse"].keys() == {"0.weight", "2.weight", "4.weight"}
    assert torch.count_nonzero(grads["sparse"]["2.weight"][~masks["critic"]["2.weight"]]) > 0  # pruned positions too
    for name, g in grads["dense"].items():
        torch.testing.assert_close(grads["sparse"][name], g, rtol=1e-4, atol=1e-6)


def test_a_scheduled_run_refuses_to_be_extended(tmp_path, hopper_file, capsys):
    run(capsys, tmp_path, hopper_file, "--prune", "gmp", "--steps", "4", "--eval-every", "4")
    code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--sparsity", "0.8", "--dataset", str(hopper_file),
                           "--out", str(tmp_path), "--eval-episodes", "1", "--no-progress", "--prune-every", "3",
                           "--algo-opt", "batch_size=32", "--prune", "gmp", "--steps", "8", "--eval-every", "4",
                           "--resume")
    assert code == 2 and "cannot be extended to 8" in err and err.count("\n") == 1


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_speed_agents_with_changing_masks_change_them_on_both_kernels(method):
    from offprune.speed import ChangingMasks, algo_config, update_batches
    from offprune.sparse import SparseLinear

    config = algo_config("bc-mlp")
    batches = update_batches("bc-mlp", config, 11, 3, 4)
    for kernels in ("dense", "sparse"):
        agent = ChangingMasks("bc-mlp", kernels, 0.9, 11, 3, every=2, config=config, method=method)
        first = {k: m.clone() for k, m in agent.schedule.masks["policy"].items()}
        for b in batches:
            agent.update(b)
        now = agent.schedule.masks["policy"]
        assert any(not torch.equal(first[k], now[k]) for k in now)
        assert {k: int(m.sum()) for k, m in now.items()} == {k: int(m.sum()) for k, m in first.items()}
        if kernels == "sparse":
            layer = agent.agent.policy.net[2]
            assert isinstance(layer, SparseLinear) and torch.equal(layer.mask(), now["net.2.weight"])


def test_the_plan_times_gmp_dense_until_the_auto_rule_turns_it_sparse(monkeypatch):
    from offprune import plan
    from offprune.algos import ALGOS
    from offprune.sparse import kernels_by_rule

    cfg = RunConfig(algo="bcq", dataset="hopper-expert-v5", prune="gmp", sparsity=0.95, steps=20000)
    assert plan.kind_of(cfg).kernels == "gmp"
    assert plan.kind_of(RunConfig(**{**cfg.to_dict(), "kernels": "dense"})).kernels == "dense"
    turn = plan.gmp_dense_updates(cfg, 11, 3)
    start, end = cfg.schedule_window
    steps = change_steps(cfg.steps, start, end, cfg.prune_every)
    assert (start, end) == (4000, 16000) and turn in steps and turn != steps[0]

    def rule_at(step):  # the auto rule on magnitude masks at that change's sparsity, as training asks it
        torch.manual_seed(0)
        agent = ALGOS["bcq"].Agent(11, 3, 1.0, cfg.algo_config(), torch.device("cpu"))
        nets = agent.prunable_networks()
        masks = compute_masks(nets, "magnitude", gmp_sparsity(step, 0.95, start, end), "global", lambda: None,
                              torch.Generator().manual_seed(0), {})
        return kernels_by_rule(nets, masks, agent.rows_per_update)[0]
    assert rule_at(turn) == "sparse" and rule_at(turn - cfg.prune_every) == "dense"
    # the run's update time: the dense rate until then, the sparse rate after
    probed = {"dense": plan.Probe(0.05, 1e-3, 1e-4), "snip": plan.Probe(0.01, 2e-4, 1e-4)}
    timed = plan.probe
    monkeypatch.setattr(plan, "probe", lambda c, *a: (probed[c.prune], "dense" if c.prune == "dense" else "sparse"))
    mixed, kernels = timed(cfg)
    share = turn / cfg.steps
    assert kernels == "gmp" and mixed.update_s == pytest.approx(share * 0.05 + (1 - share) * 0.01, rel=1e-12)
    assert mixed.act_s == 2e-4


def test_options_a_run_would_ignore_are_named():
    assert RunConfig(prune="set").ignored_options(["prune_end", "prune_every", "drop_fraction"]) == []
    assert RunConfig(prune="gmp").ignored_options(["prune_start", "prune_end", "prune_every"]) == []
    assert RunConfig(prune="rigl").ignored_options(["prune_start", "drop_fraction"]) == [
        "--prune-start applies to --prune gmp, not rigl"]
    assert RunConfig(prune="snip").ignored_options(["prune_every", "omega"]) == [
        "--prune-every applies to --prune gmp / set / rigl, not snip",
        "--omega weighs a transfer: it needs --score-transfer or --weight-transfer"]
    assert RunConfig(prune="snip", weight_transfer="runs/x").ignored_options(["omega", "transfer_noise"]) == [
        "--transfer-noise weighs FSTL's random score: it needs --score-transfer"]
    assert RunConfig(prune="snip", score_transfer="runs/x").ignored_options(["omega", "transfer_noise"]) == []
    assert RunConfig(prune="small-dense").ignored_options(["scope"]) == [
        "--scope spreads a sparsity over the layers; --prune small-dense masks no layer"]
    assert RunConfig(prune="random").ignored_options(["scope"]) == []
