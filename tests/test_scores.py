"""Each criterion against a hand computation on a tiny network."""

import numpy as np
import pytest
import torch
from torch import nn

from offprune.prune import prunable_parameters, score


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)


def test_prunable_parameters_are_weight_matrices_only():
    net = nn.ModuleDict({"mlp": tiny_net(), "gru": nn.GRU(3, 4), "norm": nn.LayerNorm(4)})
    names = set(prunable_parameters(net))
    assert names == {"mlp.0.weight", "mlp.2.weight", "gru.weight_ih_l0", "gru.weight_hh_l0"}


def test_snip_equals_hand_computed_backprop():
    net = tiny_net()
    x, t = data()
    scores = score("snip", net, lambda: ((net(x) - t) ** 2).mean())

    # Backprop by hand in numpy: y = W2 relu(W1 x + b1) + b2, L = mean((y - t)^2).
    W1, b1 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    W2, b2 = net[2].weight.detach().numpy(), net[2].bias.detach().numpy()
    X, T = x.numpy(), t.numpy()
    pre = X @ W1.T + b1
    h = np.maximum(pre, 0)
    y = h @ W2.T + b2
    dy = 2 * (y - T) / y.size
    dW2 = dy.T @ h
    dW1 = ((dy @ W2) * (pre > 0)).T @ X

    assert set(scores) == {"0.weight", "2.weight"}  # biases are never scored
    np.testing.assert_allclose(scores["0.weight"].numpy(), np.abs(W1 * dW1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(scores["2.weight"].numpy(), np.abs(W2 * dW2), rtol=1e-5, atol=1e-7)


def test_grasp_equals_weight_times_explicit_hessian_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # tanh: a non-zero Hessian
    x, t = data()
    scores = score("grasp", net, lambda: ((net(x) - t) ** 2).mean())

    w1, w2 = net[0].weight.detach().clone(), net[2].weight.detach().clone()
    b1, b2 = net[0].bias.detach(), net[2].bias.detach()
    flat = torch.cat([w1.flatten(), w2.flatten()]).double()

    def loss_of(v):
        W1 = v[: w1.numel()].view_as(w1)
        W2 = v[w1.numel():].view_as(w2)
        y = torch.tanh(x.double() @ W1.T + b1.double()) @ W2.T + b2.double()
        return ((y - t.double()) ** 2).mean()

    H = torch.autograd.functional.hessian(loss_of, flat)
    g = torch.autograd.functional.jacobian(loss_of, flat)
    expected = (flat * (H @ g)).float()
    got = torch.cat([scores["0.weight"].flatten(), scores["2.weight"].flatten()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)
    assert got.abs().sum() > 0


def test_grasp_of_loss_linear_in_weights_is_zero():
    net = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    scores = score("grasp", net, lambda: net(x).sum())
    assert torch.count_nonzero(scores["weight"]) == 0


def test_magnitude_is_absolute_weight():
    net = tiny_net()
    scores = score("magnitude", net, lambda: None)
    torch.testing.assert_close(scores["2.weight"], net[2].weight.detach().abs())


def test_random_is_seeded_by_generator():
    net = tiny_net()
    a = score("random", net, lambda: None, generator=torch.Generator().manual_seed(3))
    b = score("random", net, lambda: None, generator=torch.Generator().manual_seed(3))
    c = score("random", net, lambda: None, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a["0.weight"], b["0.weight"])
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_scoring_leaves_weights_and_grads_untouched():
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, t = data()
    for method in ("snip", "grasp"):
        score(method, net, lambda: ((net(x) - t) ** 2).mean())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in net.parameters())


def test_unknown_criterion_raises():
    with pytest.raises(ValueError, match="unknown pruning criterion"):
        score("nope", tiny_net(), lambda: None)
