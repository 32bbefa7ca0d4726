"""BCQ's VAE loss as one node over sparse chains (offprune.sparse_vae): the same bits compiled and
in Python, the gradients of torch's autograd."""

import copy

import pytest
import torch

from offprune import native
from offprune.nets import VAE
from offprune.prune import PrunableNetwork
from offprune.sparse import convert_to_dense, convert_to_sparse
from offprune.sparse import fused_vae_loss

from test_sparse import compiled_chain_loops, same_bits

OBS, ACT = 11, 3


def pruned_vae(seed: int = 0) -> tuple[VAE, dict[str, torch.Tensor]]:
    """A VAE with 200-wide layers: the big ones keep 20 %, the small ones (inputs, heads) 60 %."""
    torch.manual_seed(seed)
    vae = VAE(OBS, ACT, 2 * ACT, (200, 200), max_action=1.0)
    masks = {}
    for name, p in vae.named_parameters():
        if name.endswith("weight"):
            masks[name] = torch.rand(p.shape) < (0.2 if p.numel() > 16_384 else 0.6)
            with torch.no_grad():
                p.masked_fill_(~masks[name], 0.0)
    return vae, masks


def to_sparse(vae: VAE, masks: dict[str, torch.Tensor], kernel: str | None = "csr") -> VAE:
    convert_to_sparse({"vae": PrunableNetwork(vae, lambda b: None)}, {"vae": masks}, [], kernel=kernel)
    return vae


def loss_and_grads(vae: VAE, obs: torch.Tensor, action: torch.Tensor, fused: bool = True) -> list[torch.Tensor]:
    """(loss, reconstruction, KL, every parameter's gradient) for the noise of seed 7."""
    saved = vae.fused_loss
    if not fused:
        vae.fused_loss = None
    try:
        for p in vae.parameters():
            p.grad = None
        torch.manual_seed(7)
        loss, info = vae.loss(obs, action)
        loss.backward()
    finally:
        vae.fused_loss = saved
    return [loss.detach(), torch.tensor(info["vae_recon"]), torch.tensor(info["vae_kl"]),
            *(p.grad for p in vae.parameters())]


@pytest.mark.parametrize("rows", [5, 100, 150])
def test_the_node_gives_the_same_bits_compiled_and_in_python_and_autograds_gradients(rows):
    compiled_chain_loops()
    dense, masks = pruned_vae()
    vae = to_sparse(copy.deepcopy(dense), masks)
    assert vae.fused_loss is fused_vae_loss
    obs, action = torch.randn(rows, OBS), torch.rand(rows, ACT) * 2 - 1
    compiled = loss_and_grads(vae, obs, action)
    with native.python_loops():
        python = loss_and_grads(vae, obs, action)
    assert len(compiled) == len(python) == 3 + 2 * 7
    assert all(same_bits(a, b) for a, b in zip(compiled, python))
    # torch's autograd over the same sparse layers (one op at a time), and over the dense masked VAE
    autograd = loss_and_grads(vae, obs, action, fused=False)
    for a, b in zip(compiled, autograd):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    reference = loss_and_grads(dense, obs, action)
    torch.testing.assert_close(compiled[0], reference[0], rtol=1e-5, atol=1e-7)
    dense_grads = {name: p.grad for name, p in dense.named_parameters()}
    for (name, p), grad in zip(vae.named_parameters(), compiled[3:]):
        layer, kind = name.rsplit(".", 1)
        expected = dense_grads[f"{layer}.weight"][masks[f"{layer}.weight"]] if kind == "values" else dense_grads[name]
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_the_node_trains_what_autograd_trains_and_leaves_pruned_weights_out():
    _, masks = pruned_vae(1)
    vae = to_sparse(pruned_vae(1)[0], masks)
    twin = copy.deepcopy(vae)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (vae, twin)]
    obs, action = torch.randn(64, OBS), torch.rand(64, ACT) * 2 - 1
    for step in range(20):
        for model, optimizer, fused in ((vae, optimizers[0], True), (twin, optimizers[1], False)):
            optimizer.zero_grad()
            loss_and_grads(model, obs, action, fused)
            optimizer.step()
    for a, b in zip(vae.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    back = convert_to_dense(vae)
    for name, mask in masks.items():
        assert torch.count_nonzero(back.get_parameter(name)[~mask]) == 0


def test_only_a_vae_of_csr_layers_gets_the_node():
    dense, masks = pruned_vae(2)
    assert to_sparse(copy.deepcopy(dense), masks).fused_loss is fused_vae_loss
    assert to_sparse(copy.deepcopy(dense), masks, kernel="dense-product").fused_loss is None
    assert convert_to_dense(to_sparse(copy.deepcopy(dense), masks)).fused_loss is None
    assert dense.fused_loss is None
