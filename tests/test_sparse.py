"""Sparse execution: same learning as dense masked training, exact conversion both ways."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from offprune.algos import ALGOS
from offprune.prune import MaskEnforcer, compute_masks
from offprune.results import load
from offprune import sparse as sparse_module
from offprune.sparse import SparseLinear, convert_to_dense, convert_to_sparse, has_sparse_layers, product_for

from conftest import random_batch, run_cli


def masked_linear(out_f=30, in_f=40, density=0.1, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    mask = torch.rand(out_f, in_f) < density
    with torch.no_grad():
        lin.weight.masked_fill_(~mask, 0.0)
    return lin, mask


@pytest.mark.parametrize("product", ["csr", "dense"])
@pytest.mark.parametrize("shape", [(16, 40), (2, 5, 40), (300, 40)])
def test_sparse_linear_matches_dense_masked_outputs_and_gradients(shape, product, monkeypatch):
    monkeypatch.setattr(sparse_module, "BLOCK_COLUMNS", 64)  # batch 300: the blocked csr path
    lin, mask = masked_linear()
    sparse = SparseLinear(lin, mask, product)
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


@pytest.mark.parametrize("product", ["csr", "dense"])
def test_no_grad_forward_equals_the_autograd_forward_and_follows_weight_updates(product):
    lin, mask = masked_linear(density=0.2)
    sparse = SparseLinear(lin, mask, product)
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
    with torch.no_grad():
        whole = sparse(x)
        monkeypatch.setattr(sparse_module, "BLOCK_COLUMNS", 128)  # 1000 columns: 8 blocks, the last one short
        blocked = sparse(x)
    assert torch.equal(whole, blocked)


def test_product_rule_keeps_small_or_dense_layers_on_dense_products():
    g = torch.Generator().manual_seed(0)
    assert product_for(torch.rand(750, 750, generator=g) < 0.05) == "csr"
    assert product_for(torch.rand(300, 400, generator=g) < 0.2) == "csr"
    assert product_for(torch.rand(750, 750, generator=g) < 0.5) == "dense"  # too dense to pay
    assert product_for(torch.rand(3, 300, generator=g) < 0.05) == "dense"  # output head: too small
    assert product_for(torch.rand(400, 14, generator=g) < 0.05) == "dense"  # input layer: too small


def test_conversion_back_is_bit_exact_and_keeps_the_mask():
    lin, mask = masked_linear(density=0.3)
    sparse = SparseLinear(lin, mask)
    back = sparse.to_linear()
    assert torch.equal(back.weight.view(torch.int32), lin.weight.view(torch.int32))
    assert torch.equal(sparse.mask(), mask)
    assert not torch.signbit(back.weight[~mask]).any()  # pruned entries are +0.0


def agent_pair(sparsity=0.9, product=None):
    module = ALGOS["bcq"]
    config = dataclasses.replace(module.Config(), actor_hidden=(64, 48), critic_hidden=(64, 48), vae_hidden=(96, 96),
                                 batch_size=32)
    agents = []
    for kernels in ("dense", "sparse"):
        torch.manual_seed(0)
        agent = module.Agent(11, 3, 1.0, config, torch.device("cpu"))
        nets = agent.prunable_networks()
        masks = compute_masks(nets, "snip", sparsity, "global", lambda: random_batch(11, 3, 100, 7),
                              torch.Generator().manual_seed(0))
        if kernels == "dense":
            MaskEnforcer(nets, masks, agent.optimizers.values())
        else:
            products = convert_to_sparse(nets, masks, agent.optimizers.values(), product)
            assert {n: len(p) for n, p in products.items()} == {"actor": 3, "critic": 3, "vae": 7}
            converted = sum(isinstance(m, SparseLinear) for n in nets.values() for mod in (n.module, *n.mask_copies)
                            for m in mod.modules())
            assert converted == 3 * 2 + 3 * 4 + 7  # actor + target, Q1, Q2 + targets, VAE
        agents.append((agent, masks))
    return agents


@pytest.mark.parametrize("product", ["csr", "dense"])
def test_sparse_and_dense_kernels_learn_the_same_for_300_bcq_updates(product):
    (dense, masks), (sparse, _) = agent_pair(product=product)
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
    from offprune import storage as st

    code, out, err = run_cli(capsys, "run", "--algo", "bcq", "--sparsity", "0.95", "--kernels", "sparse",
                            "--dataset", str(hopper_file), "--out", str(tmp_path), "--steps", "4",
                            "--eval-every", "2", "--eval-episodes", "1", "--no-progress")
    assert code == 0, err
    rows = load(tmp_path)
    assert (rows.kernels == "sparse").all() and (rows.torch_threads == 1).all()
    run_dir = tmp_path / "bcq_hopper-random-v5_snip_s0.95_seed0"
    agent, ckpt = st.load_run(run_dir)
    masks = ckpt["masks"]
    assert not has_sparse_layers(agent.actor)
    for pname, mask in masks["actor"].items():
        w = dict(agent.actor.named_parameters())[pname]
        assert torch.count_nonzero(w[~mask]) == 0 and torch.count_nonzero(w[mask]) == int(mask.sum())


def test_auto_kernels_record_their_measurement(capsys, tmp_path, hopper_file):
    code, _, err = run_cli(capsys, "run", "--algo", "bc-mlp", "--sparsity", "0.9", "--dataset", str(hopper_file),
                          "--out", str(tmp_path), "--steps", "2", "--eval-episodes", "1", "--no-progress")
    assert code == 0
    assert "kernels auto: sparse layers measured" in err
    row = load(tmp_path).iloc[0]
    assert row.kernels_requested == "auto" and row.kernels in ("dense", "sparse")
    assert row.sparse_kernel_speedup_measured > 0
    assert (row.kernels == "sparse") == (row.sparse_kernel_speedup_measured >= 1.1)


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
    code, _, err = run_cli(capsys, "speed", "--sparsity", "0")
    assert code == 2 and "--sparsity must be in (0, 1)" in err
