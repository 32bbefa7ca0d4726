"""SynFlow, ERK, the sanity checks (shuffle, reinit): each against an independent computation."""

import math

import pytest
import torch

from offprune.algos import ALGOS
from offprune.nets import mlp, ones_output
from offprune.prune import (PrunableNetwork, compute_masks, erk_densities, layer_densities, masks_from_scores,
                            score_network, shuffle_within_layers)
from offprune.results import load

from conftest import random_batch, run_cli


def test_synflow_scores_equal_the_path_sums_of_absolute_weights():
    torch.manual_seed(0)
    net = mlp(3, (4,), 2)
    scores = score_network("synflow", PrunableNetwork(net, lambda b: None, output=ones_output(net)), None)
    w1, b1, w2 = net[0].weight.detach().abs(), net[0].bias.detach().abs(), net[2].weight.detach().abs()
    # R = sum_i sum_j |W2_ij| (sum_k |W1_jk| + |b1_j|) + sum |b2|, on an all-ones input
    expected_w1 = w1 * w2.sum(0).unsqueeze(1)  # dR/dW1_jk = sum_i |W2_ij|
    expected_w2 = w2 * (w1.sum(1) + b1).unsqueeze(0)  # dR/dW2_ij = sum_k |W1_jk| + |b1_j|
    torch.testing.assert_close(scores["0.weight"], expected_w1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scores["2.weight"], expected_w2, rtol=1e-6, atol=1e-7)
    assert net[0].weight.dtype == torch.float32 and (net[0].weight < 0).any()  # signs and dtype restored


def test_synflow_keeps_every_layer_where_global_magnitude_collapses_one():
    torch.manual_seed(0)
    agent = ALGOS["bcq"].Agent(11, 3, 1.0, ALGOS["bcq"].Config(), torch.device("cpu"))
    actor = {"actor": agent.prunable_networks()["actor"]}
    batch = random_batch(11, 3, 100, 0)
    g = torch.Generator().manual_seed(0)
    magnitude = compute_masks(actor, "magnitude", 0.99, "global", lambda: batch, g)
    synflow = compute_masks(actor, "synflow", 0.99, "global", lambda: batch, g, rounds=100)
    assert min(d.kept for d in layer_densities(magnitude)) == 0
    assert min(d.kept for d in layer_densities(synflow)) > 0
    assert sum(d.kept for d in layer_densities(synflow)) == round(0.01 * sum(d.total for d in layer_densities(synflow)))


@pytest.mark.parametrize("algo", ["bc", "bcq"])
def test_synflow_keeps_the_vae_decoder_seeing_every_state_feature(algo):
    # The decoder takes (state, z). Fed the encoder's mean as z, SynFlow's paths through the encoder
    # outweighed the decoder's direct state inputs and pruned all 11 of them: an agent blind to the state.
    torch.manual_seed(0)
    agent = ALGOS[algo].Agent(11, 3, 1.0, ALGOS[algo].Config(), torch.device("cpu"))
    vae = {"vae": agent.prunable_networks()["vae"]}
    masks = compute_masks(vae, "synflow", 0.95, "global", lambda: random_batch(11, 3, 100, 0),
                          torch.Generator().manual_seed(0), rounds=100)["vae"]
    first = masks["decoder.0.weight"]  # [750, 11 state + 6 latent inputs]
    assert (first[:, :11].sum(0) > 0).all() and (first[:, 11:].sum(0) > 0).all()
    assert (masks["encoder.0.weight"].sum(0) > 0).all()  # every (state, action) input of the encoder too


def test_synflow_without_an_output_is_one_clear_error():
    from offprune.errors import UserError

    net = mlp(3, (4,), 2)
    with pytest.raises(UserError, match="synflow needs the network's output"):
        score_network("synflow", PrunableNetwork(net, lambda b: None), None)


def test_iterative_snip_with_one_round_is_snip():
    torch.manual_seed(0)
    agent = ALGOS["bc-mlp"].Agent(11, 3, 1.0, ALGOS["bc-mlp"].Config(), torch.device("cpu"))
    nets, batch = agent.prunable_networks(), random_batch(11, 3, 100, 0)
    one = compute_masks(nets, "snip", 0.95, "global", lambda: batch, torch.Generator(), rounds=1)["policy"]
    scores = score_network("snip", nets["policy"], batch)
    expected = masks_from_scores(scores, 0.95, "global")
    assert all(torch.equal(one[k], expected[k]) for k in one)


