"""Offline Dreamer building blocks: the RSSM's shapes and masks, the lambda-return."""

import torch

from offprune.algos.dreamer import RSSM, lambda_return
from offprune.prune import MaskEnforcer, compute_masks
from offprune.prune.networks import PrunableNetwork
from offprune.prune.scores import prunable_parameters


def test_lambda_return_matches_a_hand_computation():
    r = torch.tensor([1.0, 2.0, 3.0])
    v = torch.tensor([10.0, 20.0, 30.0])
    d = torch.tensor([0.9, 0.9, 0.0])  # the last step ends the episode
    boot = torch.tensor(40.0)
    lam = 0.5
    # backwards: R2 = 3 + 0 * (...) = 3; R1 = 2 + 0.9 (0.5 * 30 + 0.5 * 3) = 16.85;
    # R0 = 1 + 0.9 (0.5 * 20 + 0.5 * 16.85) = 17.5825
    torch.testing.assert_close(lambda_return(r, v, d, boot, lam), torch.tensor([17.5825, 16.85, 3.0]))
    # lam = 1: discounted Monte-Carlo return with bootstrap; lam = 0: one-step TD targets
    torch.testing.assert_close(lambda_return(r, v, torch.full((3,), 0.5), boot, 1.0),
                               torch.tensor([1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 40, 2 + 0.5 * 3 + 0.25 * 40, 3 + 0.5 * 40]))
    torch.testing.assert_close(lambda_return(r, v, torch.full((3,), 0.5), boot, 0.0),
                               torch.tensor([1 + 0.5 * 20, 2 + 0.5 * 30, 3 + 0.5 * 40]))


def test_rssm_shapes_and_gru_weights_are_prunable():
    torch.manual_seed(0)
    rssm = RSSM(embed_dim=8, act_dim=3, deter=16, stoch=4, hidden=12, ensemble=5)
    out = rssm.observe(torch.randn(2, 7, 8), torch.randn(2, 7, 3), rssm.initial(2))
    assert out["h"].shape == (2, 7, 16) and out["z"].shape == (2, 7, 4) and out["post_std"].shape == (2, 7, 4)
    assert out["prior_mean"].shape == (5, 2, 7, 4) and (out["prior_std"] >= 0.1).all()
    assert {"cell.weight_ih", "cell.weight_hh"} <= set(prunable_parameters(rssm))


def test_masks_stay_frozen_in_the_gru():
    torch.manual_seed(0)
    rssm = RSSM(embed_dim=8, act_dim=3, deter=16, stoch=4, hidden=12, ensemble=2)
    embed, actions = torch.randn(4, 6, 8), torch.randn(4, 6, 3)

    def loss() -> torch.Tensor:
        out = rssm.observe(embed, actions, rssm.initial(4))
        return (out["post_mean"] - out["prior_mean"].mean(0)).pow(2).mean() + out["h"].pow(2).mean()

    nets = {"rssm": PrunableNetwork(rssm, lambda batch: loss())}
    masks = compute_masks(nets, "snip", 0.8, "global", lambda: None, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(rssm.parameters(), lr=1e-2)
    MaskEnforcer(nets, masks, [opt])
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    w_hh = rssm.cell.weight_hh
    assert torch.count_nonzero(w_hh[~masks["rssm"]["cell.weight_hh"]]) == 0
    assert int(sum(m.sum() for m in masks["rssm"].values())) == round(0.2 * sum(m.numel() for m in masks["rssm"].values()))
