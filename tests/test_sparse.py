"""Sparse execution: same learning as dense masked training, exact conversion both ways."""

import contextlib
import copy
import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from offprune.algos import ALGOS
from offprune.prune import MaskEnforcer, compute_masks
from offprune.results import load
from offprune.checkpoint import load_run
from offprune import native
from offprune import sparse as sparse_module
from offprune.sparse import (SparseLinear, apply_masks, convert_to_dense, convert_to_sparse, has_sparse_layers,
                             kernel_for)

from conftest import random_batch, repeat_until_a_helper_runs, run_cli


def masked_linear(out_f=30, in_f=40, density=0.1, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    mask = torch.rand(out_f, in_f) < density
    with torch.no_grad():
        lin.weight.masked_fill_(~mask, 0.0)
    return lin, mask


@pytest.mark.parametrize("kernel", ["csr", "csr-addmm", "dense-product"])
@pytest.mark.parametrize("shape", [(16, 40), (2, 5, 40), (300, 40)])
def test_sparse_linear_matches_dense_masked_outputs_and_gradients(shape, kernel, monkeypatch):
    monkeypatch.setattr(sparse_module, "BLOCK_COLUMNS", 64)  # batch 300: the blocked csr path
    monkeypatch.setattr(sparse_module, "BLOCK_MIN_REUSE", 0)
    lin, mask = masked_linear()
    sparse = SparseLinear(lin, mask, kernel)
    x = torch.randn(*shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = lin(x), sparse(x2)
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.values.grad, lin.weight.grad[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.bias.grad, lin.bias.grad, rtol=1e-5, atol=1e-5)
    assert sparse.values.numel() == int(mask.sum())


@pytest.mark.parametrize("kernel", ["csr", "csr-addmm", "dense-product"])
def test_no_grad_forward_equals_the_autograd_forward_and_follows_weight_updates(kernel):
    lin, mask = masked_linear(density=0.2)
    sparse = SparseLinear(lin, mask, kernel)
    x = torch.randn(7, 40)
    with torch.no_grad():
        before = sparse(x)
    assert torch.equal(before, sparse(x).detach())
    with torch.no_grad():  # an in-place update (as Adam's) must not be hidden by the dense-weight cache
        sparse.values.mul_(2.0)
        after = sparse(x)
    torch.testing.assert_close(after - sparse.bias, 2 * (before - sparse.bias))


def test_blocked_csr_product_is_bit_identical_to_one_call(monkeypatch):
    lin, mask = masked_linear(out_f=50, in_f=60, density=0.1)
    sparse = SparseLinear(lin, mask, "csr")
    x = torch.randn(1000, 60)
    with torch.no_grad(), native.python_loops():  # the Python loops' blocking (the C++ product blocks itself)
        monkeypatch.setattr(sparse_module, "BLOCK_MIN_REUSE", 10**9)  # never blocked
        whole = sparse(x)
        monkeypatch.setattr(sparse_module, "BLOCK_MIN_REUSE", 0)
        monkeypatch.setattr(sparse_module, "BLOCK_COLUMNS", 128)  # 1000 columns: 8 blocks, the last one short
        calls = []
        bag = sparse_module._bag
        monkeypatch.setattr(sparse_module, "_bag", lambda *a: calls.append(1) or bag(*a))
        blocked = sparse(x)
    assert len(calls) == 8
    assert torch.equal(whole, blocked)


def test_wide_chain_runs_in_row_blocks_with_bit_identical_results(monkeypatch):
    from offprune.prune import PrunableNetwork

    net, masks = masked_mlp(nn.ReLU, widths=(14, 200, 150, 3))
    convert_to_sparse({"net": PrunableNetwork(net, lambda b: None)}, {"net": masks}, [])
    x = torch.randn(1000, 14)
    with torch.no_grad(), native.python_loops():  # the Python loops: their passes can be counted
        monkeypatch.setattr(sparse_module, "BLOCK_COLUMNS", 10**6)  # 1000 rows in one pass
        whole = net(x)
        monkeypatch.setattr(sparse_module, "BLOCK_COLUMNS", 128)
        passes = []
        chain_pass = sparse_module._chain_pass
        monkeypatch.setattr(sparse_module, "_chain_pass", lambda *a: passes.append(a[2].shape[0]) or chain_pass(*a))
        blocked = net(x)
    assert passes == [128] * 7 + [104]
    assert torch.equal(whole, blocked)


@pytest.mark.parametrize("mode", ["no_grad", "inference"])
def test_compiled_wide_chain_gives_the_python_loops_bits_on_one_and_two_threads(mode):
    from offprune.prune import PrunableNetwork

    ext = compiled_chain_loops()
    net, masks = masked_mlp(nn.ReLU, widths=(14, 200, 150, 3))
    convert_to_sparse({"net": PrunableNetwork(net, lambda b: None)}, {"net": masks}, [])
    x = torch.randn(1000, 14)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context(), native.python_loops():
        loops = net(x)

    def compute_and_check() -> None:
        with context():
            out = net(x)
        assert same_bits(out, loops)
        assert not out.requires_grad and out.is_inference() == (mode == "inference")

    with sparse_module.sparse_threads(1):
        compute_and_check()
    with sparse_module.sparse_threads(2):
        repeat_until_a_helper_runs(ext, compute_and_check)  # a helper ran a group of blocks


def test_sparse_threads_share_a_wide_chains_row_blocks_with_bit_identical_results(monkeypatch):
    import threading

    from offprune.prune import PrunableNetwork

    net, masks = masked_mlp(nn.ReLU, widths=(14, 200, 150, 3))
    convert_to_sparse({"net": PrunableNetwork(net, lambda b: None)}, {"net": masks}, [])
    monkeypatch.setattr(sparse_module, "BLOCK_MIN_REUSE", 0)  # the 200x150 product qualifies: blocked
    x = torch.randn(1000, 14)
    with torch.no_grad(), sparse_module.sparse_threads(1):
        whole = net(x)
    monkeypatch.setattr(sparse_module, "MIN_SHARED_WORK", 0)
    passes = []
    chain_pass = sparse_module._chain_pass
    monkeypatch.setattr(sparse_module, "_chain_pass",
                        lambda *a: passes.append((a[2].shape[0], threading.get_ident())) or chain_pass(*a))
    torch.set_num_threads(3)
    # the Python loops' thread pool (the compiled loops share each product instead: see below)
    with torch.no_grad(), native.python_loops(), sparse_module.sparse_threads(3):
        assert torch.get_num_threads() == 1  # torch's own ops on one thread
        shared = net(x)
    assert torch.get_num_threads() == 3  # restored
    assert sorted(rows for rows, _ in passes) == [104] + [128] * 7  # the one-thread blocks
    assert len({thread for _, thread in passes}) >= 2  # this thread and the pool's (an idle worker may take two groups)
    assert torch.equal(whole, shared)


@pytest.mark.parametrize("batch", [16, 100, 128, 300, 1000])
def test_compiled_products_shared_over_threads_give_the_one_thread_bits(batch, gather_loops):
    ext = gather_loops
    layer = random_csr(300, 400, 0.2, batch)
    values, bias = layer.values.detach(), layer.bias.detach()
    x_t = torch.randn(400, batch)
    grad_t = torch.randn(300, batch)

    def products():
        return [ext.gather(x_t, layer.crow, layer.col, values, bias, True),
                ext.gather(grad_t, layer.crow_t, layer.col_t, values, None, False),
                ext.own_sampled_product(grad_t, x_t, layer.pattern())]

    with sparse_module.sparse_threads(1):
        before = ext.helper_parts_run()
        alone = products()
        assert ext.helper_parts_run() == before  # nothing handed off

    def shared():
        for a, b in zip(alone, products()):
            assert (a is None and b is None) or same_bits(a, b)

    with sparse_module.sparse_threads(2):
        repeat_until_a_helper_runs(ext, shared)  # parts ran on a helper thread


def test_sparse_bcq_updates_are_bit_identical_on_one_and_two_threads():
    from offprune.speed import algo_config, build, update_batches

    config = algo_config("bcq")
    batches = update_batches("bcq", config, 11, 3, 3)
    trained = []
    for threads in (1, 2):
        agent = build("bcq", "sparse", 0.95, 11, 3, config=config)
        torch.manual_seed(5)  # the VAE's and the target's noise
        with sparse_module.sparse_threads(threads):
            for batch in batches:
                agent.update(batch)
        trained.append({f"{m}.{k}": v for m, module in agent.modules.items() for k, v in module.state_dict().items()})
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


@pytest.mark.parametrize("states", [100, 20])  # 1,000 candidates in 128-row blocks; 200 in one block
def test_bcq_target_in_one_compiled_call_gives_the_python_steps_bits_on_one_and_two_threads(monkeypatch, states):
    import offprune.algos.bcq as bcq
    from offprune.speed import algo_config, build, update_batches

    ext = compiled_chain_loops()
    config = algo_config("bcq")
    agent = build("bcq", "sparse", 0.9, 11, 3, config=config)
    batch = update_batches("bcq", config, 11, 3, 1)[0]
    batch = type(batch)(*(field[:states].clone() for field in batch))
    batch.next_observations[3, 2] = float("nan")  # the 4th state's candidates: NaN through min, max and clamp
    calls = []
    target_call = ext.bcq_target
    monkeypatch.setattr(ext, "bcq_target", lambda *a: calls.append(a[0].shape) or target_call(*a))

    def target() -> Tensor:
        torch.manual_seed(7)  # the prior's draw
        with torch.no_grad():
            return agent.td_target(batch)

    def same(a: Tensor, b: Tensor) -> bool:  # the same bits, NaN where NaN (torch's own NaN bits vary)
        return torch.equal(a.isnan(), b.isnan()) and same_bits(a.nan_to_num(0.0), b.nan_to_num(0.0))

    with sparse_module.sparse_threads(1):
        fused = target()
    assert calls == [(states, 11)]  # the compiled call computed it
    assert fused.shape == (states, 1) and fused.isnan().nonzero().tolist() == [[3, 0]]
    with sparse_module.sparse_threads(2):
        repeat_until_a_helper_runs(ext, lambda: same(target(), fused) or pytest.fail("two threads differ"))
    with native.python_loops():
        assert same(target(), fused)
    monkeypatch.setattr(bcq, "fused_bcq_target", lambda *a: None)  # the Python steps on the compiled chains
    assert same(target(), fused)


def test_bcq_target_and_the_actor_candidates_in_one_call_give_the_separate_steps_bits(monkeypatch):
    import offprune.algos.bcq as bcq
    from offprune.speed import algo_config, build, update_batches

    ext = compiled_chain_loops()
    config = algo_config("bcq")
    agent = build("bcq", "sparse", 0.9, 11, 3, config=config)
    batch = update_batches("bcq", config, 11, 3, 1)[0]
    calls = []
    target_call = ext.bcq_target
    monkeypatch.setattr(ext, "bcq_target", lambda *a: calls.append(a[4] is not None) or target_call(*a))
    torch.manual_seed(3)  # the target's draw, then the actor loss's, as the separate steps draw them
    with torch.no_grad():
        separate = (agent.td_target(batch), agent.vae.decode(batch.observations))
    assert calls == [False]

    def together() -> tuple[Tensor, Tensor]:
        torch.manual_seed(3)
        with torch.no_grad():
            return agent.target_and_candidates(batch)

    def same(a: tuple[Tensor, Tensor]) -> bool:
        return a[1].shape == (100, 3) and all(same_bits(x, y) for x, y in zip(a, separate))

    assert same(together()) and calls[1:] == [True]  # one compiled call computed both
    with sparse_module.sparse_threads(2):
        repeat_until_a_helper_runs(ext, lambda: same(together()) or pytest.fail("two threads differ"))
    monkeypatch.setattr(bcq, "fused_bcq_target", lambda *a: None)  # the Python steps
    assert same(together())


@pytest.mark.parametrize("critic_frozen", [True, False])  # as in BCQ's update / as when scoring the actor
def test_bcq_actor_loss_as_one_compiled_node_gives_torchs_bits_on_one_and_two_threads(monkeypatch, critic_frozen):
    import offprune.algos.bcq as bcq
    from offprune.nets import frozen
    from offprune.speed import algo_config, build, update_batches

    ext = compiled_chain_loops()
    config = algo_config("bcq")
    agent = build("bcq", "sparse", 0.9, 11, 3, config=config)
    batch = update_batches("bcq", config, 11, 3, 1)[0]
    params = [*agent.actor.parameters(), *agent.critic.q1.parameters()]
    calls = []
    node = ext.perturbed_q_loss
    monkeypatch.setattr(ext, "perturbed_q_loss", lambda *a: calls.append(1) or node(*a))

    def loss_and_grads() -> list[Tensor]:
        torch.manual_seed(7)  # the decoder's draw
        for p in params:
            p.grad = None
        with frozen(agent.critic) if critic_frozen else contextlib.nullcontext():
            loss = agent.actor_loss(batch)[0]
            loss.backward()
        return [loss.detach()] + [p.grad if p.grad is not None else torch.zeros(0) for p in params]

    def same(a: list[Tensor], b: list[Tensor]) -> bool:
        return all(same_bits(x, y) for x, y in zip(a, b))

    with sparse_module.sparse_threads(1):
        fused = loss_and_grads()
    assert calls == [1]
    assert sum(g.numel() == 0 for g in fused[1:]) == (6 if critic_frozen else 0)  # Q1 frozen: no gradients
    assert all(g.abs().sum() > 0 for g in fused[1:7])  # the actor's: all there
    with sparse_module.sparse_threads(2):
        repeat_until_a_helper_runs(ext, lambda: same(loss_and_grads(), fused) or pytest.fail("two threads differ"))
    monkeypatch.setattr(bcq, "fused_perturbed_q_loss", lambda *a: None)  # torch's graph over the chains' nodes
    assert same(loss_and_grads(), fused)
    with native.python_loops():
        assert same(loss_and_grads(), fused)


def test_a_trained_csr_layer_copies_without_its_cached_pattern():
    import pickle

    lin, mask = masked_linear(density=0.1)
    layer = SparseLinear(lin, mask, "csr")
    x, grad = torch.randn(8, 40), torch.randn(8, lin.out_features)
    layer(x).backward(grad)  # the weight gradient builds the cached CSR pattern
    assert layer._pattern is not None
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied._pattern is None and layer._pattern is not None
        copied.values.grad = None
        copied(x).backward(grad)
        assert same_bits(copied.values.grad, layer.values.grad)


def test_kernel_rule_puts_sparse_and_small_layers_on_csr_and_dense_ish_ones_on_dense_products():
    g = torch.Generator().manual_seed(0)
    assert kernel_for(torch.rand(750, 750, generator=g) < 0.05) == "csr"
    assert kernel_for(torch.rand(300, 400, generator=g) < 0.2) == "csr"
    assert kernel_for(torch.rand(750, 750, generator=g) < 0.5) == "dense-product"  # too dense to pay
    assert kernel_for(torch.rand(3, 300, generator=g) < 0.05) == "csr"  # an output head: csr pays at any size
    assert kernel_for(torch.rand(3, 300, generator=g) < 0.7) == "csr"  # small layers: up to 90 % dense
    assert kernel_for(torch.rand(400, 14, generator=g) < 0.6) == "csr"  # an input layer
    assert kernel_for(torch.ones(400, 14, dtype=torch.bool)) == "dense-product"  # too dense to pay


def masked_mlp(activation, seed=0, widths=(14, 200, 150, 3)):
    """A pruned MLP (hidden layers 5% dense: csr products; input and output layers 95 % dense: dense products)."""
    from offprune.nets import mlp

    torch.manual_seed(seed)
    net = mlp(widths[0], widths[1:-1], widths[-1], activation)
    masks = {}
    for name, p in net.named_parameters():
        if name.endswith("weight"):
            density = 0.05 if min(p.shape) > 100 else 0.95
            masks[name] = torch.rand(p.shape) < density
            with torch.no_grad():
                p.masked_fill_(~masks[name], 0.0)
    return net, masks


@pytest.mark.parametrize("activation", [nn.ReLU, nn.ELU])
@pytest.mark.parametrize("x_needs_grad", [True, False])
def test_fused_chain_matches_the_dense_masked_mlp(activation, x_needs_grad):
    from offprune.prune import PrunableNetwork

    dense, masks = masked_mlp(activation)
    fused, _ = masked_mlp(activation)
    kernels = convert_to_sparse({"net": PrunableNetwork(fused, lambda b: None)}, {"net": masks}, [])
    assert kernels["net"] == {"0.weight": "dense-product", "2.weight": "csr", "4.weight": "dense-product"}
    assert fused.sparse_chain
    x = torch.randn(64, 14, requires_grad=x_needs_grad)
    x2 = x.detach().clone().requires_grad_(x_needs_grad)
    y, y2 = dense(x), fused(x2)
    # one node for the stack: its inputs are the leaves (parameters, x) themselves
    assert {type(fn).__name__ for fn, _ in y2.grad_fn.next_functions if fn is not None} == {"AccumulateGrad"}
    grad = torch.randn_like(y)
    y.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
    if x_needs_grad:
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    dense_params = dict(dense.named_parameters())
    for i in (0, 2, 4):
        torch.testing.assert_close(fused[i].values.grad, dense_params[f"{i}.weight"].grad[masks[f"{i}.weight"]],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused[i].bias.grad, dense_params[f"{i}.bias"].grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the graph-free pass gives the same output
        assert torch.equal(fused(x2), y2)


def test_fused_chain_with_frozen_layers_leaves_their_gradients_empty():
    from offprune.nets import frozen
    from offprune.prune import PrunableNetwork

    net, masks = masked_mlp(nn.ReLU)
    convert_to_sparse({"net": PrunableNetwork(net, lambda b: None)}, {"net": masks}, [])
    x = torch.randn(32, 14, requires_grad=True)
    with frozen(net):  # gradients pass through to the input only, as BCQ's actor update uses its critic
        net(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    net[4].bias.requires_grad_(False)  # only the lowest layer trains: gradients flow down to it
    net(x).sum().backward()
    assert net[0].values.grad is not None and net[2].values.grad is not None and net[4].bias.grad is None


def test_chains_with_differing_activation_settings_are_not_fused():
    from offprune.prune import PrunableNetwork

    net, masks = masked_mlp(nn.ELU)
    net[3] = nn.ELU(alpha=0.5)  # the chain would apply the first ELU's alpha to both
    convert_to_sparse({"net": PrunableNetwork(net, lambda b: None)}, {"net": masks}, [])
    assert not net.sparse_chain


def test_chains_are_unfused_by_the_way_back_and_skip_unsupported_stacks():
    from offprune.prune import PrunableNetwork

    net, masks = masked_mlp(nn.ReLU)
    tanh_net, tanh_masks = masked_mlp(nn.Tanh)
    convert_to_sparse({"a": PrunableNetwork(net, lambda b: None), "b": PrunableNetwork(tanh_net, lambda b: None)},
                      {"a": masks, "b": tanh_masks}, [])
    assert net.sparse_chain and not tanh_net.sparse_chain  # tanh: per-layer sparse path
    x = torch.randn(8, 14)
    before = tanh_net(x)
    convert_to_dense(net)
    assert not net.sparse_chain and isinstance(net[2], nn.Linear)
    assert torch.equal(tanh_net(x), before)


def test_conversion_back_is_bit_exact_and_keeps_the_mask():
    lin, mask = masked_linear(density=0.3)
    sparse = SparseLinear(lin, mask)
    back = sparse.to_linear()
    assert torch.equal(back.weight.view(torch.int32), lin.weight.view(torch.int32))
    assert torch.equal(sparse.mask(), mask)
    assert not torch.signbit(back.weight[~mask]).any()  # pruned entries are +0.0


def small_bcq_pruned(sparsity: float):
    """A small BCQ agent (seed 0), its prunable networks and their SNIP masks."""
    module = ALGOS["bcq"]
    config = dataclasses.replace(module.Config(), actor_hidden=(64, 48), critic_hidden=(64, 48), vae_hidden=(96, 96),
                                 batch_size=32)
    torch.manual_seed(0)
    agent = module.Agent(11, 3, 1.0, config, torch.device("cpu"))
    nets = agent.prunable_networks()
    masks = compute_masks(nets, "snip", sparsity, "global", lambda: random_batch(11, 3, 100, 7),
                          torch.Generator().manual_seed(0))
    return agent, nets, masks


def agent_pair(sparsity=0.9, kernel=None):
    agents = []
    for kernels in ("dense", "sparse"):
        agent, nets, masks = small_bcq_pruned(sparsity)
        if kernels == "dense":
            MaskEnforcer(nets, masks, agent.optimizers.values())
        else:
            kernels = convert_to_sparse(nets, masks, agent.optimizers.values(), kernel)
            assert {n: len(p) for n, p in kernels.items()} == {"actor": 3, "critic": 3, "vae": 7}
            converted = sum(isinstance(m, SparseLinear) for n in nets.values() for mod in (n.module, *n.mask_copies)
                            for m in mod.modules())
            assert converted == 3 * 2 + 3 * 4 + 7  # actor + target, Q1, Q2 + targets, VAE
        agents.append((agent, masks))
    return agents


@pytest.mark.parametrize("kernel", ["csr", "dense-product"])
def test_sparse_and_dense_kernels_learn_the_same_for_300_bcq_updates(kernel):
    (dense, masks), (sparse, _) = agent_pair(kernel=kernel)
    losses = {"dense": [], "sparse": []}
    for step in range(300):
        batch = random_batch(11, 3, 32, seed=1000 + step)
        for name, agent in (("dense", dense), ("sparse", sparse)):
            torch.manual_seed(step)  # the same VAE noise and decoded candidates for both
            losses[name].append(agent.update(batch))
    for key in ("critic_loss", "actor_loss", "vae_loss"):
        d = np.array([row[key] for row in losses["dense"]])
        s = np.array([row[key] for row in losses["sparse"]])
        np.testing.assert_allclose(s, d, rtol=1e-4, atol=1e-6, err_msg=key)
        assert np.isfinite(s).all() and not np.allclose(s[:10], s[-10:])  # it did learn
    # pruned weights are exactly zero in both, in every network and its copies (twin, targets)
    for kernels, agent in (("dense", dense), ("sparse", sparse)):
        for name, net in agent.prunable_networks().items():
            for module in (net.module, *net.mask_copies):
                module = convert_to_dense(module) if kernels == "sparse" else module
                assert not has_sparse_layers(module)
                params = dict(module.named_parameters())
                for pname, mask in masks[name].items():
                    assert torch.count_nonzero(params[pname][~mask]) == 0, (kernels, name, pname)
                    assert torch.count_nonzero(params[pname][mask]) > 0.99 * int(mask.sum())


def test_run_records_kernels_and_storage_reads_sparse_runs(capsys, tmp_path, hopper_file):
    from offprune import checkpoint

    code, out, err = run_cli(capsys, "run", "--algo", "bcq", "--sparsity", "0.95", "--kernels", "sparse",
                            "--dataset", str(hopper_file), "--out", str(tmp_path), "--steps", "4",
                            "--eval-every", "2", "--eval-episodes", "1", "--no-progress")
    assert code == 0, err
    rows = load(tmp_path)
    assert (rows.kernels == "sparse").all() and (rows.torch_threads == 1).all()
    run_dir = tmp_path / "bcq_hopper-random-v5_snip_s0.95_seed0"
    agent, ckpt = checkpoint.load_run(run_dir)
    masks = ckpt["masks"]
    assert not has_sparse_layers(agent.actor)
    for pname, mask in masks["actor"].items():
        w = dict(agent.actor.named_parameters())[pname]
        assert torch.count_nonzero(w[~mask]) == 0 and torch.count_nonzero(w[mask]) == int(mask.sum())


TIMING_COLUMNS = ["timestamp", "steps_per_s", "train_seconds", "eval_seconds", "sparse_kernel_speedup_measured"]


def _run_rows(capsys, out, *args):
    code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--sparsity", "0.9", "--out", str(out), "--steps", "6",
                           "--eval-every", "3", "--eval-episodes", "1", "--no-progress", *args)
    assert code == 0, err
    return load(out), err


def test_auto_kernels_follow_the_fixed_rule(capsys, tmp_path, hopper_file):
    rows, err = _run_rows(capsys, tmp_path, "--dataset", str(hopper_file))
    row = rows.iloc[0]
    assert "kernels auto: sparse layers estimated" in err and "measured" not in err
    assert row.kernels_requested == "auto" and np.isnan(row.sparse_kernel_speedup_measured)
    # the rule's own figure for these masks: bc-mlp 256-256 at 90 %, batch 256
    agent, ckpt = load_run(tmp_path / "bc-mlp_hopper-random-v5_snip_s0.9_seed0")
    choice, estimate = sparse_module.kernels_by_rule(agent.prunable_networks(), ckpt["masks"], 256)
    assert row.sparse_kernel_speedup_estimated == pytest.approx(estimate)
    assert row.kernels == choice == ("sparse" if estimate >= sparse_module.MIN_ESTIMATED_SPEEDUP else "dense")


def test_same_command_gives_identical_results(capsys, tmp_path, hopper_file):
    first, _ = _run_rows(capsys, tmp_path / "a", "--dataset", str(hopper_file))
    second, _ = _run_rows(capsys, tmp_path / "b", "--dataset", str(hopper_file))
    assert len(first) == 2
    pd.testing.assert_frame_equal(first.drop(columns=TIMING_COLUMNS), second.drop(columns=TIMING_COLUMNS))
    assert (first.filter(like="loss_") != 0).all().all()


def test_measured_kernels_do_not_move_the_random_stream(capsys, tmp_path, hopper_file):
    measured, err = _run_rows(capsys, tmp_path / "m", "--dataset", str(hopper_file), "--kernels", "measure")
    assert "kernels measure: sparse layers measured" in err
    choice = measured.kernels.iloc[0]
    assert measured.sparse_kernel_speedup_measured.iloc[0] > 0
    explicit, _ = _run_rows(capsys, tmp_path / "e", "--dataset", str(hopper_file), "--kernels", choice)
    columns = [c for c in measured.columns if c.startswith("loss_") or c in ("normalized_score", "return_mean")]
    pd.testing.assert_frame_equal(measured[columns], explicit[columns])


def test_sparse_kernels_without_pruning_is_a_one_line_error(capsys, tmp_path, hopper_file):
    code, _, err = run_cli(capsys, "run", "--prune", "dense", "--kernels", "sparse", "--dataset", str(hopper_file),
                          "--out", str(tmp_path), "--steps", "1")
    assert code == 2 and err.count("\n") == 1 and "--kernels sparse needs pruned networks" in err


def test_speed_json(capsys):
    code, out, err = run_cli(capsys, "speed", "--algo", "bc-mlp", "--sparsity", "0.9", "--repeats", "1",
                            "--steps", "2", "--json")
    assert code == 0, err
    figures = json.loads(out)
    assert {"dense_unmasked", "dense_masked", "sparse"} <= set(figures)
    assert all(figures[k] > 0 for k in ("dense_unmasked", "dense_masked", "sparse"))
    assert ("sparse_python" in figures) == (native.chain_kernels() is not None)  # both loops, when there are two
    code, _, err = run_cli(capsys, "speed", "--sparsity", "0")
    assert code == 2 and "--sparsity must be in (0, 1)" in err
    code, _, err = run_cli(capsys, "speed", "--algo-opt", "nope=1")
    assert code == 2 and "--algo-opt nope: bcq has no such option" in err


def test_speed_compares_thread_counts_interleaved_in_one_process(capsys, monkeypatch):
    from offprune import speed

    seen = []
    real = speed.steps_per_second
    monkeypatch.setattr(speed, "steps_per_second", lambda agent, batches: seen.append(
        (any(speed.has_sparse_layers(m) for m in agent.modules.values()), torch.get_num_threads(),
         sparse_module._threads)) or real(agent, batches))
    code, out, err = run_cli(capsys, "speed", "--algo", "bc-mlp", "--sparsity", "0.9", "--repeats", "2",
                             "--steps", "2", "--compare-threads", "3", "--json")
    assert code == 0, err
    figures = json.loads(out)
    assert {k for k in figures if "@" in k} == {"dense_masked@1", "dense_masked@3", "sparse@1", "sparse@3"}
    # a warm-up round, then two rounds of the four in turn
    assert seen == [(False, 1, 1), (False, 3, 1), (True, 1, 1), (True, 1, 3)] * 3
    code, _, err = run_cli(capsys, "speed", "--compare-threads", "1")
    assert code == 2 and "--compare-threads must be at least 2" in err


def test_speed_measures_dreamer_on_sequences(capsys):
    from test_dreamer import TINY_OPTS

    opts = [o for o in TINY_OPTS if o != "--seq-len" and o != "8"] + ["--algo-opt", "seq_len=8"]
    code, out, err = run_cli(capsys, "speed", "--algo", "dreamer", "--sparsity", "0.9", "--repeats", "1",
                            "--steps", "1", "--json", *opts)
    assert code == 0, err
    figures = json.loads(out)
    assert all(figures[k] > 0 for k in ("dense_unmasked", "dense_masked", "sparse", "dense_reparam"))


def test_a_sparse_runs_checkpoint_is_in_the_dense_masked_layout(capsys, tmp_path, hopper_file):
    from offprune.checkpoint import build_agent

    code, _, err = run_cli(capsys, "run", "--algo", "bcq", "--sparsity", "0.95", "--dataset", str(hopper_file),
                           "--out", str(tmp_path), "--steps", "2", "--eval-every", "2", "--eval-episodes", "1",
                           "--kernels", "sparse", "--no-progress")
    assert code == 0, err
    ckpt = torch.load(tmp_path / "bcq_hopper-random-v5_snip_s0.95_seed0" / "checkpoint.pt", weights_only=False)
    assert ckpt["kernels"] == "sparse" and ckpt["layout"] == "dense"
    agent = build_agent(ckpt["agent"])
    for name, module in agent.modules.items():  # a freshly built dense agent takes them as they are
        module.load_state_dict(ckpt["modules"][name])
    mask = ckpt["masks"]["vae"]["decoder.2.weight"]
    weight = agent.vae.decoder[2].weight
    assert weight.shape == mask.shape and torch.count_nonzero(weight[~mask]) == 0
    assert torch.count_nonzero(weight[mask]) == int(mask.sum())
    index = [n for n, _ in agent.vae.named_parameters()].index("decoder.2.weight")  # the optimizer's order
    moments = ckpt["optimizers"]["vae"]["state"][index]
    for key in ("exp_avg", "exp_avg_sq"):  # in the weight's shape, zero where pruned, trained where kept
        assert moments[key].shape == mask.shape and torch.count_nonzero(moments[key][~mask]) == 0
        assert torch.count_nonzero(moments[key][mask]) > 0


def holder_pair(sparsity=0.9):
    """The same BCQ agent trained under dense and sparse kernels through apply_masks."""
    pairs = []
    for kernels in ("dense", "sparse"):
        agent, nets, masks = small_bcq_pruned(sparsity)
        pairs.append((agent, apply_masks(nets, masks, agent.optimizers.values(), kernels), masks))
    return pairs


def train_both(agents, steps):
    for step in steps:
        batch = random_batch(11, 3, 32, seed=1000 + step)
        for agent in agents:
            torch.manual_seed(step)
            agent.update(batch)


def test_new_masks_rebuild_sparse_layers_and_train_as_dense_kernels_do():
    (dense, dense_holder, masks), (sparse, sparse_holder, _) = holder_pair()
    train_both((dense, sparse), range(20))
    # the new masks: drop a third of each kept set, regrow as many positions elsewhere (as SET does)
    g = torch.Generator().manual_seed(5)
    new = {}
    for net, layers in masks.items():
        new[net] = {}
        for pname, mask in layers.items():
            flat = mask.flatten().clone()
            kept, pruned = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
            k = min(len(kept) // 3, len(pruned))
            flat[kept[torch.randperm(len(kept), generator=g)[:k]]] = False
            flat[pruned[torch.randperm(len(pruned), generator=g)[:k]]] = True
            new[net][pname] = flat.view_as(mask)
    dense_holder.set_masks(new)
    sparse_holder.set_masks(new)
    layer = sparse.vae.decoder[2]
    assert isinstance(layer, SparseLinear) and layer.values.numel() == int(new["vae"]["decoder.2.weight"].sum())
    assert torch.equal(layer.mask(), new["vae"]["decoder.2.weight"])
    moments = sparse.optimizers["vae"].state[layer.values]["exp_avg"]
    dense_moments = dense.optimizers["vae"].state[dense.vae.decoder[2].weight]["exp_avg"]
    new_mask, old_mask = new["vae"]["decoder.2.weight"], masks["vae"]["decoder.2.weight"]
    torch.testing.assert_close(moments, dense_moments[new_mask], rtol=1e-4, atol=1e-7)  # moved by position
    regrown = (new_mask & ~old_mask)[new_mask]
    assert regrown.any() and torch.count_nonzero(moments[regrown]) == 0  # newly kept: zero moments
    assert sparse_holder.kernels["vae"]["decoder.2.weight"] in ("csr", "dense-product")
    train_both((dense, sparse), range(20, 40))
    for name, net in sparse.prunable_networks().items():
        dense_net = dense.prunable_networks()[name]
        for module, dense_module in zip((net.module, *net.mask_copies), (dense_net.module, *dense_net.mask_copies)):
            params = dict(convert_to_dense(copy.deepcopy(module)).named_parameters())
            dense_params = dict(dense_module.named_parameters())
            for pname, mask in new[name].items():
                assert torch.count_nonzero(params[pname][~mask]) == 0
                assert torch.count_nonzero(dense_params[pname][~mask]) == 0
                torch.testing.assert_close(params[pname], dense_params[pname], rtol=1e-4, atol=1e-5)


def test_the_update_breakdown_puts_gathers_on_sparse_kernels_and_products_on_dense_ones(capfd):
    from offprune.speed import algo_config, build, update_batches, update_breakdown

    config = algo_config("bc-mlp")
    batches = update_batches("bc-mlp", config, 11, 3, 5)
    dense = update_breakdown(build("bc-mlp", "dense_masked", 0.9, 11, 3, config=config), batches)
    sparse = update_breakdown(build("bc-mlp", "sparse", 0.9, 11, 3, config=config), batches)
    assert dense["forward gather"] == dense["input-grad gather"] == dense["weight-grad sampled product"] == 0
    assert dense["dense products"] > 0 and dense["optimizer step"] > 0
    assert sparse["forward gather"] > 0 and sparse["input-grad gather"] > 0 and sparse["weight-grad sampled product"] > 0
    assert "USDT" not in capfd.readouterr().err  # the profiler's start / stop log lines stay quiet


# --- the C++ chain loops (offprune.native) compute the same bits as the Python loops ------------

def compiled_chain_loops():
    """The compiled module; a failed build is a test failure wherever a C++ compiler is present."""
    import shutil

    if os.environ.get(native.ENV_SWITCH) == "0":
        pytest.skip(f"{native.ENV_SWITCH}=0")
    ext = native.chain_kernels()
    if ext is None:
        assert not (shutil.which("c++") or shutil.which("g++")), "a C++ compiler is here, but the chain loops did not build"
        pytest.skip("no C++ compiler")
    return ext


@pytest.fixture(params=[2, 1], ids=["avx512", "avx2"])
def gather_loops(request):
    """The compiled CSR products on each instruction set this CPU has (the AVX2 loops run on
    AVX-512 machines too): the same bits on each."""
    ext = compiled_chain_loops()
    previous = ext.set_gather_isa(request.param)
    try:
        if ext.gather_isa() != request.param:
            pytest.skip(f"this CPU has no {['', 'AVX2', 'AVX-512'][request.param]} loops")
        yield ext
    finally:
        ext.set_gather_isa(previous)


def random_csr(out_f, in_f, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    mask[3] = False  # an output row with no kept weight
    lin = nn.Linear(in_f, out_f)
    return SparseLinear(lin, mask, "csr")


@pytest.mark.parametrize("batch", [1, 5, 16, 100, 128, 129, 300, 1000])
def test_the_compiled_csr_product_is_bit_identical_to_the_embedding_bag(batch, gather_loops):
    ext = gather_loops
    layer = random_csr(70, 90, 0.1, batch)
    values, bias = layer.values.detach(), layer.bias.detach()
    x_t = torch.randn(90, batch)
    wide = torch.randn(90, batch + 7)[:, 3:3 + batch]  # a strided view whose rows start off cache lines
    transposed = torch.randn(batch, 90).T  # a chain's input as the first layer sees it
    for x in (x_t, wide, transposed):
        plain = sparse_module._bag(x.contiguous(), layer.col, layer.crow, values)
        assert torch.equal(ext.gather(x, layer.crow, layer.col, values, None, False), plain)
        fused = ext.gather(x, layer.crow, layer.col, values, bias, True)
        assert torch.equal(fused, plain.add_(bias.unsqueeze(1)).relu_())
        assert (fused[3] == bias[3].clamp_min(0)).all()  # the empty row: bias only


def test_the_compiled_relu_keeps_nans_as_torchs_does(gather_loops):
    ext = gather_loops
    layer = random_csr(70, 90, 0.1, 0)
    values, bias = layer.values.detach(), layer.bias.detach()
    x_t = torch.randn(90, 100)
    x_t[int(layer.col[0]), :7] = float("nan")  # reaches the first row's first 7 columns
    fused = ext.gather(x_t, layer.crow, layer.col, values, bias, True)
    expected = sparse_module._bag(x_t, layer.col, layer.crow, values).add_(bias.unsqueeze(1)).relu_()
    assert fused[0, :7].isnan().all()  # relu(NaN) is NaN in torch, not 0
    assert same_bits(fused, expected)


@pytest.mark.parametrize("batch", [1, 7, 8, 9, 100, 256, 1000])
def test_the_compiled_weight_gradient_gives_the_bits_of_torchs_sampled_addmm(batch):
    ext = compiled_chain_loops()
    if not native.sampled_dots_match(ext):
        pytest.skip("this CPU's sampled_addmm sums in another order: the chain loops keep torch's operator")
    layer = random_csr(70, 90, 0.1, batch)
    grad_t = torch.randn(70, batch)
    grad_t[5] = 0.0  # products of -0.0: torch's result is +0.0
    for h_t in (torch.randn(90, batch), torch.randn(batch, 90).T):  # a first layer's input is a transposed view
        own = ext.own_sampled_product(grad_t, h_t, layer.pattern())
        torchs = torch.sparse.sampled_addmm(layer.pattern(), grad_t, h_t.T, beta=0.0).values()
        assert same_bits(own, torchs)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Equal bit for bit (torch.equal counts -0.0 and +0.0 as equal)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def chain_results(net, x, grad):
    x = x.detach().clone().requires_grad_(x.requires_grad)
    for p in net.parameters():
        p.grad = None
    y = net(x)
    y.backward(grad)
    with torch.no_grad():
        graph_free = net(x)
    return [y, graph_free, x.grad, *(p.grad for p in net.parameters())]


@pytest.mark.parametrize("activation", [nn.ReLU, nn.ELU])
@pytest.mark.parametrize("kernel", [None, "csr-addmm", "csr"])
@pytest.mark.parametrize("rows", [1, 10, 100, 1000])
def test_compiled_and_python_chain_loops_compute_the_same_bits(activation, kernel, rows, gather_loops):
    from offprune.prune import PrunableNetwork

    net, masks = masked_mlp(activation, widths=(14, 200, 150, 3))
    convert_to_sparse({"net": PrunableNetwork(net, lambda b: None)}, {"net": masks}, [], kernel=kernel)
    assert net.sparse_chain
    for x_needs_grad in (True, False):
        x = torch.randn(rows, 14, requires_grad=x_needs_grad)
        grad = torch.randn(rows, 3)
        compiled = chain_results(net, x, grad)
        with native.python_loops():
            python = chain_results(net, x, grad)
        assert len(compiled) == len(python) == 9
        for a, b in zip(compiled, python):
            assert (a is None and b is None) or same_bits(a, b)


@pytest.mark.parametrize("rows", [5, 100])
def test_compiled_and_python_loops_give_inference_copies_the_same_outputs(rows):
    from offprune.sparse import inference_copy, layer_kernels_in

    compiled_chain_loops()
    net, _ = masked_mlp(nn.ReLU, widths=(14, 200, 150, 3))
    copy_ = inference_copy(net, rows)
    assert layer_kernels_in(copy_) == ["dense", "csr-addmm" if rows < 32 else "csr", "dense"]
    x = torch.randn(rows, 14)
    with torch.inference_mode():
        compiled = copy_(x)
        with native.python_loops():
            python = copy_(x)
    assert same_bits(compiled, python)


@pytest.mark.parametrize("threads", [1, 2])
def test_twin_chains_run_as_one_node_with_the_bits_of_two(threads):
    from offprune.nets import twin_forward
    from offprune.prune import PrunableNetwork

    compiled_chain_loops()
    a, masks_a = masked_mlp(nn.ReLU, seed=1)
    b, masks_b = masked_mlp(nn.ReLU, seed=2)
    convert_to_sparse({"a": PrunableNetwork(a, lambda _: None), "b": PrunableNetwork(b, lambda _: None)},
                      {"a": masks_a, "b": masks_b}, [])
    params = [*a.parameters(), *b.parameters()]
    x = torch.randn(100, 14, requires_grad=True)
    grads_out = torch.randn(100, 3), torch.randn(100, 3)

    def results(pair):
        with sparse_module.sparse_threads(threads):
            outputs = pair(x)
        torch.autograd.backward(outputs, grads_out)
        found = [t.detach().clone() for t in outputs] + [x.grad.clone()] + [p.grad.clone() for p in params]
        x.grad = None
        for p in params:
            p.grad = None
        return outputs, found

    (first, second), together = results(lambda x: twin_forward(a, b, x))
    assert first.grad_fn is second.grad_fn  # one node
    with native.python_loops():
        _, python = results(lambda x: twin_forward(a, b, x))
    _, apart = results(lambda x: (a(x), b(x)))
    assert len(together) == len(python) == len(apart) == 3 + len(params)
    for t, p, s in zip(together, python, apart):
        assert same_bits(t, p) and same_bits(t, s)


def test_compiled_and_python_loops_train_bcq_to_the_same_bits(gather_loops):
    from offprune.speed import algo_config, build, update_batches

    config = algo_config("bcq")
    batches = update_batches("bcq", config, 11, 3, 5)
    trained = []
    for python in (False, True):
        agent = build("bcq", "sparse", 0.95, 11, 3, config=config)
        torch.manual_seed(5)
        with native.python_loops() if python else contextlib.nullcontext():
            losses = [agent.update(batch) for batch in batches]
        trained.append((losses, {f"{m}.{k}": v for m, module in agent.modules.items()
                                 for k, v in module.state_dict().items()}))
    assert trained[0][0] == trained[1][0]
    assert all(same_bits(trained[0][1][k], trained[1][1][k]) for k in trained[0][1] if trained[0][1][k].is_floating_point())
    assert all(torch.equal(trained[0][1][k], trained[1][1][k]) for k in trained[0][1])


@pytest.mark.parametrize("threads", [1, 2])
def test_bcq_update_in_one_compiled_call_gives_the_python_steps_bits(monkeypatch, threads):
    import offprune.algos.bcq as bcq
    from offprune.speed import algo_config, build, update_batches

    compiled_chain_loops()
    config = algo_config("bcq")
    batches = update_batches("bcq", config, 11, 3, 6)
    taken = []
    fused_update = bcq.fused_bcq_update

    def spy(*args):
        info = fused_update(*args)
        taken.append(info is not None)
        return info

    monkeypatch.setattr(bcq, "fused_bcq_update", spy)
    trained = []
    for fused in (True, False):
        if not fused:  # the Python steps, each piece still compiled
            monkeypatch.setattr(bcq, "fused_bcq_update", lambda *a: None)
        agent = build("bcq", "sparse", 0.95, 11, 3, config=config)
        torch.manual_seed(5)
        with sparse_module.sparse_threads(threads):
            infos = [agent.update(batch) for batch in batches]
        trained.append((infos, {f"{m}.{k}": v for m, module in agent.modules.items()
                                for k, v in module.state_dict().items()},
                        [o.state_dict() for o in agent.optimizers.values()]))
    assert taken == [False] + [True] * 5  # the first update creates Adam's state with torch's own step
    (fused_infos, fused_state, fused_optim), (python_infos, python_state, python_optim) = trained
    assert fused_infos == python_infos  # the info dicts, key order and values
    assert all(torch.equal(fused_state[k], python_state[k]) and same_bits(fused_state[k], python_state[k])
               for k in fused_state if fused_state[k].is_floating_point())
    for a, b in zip(fused_optim, python_optim):  # Adam's moments and step counts
        assert all(torch.equal(x, y) for i in a["state"] for x, y in zip(a["state"][i].values(), b["state"][i].values()))


def test_bcq_update_takes_the_python_steps_where_a_step_hook_must_run(monkeypatch):
    from offprune.nets import steps_taken
    from offprune.speed import algo_config, build, update_batches

    ext = compiled_chain_loops()
    config = algo_config("bcq")
    batches = update_batches("bcq", config, 11, 3, 3)
    agent = build("bcq", "sparse", 0.95, 11, 3, config=config)
    compiled = []
    update = ext.bcq_update
    monkeypatch.setattr(ext, "bcq_update", lambda *a: compiled.append(1) or update(*a))
    agent.update(batches[0])  # the first step creates Adam's state (torch's own step)
    agent.update(batches[1])
    assert compiled == [1]
    seen = []
    handle = agent.critic_optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append(steps_taken(opt)))
    try:
        agent.update(batches[2])
    finally:
        handle.remove()
    assert seen == [3] and compiled == [1]  # the hook ran: the update took the Python steps


def test_a_failed_build_falls_back_to_the_python_loops(tmp_path, monkeypatch, capfd):
    broken = tmp_path / "_chain.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    assert native._load() is None
    assert "C++ chain loops are unavailable" in capfd.readouterr().err
    assert not any((tmp_path / "cache").glob("*.so"))  # nothing half-built is left to load
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native._load() is None  # switched off: not even tried


def test_a_chain_rebuilds_its_call_structure_when_its_buffers_are_replaced():
    from offprune.prune import PrunableNetwork
    from offprune.sparse import chain_parts

    compiled_chain_loops()
    net, masks = masked_mlp(nn.ReLU)
    convert_to_sparse({"net": PrunableNetwork(net, lambda b: None)}, {"net": masks}, [])
    x = torch.randn(10, 14)
    before = net(x)
    structure = sparse_module._structure(*chain_parts(net))
    assert sparse_module._structure(*chain_parts(net)) is structure  # kept between calls
    net._apply(lambda t: t.clone())  # as a device move does: new buffer and parameter tensors
    assert sparse_module._structure(*chain_parts(net)) is not structure
    assert sparse_module._structure(*chain_parts(net)).forward[1][1] is net[2].crow
    assert same_bits(net(x), before)


def test_a_chain_uses_a_replaced_parameter_not_the_one_its_call_structure_held():
    from offprune.prune import PrunableNetwork
    from offprune.sparse import chain_parts

    compiled_chain_loops()
    net, masks = masked_mlp(nn.ReLU)
    convert_to_sparse({"net": PrunableNetwork(net, lambda b: None)}, {"net": masks}, [])
    x = torch.randn(10, 14)
    before = net(x)
    assert sparse_module._structure(*chain_parts(net)).params[0] is net[0].values
    net[4].bias = nn.Parameter(net[4].bias.detach() + 1.0)  # a new parameter object, not an in-place change
    assert sparse_module._structure(*chain_parts(net)).params[-1] is net[4].bias
    with native.python_loops():  # no call structure there
        expected = net(x)
    assert not same_bits(expected, before)
    assert same_bits(net(x), expected)
    with torch.no_grad():
        assert same_bits(net(x), expected)  # the graph-free pass too


@pytest.mark.parametrize("rows", [100, 400])
def test_compiled_backward_on_two_threads_queues_parameter_gradients_with_the_one_thread_bits(rows):
    from offprune.prune import PrunableNetwork

    ext = compiled_chain_loops()
    # 600x500 at 5 %: ~15,000 kept weights, its weight gradient cut into row ranges at 400 rows
    net, masks = masked_mlp(nn.ReLU, widths=(14, 600, 500, 3))
    convert_to_sparse({"net": PrunableNetwork(net, lambda b: None)}, {"net": masks}, [], kernel="csr")
    x = torch.randn(rows, 14, requires_grad=True)
    grad = torch.randn(rows, 3)
    with sparse_module.sparse_threads(1):
        alone = chain_results(net, x, grad)
    with native.python_loops():
        python = chain_results(net, x, grad)

    def shared():
        for a, b, c in zip(alone, chain_results(net, x, grad), python):
            assert same_bits(a, b) and same_bits(a, c)

    with sparse_module.sparse_threads(2):
        repeat_until_a_helper_runs(ext, shared)  # the helper took the queue


@pytest.mark.parametrize("threads", [1, 2])
def test_a_failing_gradient_task_raises_in_the_caller_and_leaves_the_helpers_usable(threads):
    ext = compiled_chain_loops()
    grad_out, weight = torch.randn(100, 5), torch.randn(5, 7)
    none = torch.empty(0)

    def backward(h_t):  # one dense layer: its weight and bias gradients are queued tasks
        return ext.chain_backward(grad_out, [native.GRAD_LINEAR], [h_t], [weight], [none], [none], [none], [none],
                                  [none], [True, True], False, 0, native.RELU, 1.0)

    with sparse_module.sparse_threads(threads):
        with pytest.raises(RuntimeError):
            backward(torch.randn(7, 99))  # a saved input of the wrong width: the weight gradient's product fails
        h_t = torch.randn(7, 100)
        grads = backward(h_t)  # the next backward runs as usual
    assert torch.allclose(grads[0], grad_out.T @ h_t.T) and torch.allclose(grads[1], grad_out.sum(0))