def test_erk_densities_follow_the_formula_and_cap_dense_layers():
    shapes = {"a": (400, 14), "b": (300, 400), "c": (3, 300)}
    d = erk_densities(shapes, 0.1)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    # a tiny output head would exceed density 1: it is kept dense, the rest share the remaining budget
    assert d["c"] == 1.0
    raw = {n: (s[0] + s[1]) / (s[0] * s[1]) for n, s in shapes.items()}
    scale = (0.1 * sum(sizes.values()) - sizes["c"]) / (raw["a"] * sizes["a"] + raw["b"] * sizes["b"])
    assert d["a"] == pytest.approx(scale * raw["a"]) and d["b"] == pytest.approx(scale * raw["b"])
    assert sum(d[n] * sizes[n] for n in shapes) == pytest.approx(0.1 * sum(sizes.values()))
    masks = masks_from_scores({n: torch.rand(s) for n, s in shapes.items()}, 0.9, "erk")
    assert {n: int(m.sum()) for n, m in masks.items()} == {n: round(sizes[n] * d[n]) for n in shapes}


def test_shuffle_keeps_each_layer_count_and_moves_the_weights():
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(30, 20, generator=g) < 0.1, "b": torch.rand(5, 30, generator=g) < 0.5}
    shuffled = shuffle_within_layers(masks, torch.Generator().manual_seed(1))
    assert {n: int(m.sum()) for n, m in shuffled.items()} == {n: int(m.sum()) for n, m in masks.items()}
    assert not torch.equal(shuffled["a"], masks["a"])


def test_reinit_redraws_kept_weights_keeps_masks_and_targets_equal_sources(tmp_path, hopper_file, capsys):
    from offprune import checkpoint

    def run(*extra):
        code, _, err = run_cli(capsys, "run", "--algo", "bcq", "--sparsity", "0.9", "--dataset", str(hopper_file),
                               "--out", str(tmp_path), "--steps", "1", "--eval-every", "1", "--eval-episodes", "1",
                               "--no-progress", "--kernels", "dense", *extra)
        assert code == 0, err

    run()
    run("--reinit")
    run("--mask-transform", "shuffle")
    plain, _ = checkpoint.load_run(tmp_path / "bcq_hopper-random-v5_snip_s0.9_seed0")
    reinit, ckpt = checkpoint.load_run(tmp_path / "bcq_hopper-random-v5_snip_s0.9_reinit_seed0")
    shuffled, shuffled_ckpt = checkpoint.load_run(tmp_path / "bcq_hopper-random-v5_snip_s0.9_shuffle_seed0")
    plain_masks = torch.load(tmp_path / "bcq_hopper-random-v5_snip_s0.9_seed0" / "masks.pt", weights_only=False)
    assert all(torch.equal(ckpt["masks"][n][p], m) for n, layers in plain_masks.items() for p, m in layers.items())
    assert all(int(shuffled_ckpt["masks"][n][p].sum()) == int(m.sum()) for n, layers in plain_masks.items()
               for p, m in layers.items())
    w_plain, w_reinit = plain.vae.decoder[2].weight, reinit.vae.decoder[2].weight
    kept = plain_masks["vae"]["decoder.2.weight"]
    assert torch.count_nonzero(w_reinit[~kept]) == 0 and not torch.allclose(w_plain[kept], w_reinit[kept])
    rows = load(tmp_path).set_index("run_id")
    assert bool(rows.loc["bcq_hopper-random-v5_snip_s0.9_reinit_seed0", "reinit"])
    assert rows.loc["bcq_hopper-random-v5_snip_s0.9_shuffle_seed0", "mask_transform"] == "shuffle"


def test_erk_scope_runs_and_dense_refuses_the_sanity_checks(tmp_path, hopper_file, capsys):
    code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--prune", "random", "--scope", "erk", "--sparsity", "0.9",
                           "--dataset", str(hopper_file), "--out", str(tmp_path), "--steps", "1", "--eval-episodes", "1",
                           "--no-progress")
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--prune", "dense", "--reinit", "--dataset",
                           str(hopper_file), "--out", str(tmp_path), "--steps", "1", "--no-progress")
    assert code == 2 and "--prune dense has none" in err and err.count("\n") == 1


