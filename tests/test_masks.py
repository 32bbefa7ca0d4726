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
