"""The pruning paper's claims, checked against results: one row per claim and case.

Each check is a small function from final scores (offprune.report.final_scores) and per-layer
counts (layers.parquet) to rows of `claim | measurement | agrees`; a check whose data is not in
the results gives no rows. "Holds" uses the report's rule: mean(pruned) / mean(dense) >= 0.9.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from offprune import stats

HOLD = 0.9  # a pruned score "holds" at >= this fraction of the dense score


def performance_holds_at_95(finals: pd.DataFrame, reps: int = stats.DEFAULT_REPS) -> list[dict]:
    """Paper: at 95 % sparsity SNIP and GraSP keep the dense performance everywhere except BCQ on hopper."""
    rows = []
    at95 = finals[np.isclose(finals.target_sparsity, 0.95) & finals.prune.isin(["snip", "grasp"])]
    for (algo, dataset, prune), g in at95.groupby(["algo", "dataset", "prune"]):
        dense = finals[(finals.algo == algo) & (finals.dataset == dataset) & (finals.prune == "dense")]
        if not len(dense) or dense.normalized_score.mean() <= 0:
            continue
        scores, base = g.normalized_score.to_numpy(), dense.normalized_score.to_numpy()
        ratio = stats.ratio_of_means([scores, base])
        lo, hi = stats.stratified_bootstrap_ci([scores, base], stats.ratio_of_means, reps)
        expected = not (algo == "bcq" and dataset.startswith("hopper"))
        holds = ratio >= HOLD
        rows.append(dict(
            claim=f"at 95% {prune} {'holds' if expected else 'does not hold'} for {algo} on {dataset}",
            measurement=f"{g.normalized_score.mean():.1f} vs dense {dense.normalized_score.mean():.1f}: "
                        f"{ratio:.2f} of dense [95% CI {lo:.2f}-{hi:.2f}], {len(g)} / {len(dense)} seeds",
            agrees="yes" if holds == expected else "no"))
    return rows


def last_layer_kept(layers: pd.DataFrame, sparsity: float = 0.95) -> list[dict]:
    """Paper (Figure 3): SNIP and GraSP keep more of the last layer than of the network, GraSP more than SNIP."""
    rows = []
    data = layers[np.isclose(layers.target_sparsity, sparsity) & layers.prune.isin(["snip", "grasp"])]
    for (algo, network), g in data.groupby(["algo", "network"]):
        if not {"snip", "grasp"} <= set(g.prune):
            continue
        name = _last_layer(g)
        density = {p: float(g[(g.prune == p) & (g.layer == name)].density.mean()) for p in ("snip", "grasp")}
        more_than_network = all(density[p] > 1 - sparsity for p in density)
        rows.append(dict(
            claim=f"{algo} {network}: SNIP and GraSP keep more of the last layer ({name}) than {1 - sparsity:.0%}, "
                  "GraSP more than SNIP",
            measurement=f"last layer kept: SNIP {density['snip']:.1%}, GraSP {density['grasp']:.1%} "
                        f"(mean over {g.run_id.nunique()} runs)",
            agrees="yes" if more_than_network and density["grasp"] > density["snip"] else
                   ("partly (both above, but SNIP >= GraSP)" if more_than_network else "no")))
    return rows


def _last_layer(layers: pd.DataFrame) -> str:
    """The network's output layer: the last weight in module order as layers.parquet lists it."""
    run = layers[layers.run_id == layers.run_id.iloc[0]]
    return run.layer.iloc[-1]


def prune_batch_does_not_matter(results: pd.DataFrame, finals: pd.DataFrame, reps: int = stats.DEFAULT_REPS
                                ) -> list[dict]:
    """Paper: the pruning batch's size does not change the outcome (same criterion and sparsity)."""
    if "prune_batch" not in results.columns:
        return []
    batch = results.drop_duplicates("run_id").set_index("run_id").prune_batch
    data = finals.assign(prune_batch=finals.run_id.map(batch))
    rows = []
    for (algo, dataset, prune, sparsity), g in data[data.prune != "dense"].groupby(
            ["algo", "dataset", "prune", "target_sparsity"]):
        if g.prune_batch.nunique() < 2:
            continue
        cis = {}
        for size, s in g.groupby("prune_batch"):
            cis[int(size)] = (s.normalized_score.mean(), *stats.bootstrap_ci(s.normalized_score, reps=reps))
        overlap = max(lo for _, lo, _ in cis.values()) <= min(hi for _, _, hi in cis.values())
        rows.append(dict(
            claim=f"{algo} {prune} {sparsity:g} on {dataset}: the pruning batch size does not change the score",
            measurement="; ".join(f"batch {k}: {m:.1f} [{lo:.1f}, {hi:.1f}]" for k, (m, lo, hi) in sorted(cis.items())),
            agrees="yes (every CI overlaps every other)" if overlap else "no (some CIs are disjoint)"))
    return rows


def random_masks(finals: pd.DataFrame, reps: int = stats.DEFAULT_REPS) -> list[dict]:
    """Where random masks stand against SNIP / GraSP at 95 % (the paper's random baseline falls behind)."""
    rows = []
    at95 = finals[np.isclose(finals.target_sparsity, 0.95)]
    for (algo, dataset), g in at95.groupby(["algo", "dataset"]):
        means = g.groupby("prune").normalized_score.mean()
        if "random" not in means or not ({"snip", "grasp"} & set(means.index)):
            continue
        best = max((p for p in ("snip", "grasp") if p in means), key=lambda p: means[p])
        r = g[g.prune == "random"].normalized_score
        lo, hi = stats.bootstrap_ci(r, reps=reps)
        behind = means["random"] < means[best]
        rows.append(dict(
            claim=f"at 95% random masks fall behind SNIP/GraSP for {algo} on {dataset}",
            measurement=f"random {means['random']:.1f} [{lo:.1f}, {hi:.1f}] vs {best} {means[best]:.1f}",
            agrees="yes" if behind else "no"))
    return rows


def claim_table(results: pd.DataFrame, finals: pd.DataFrame, layers: pd.DataFrame | None,
                reps: int = stats.DEFAULT_REPS, labels: pd.Series | None = None) -> pd.DataFrame:
    """Every claim the results can speak to, as rows of claim | measurement | agrees. `finals`
    name the raw criterion (`prune`); `labels` (run_id -> offprune.report.criterion_labels) keep
    variants out: the claims read the plain criteria only ('snip', not 'snip+shuffle' or
    'snip+masks-from'), the pruning-batch claim the plain criteria and their batch variants."""
    if labels is not None:
        label = finals.run_id.map(labels)
        plain = finals[label == finals.prune]
        finals = finals[(label == finals.prune) | (label == finals.prune + label.str.extract(r"(\+pb\d+)$")[0])]
        if layers is not None and len(layers):
            layers = layers[layers.run_id.isin(set(plain.run_id))]
    else:
        plain = finals
    rows = performance_holds_at_95(plain, reps) + random_masks(plain, reps)
    if layers is not None and len(layers):
        rows += last_layer_kept(layers)
    rows += prune_batch_does_not_matter(results, finals, reps)
    return pd.DataFrame(rows, columns=["claim", "measurement", "agrees"])