def test_masks_from_another_run_are_used_and_mismatches_are_one_line(tmp_path, hopper_file, capsys):
    def run(*extra):
        return run_cli(capsys, "run", "--algo", "bc-mlp", "--dataset", str(hopper_file), "--out", str(tmp_path),
                       "--steps", "2", "--eval-every", "2", "--eval-episodes", "1", "--no-progress", *extra)

    assert run("--sparsity", "0.9", "--seed", "1")[0] == 0
    source = tmp_path / "bc-mlp_hopper-random-v5_snip_s0.9_seed1"
    code, _, err = run("--sparsity", "0.9", "--masks-from", str(source))
    assert code == 0, err
    target = tmp_path / f"bc-mlp_hopper-random-v5_snip_s0.9_from-{source.name}_seed0"
    theirs = torch.load(source / "masks.pt", weights_only=False)
    ours = torch.load(target / "masks.pt", weights_only=False)
    assert all(torch.equal(ours["policy"][k], m) for k, m in theirs["policy"].items())
    assert load(tmp_path).set_index("run_id").loc[target.name, "masks_from"] == source.name
    code, _, err = run("--sparsity", "0.9", "--masks-from", str(source), "--algo-opt", "hidden=32,32", "--run-id", "x")
    assert code == 2 and err.count("\n") == 1
    assert "do not fit this run's networks: policy/net.0.weight (32, 11) vs (256, 11)" in err
    code, _, err = run("--sparsity", "0.8", "--masks-from", str(source))
    assert code == 2 and "at sparsity 0.9000, not 0.8" in err


@pytest.mark.parametrize("algo", ["bcq", "bc", "td3-bc", "iql"])
def test_small_dense_networks_hold_the_pruned_weight_count_within_one_percent(algo):
    from offprune.prune import prunable_parameters
    from offprune.small_dense import small_dense_config

    config = ALGOS[algo].Config()
    full = ALGOS[algo].Agent(17, 6, 1.0, config, torch.device("cpu")).prunable_networks()
    small_config, counts = small_dense_config(algo, config, 0.95, 17, 6)
    small = ALGOS[algo].Agent(17, 6, 1.0, small_config, torch.device("cpu")).prunable_networks()
    assert set(counts) == set(full)
    for name, net in full.items():
        target = round(0.05 * sum(p.numel() for p in prunable_parameters(net.module).values()))
        have = sum(p.numel() for p in prunable_parameters(small[name].module).values())
        assert counts[name] == (have, target) and abs(have - target) <= 0.01 * target


def test_small_dense_run_records_widths_and_counts(tmp_path, hopper_file, capsys):
    code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--prune", "small-dense", "--sparsity", "0.9",
                           "--dataset", str(hopper_file), "--out", str(tmp_path), "--steps", "1", "--eval-episodes", "1",
                           "--no-progress")
    assert code == 0, err
    row = load(tmp_path).iloc[-1]
    full = 11 * 256 + 256 * 256 + 256 * 3
    assert row.prune == "small-dense" and row.realised_sparsity == 0
    assert abs(row.kept_weights - round(0.1 * full)) <= 0.01 * round(0.1 * full)
    assert row.network_widths == "hidden=76,77"
    code, _, err = run_cli(capsys, "run", "--algo", "dreamer", "--prune", "small-dense", "--sparsity", "0.9",
                           "--dataset", str(hopper_file), "--out", str(tmp_path), "--steps", "1", "--no-progress")
    assert code == 2 and "not available for dreamer" in err


def test_score_transfer_mixes_normalised_scores():
    from offprune.prune import ScoreMix, compute_masks_and_scores

    torch.manual_seed(0)
    agent = ALGOS["bc-mlp"].Agent(11, 3, 1.0, ALGOS["bc-mlp"].Config(), torch.device("cpu"))
    nets, batch = agent.prunable_networks(), random_batch(11, 3, 100, 0)
    own_masks, own_scores = compute_masks_and_scores(nets, "snip", 0.9, "global", lambda: batch, torch.Generator())
    source = {"policy": {k: torch.rand(s.shape, generator=torch.Generator().manual_seed(3)) for k, s in
                         own_scores["policy"].items()}}
    # omega 0 and no random part: the target's own SNIP mask
    masks, _ = compute_masks_and_scores(nets, "snip", 0.9, "global", lambda: batch, torch.Generator(),
                                        mix=ScoreMix(source, omega=0.0, noise=0.0))
    assert all(torch.equal(masks["policy"][k], own_masks["policy"][k]) for k in masks["policy"])
    # a dominant omega: the source's ranking
    masks, mixed = compute_masks_and_scores(nets, "snip", 0.9, "global", lambda: batch, torch.Generator(),
                                            mix=ScoreMix(source, omega=1e6, noise=0.0))
    expected = masks_from_scores(source["policy"], 0.9, "global")
    assert all(torch.equal(masks["policy"][k], expected[k]) for k in expected)
    # each term divided by its mean |score|: the mixed score by hand for one weight
    mean_own = torch.cat([s.flatten() for s in own_scores["policy"].values()]).abs().mean()
    mean_src = torch.cat([s.flatten() for s in source["policy"].values()]).abs().mean()
    k = "net.0.weight"
    hand = own_scores["policy"][k] / mean_own + 1e6 * source["policy"][k] / mean_src
    torch.testing.assert_close(mixed["policy"][k], hand, rtol=1e-5, atol=0)


