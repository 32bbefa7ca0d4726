"""offprune.nets: the kept parameter lists that soft updates and `frozen` walk."""

import torch
from torch import nn

from offprune.nets import frozen, mlp, module_parameters, soft_update


def test_module_parameters_follow_parameters_and_every_way_of_replacing_one():
    torch.manual_seed(0)
    net = nn.Sequential(mlp(3, (4,), 2), nn.Linear(2, 2))

    assert module_parameters(net) == list(net.parameters()) and module_parameters(net) is module_parameters(net)
    kept = module_parameters(net)
    # set as an attribute (torch's registration hooks)
    net[1].bias = nn.Parameter(torch.zeros(2))
    assert module_parameters(net) is not kept and module_parameters(net)[-1] is net[1].bias
    # written into the owner's dict directly (no hook runs)
    kept = module_parameters(net)
    fresh = nn.Parameter(torch.ones(4))
    net[0][0]._parameters["bias"] = fresh
    assert module_parameters(net) is not kept and any(p is fresh for p in module_parameters(net))
    # a submodule replaced, and one shared parameter listed once, as parameters() lists it
    net[1] = nn.Linear(2, 2)
    shared = nn.Sequential(net[1], net[1])
    assert module_parameters(net) == list(net.parameters()) and len(module_parameters(shared)) == 2


def test_soft_update_reaches_a_replaced_parameter_and_frozen_leaves_frozen_ones_frozen():
    torch.manual_seed(1)
    source, target = nn.Linear(3, 2), nn.Linear(3, 2)
    soft_update(target, source, 0.5)
    target.weight = nn.Parameter(torch.zeros(2, 3))
    soft_update(target, source, 0.5)
    assert torch.equal(target.weight, torch.lerp(torch.zeros(2, 3), source.weight.detach(), 0.5))
    source.bias.requires_grad_(False)
    with frozen(source):
        assert not source.weight.requires_grad
    assert source.weight.requires_grad and not source.bias.requires_grad