def test_weight_transfer_adds_omega_times_the_trained_weights_and_score_transfer_runs(tmp_path, hopper_file, capsys):
    from offprune import checkpoint

    def run(*extra):
        code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--dataset", str(hopper_file), "--out",
                               str(tmp_path), "--steps", "2", "--eval-every", "2", "--eval-episodes", "1",
                               "--no-progress", "--sparsity", "0.9", *extra)
        assert code == 0, err

    run("--seed", "1")
    source = tmp_path / "bc-mlp_hopper-random-v5_snip_s0.9_seed1"
    assert set(checkpoint.load_scores(source)) == {"policy"}
    run("--prune", "magnitude", "--weight-transfer", str(source), "--omega", "1000")
    target = tmp_path / f"bc-mlp_hopper-random-v5_magnitude_s0.9_ftl-{source.name}_o1000_seed0"
    trained, _ = checkpoint.load_run(source)
    expected = masks_from_scores({k: w.detach().abs() for k, w in trained.policy.named_parameters()
                                  if k.endswith("weight")}, 0.9, "global")
    got = torch.load(target / "masks.pt", weights_only=False)["policy"]
    agree = sum(int((got[k] & expected[k]).sum()) for k in got) / sum(int(m.sum()) for m in got.values())
    assert agree > 0.99  # magnitude of fresh + 1000 x trained: the trained weights' ranking
    run("--score-transfer", str(source), "--omega", "0.2")
    row = load(tmp_path).set_index("run_id").loc[f"bc-mlp_hopper-random-v5_snip_s0.9_fstl-{source.name}_o0.2_seed0"]
    assert row.score_transfer == source.name and row.omega == 0.2
    # a source made before runs kept scores.pt: its scores are recomputed from its config, exactly
    saved = checkpoint.load_scores(source)
    (source / "scores.pt").unlink()
    run("--score-transfer", str(source), "--omega", "0.2", "--run-id", "again")
    again = checkpoint.load_scores(source)
    assert all(torch.equal(again["policy"][k], saved["policy"][k]) for k in saved["policy"])
    first = tmp_path / f"bc-mlp_hopper-random-v5_snip_s0.9_fstl-{source.name}_o0.2_seed0"
    assert all(torch.equal(checkpoint.load_masks(first)["policy"][k], checkpoint.load_masks(tmp_path / "again")["policy"][k])
               for k in saved["policy"])
    rows = load(tmp_path).set_index("run_id")
    assert rows.loc["again"].loss_policy_loss == rows.loc[first.name].loss_policy_loss  # the same run


def test_synflow_names_the_network_without_an_output():
    from offprune.errors import UserError
    from offprune.prune import compute_masks as masks_of

    torch.manual_seed(0)
    cfg = ALGOS["dreamer"].Config(deter=8, stoch=4, hidden=8, embed=8, encoder_hidden=(8,), decoder_hidden=(8,),
                                  reward_hidden=(8,), value_hidden=(8,), actor_hidden=(8,), ensemble=2)
    nets = ALGOS["dreamer"].Agent(11, 3, 1.0, cfg, torch.device("cpu")).prunable_networks()
    with pytest.raises(UserError, match="synflow needs network rssm's output.*--sparsity-of rssm=0"):
        masks_of(nets, "synflow", 0.9, "global", lambda: None, torch.Generator())
    kept = masks_of(nets, "synflow", 0.9, "global", lambda: None, torch.Generator(), {"rssm": 0.0}, rounds=2)
    assert all(bool(m.all()) for m in kept["rssm"].values()) and not all(bool(m.all()) for m in kept["encoder"].values())


def test_the_plan_probes_small_dense_as_its_narrower_dense_networks():
    from offprune import plan
    from offprune.config import RunConfig
    from offprune.prune import prunable_parameters

    cfg = RunConfig(algo="bc-mlp", prune="small-dense", sparsity=0.9, dataset="hopper-expert-v5")
    assert plan.kind_of(cfg).kernels == "small-dense"  # not the SNIP-masked kind of the same sparsity
    agent, kernels = plan._agent(cfg, 11, 3)
    kept = sum(p.numel() for net in agent.prunable_networks().values()
               for p in prunable_parameters(net.module).values())
    assert kernels == "dense" and kept == 76 * 11 + 77 * 76 + 3 * 77  # the widths a small-dense run trains
