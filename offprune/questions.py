"""The reviewer's questions about pruning at initialisation, answered from results.

Blalock et al. 2020 and Frankle et al. 2021 ask of any pruning result: does the criterion matter
beyond the per-layer densities it picks (a shuffled mask)? Do the kept weights' values matter (a
re-drawn initialisation)? Is the pruned big network better than a small dense one of the same
size? Each question is a comparison of one variant with a baseline at the same algorithm, dataset
and sparsity: the ratio of their mean final scores with a bootstrap CI (variant and baseline seeds
resampled independently), and an answer read from where that CI lies: above 1, below 1, or
across it (no difference shown at this number of seeds). A question whose runs are not in the
results gives no rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from offprune import stats


@dataclass(frozen=True)
class Question:
    text: str
    variant: str  # the variant's criterion label (offprune.report.criterion_labels), a regular expression
    baseline: str  # the baseline's criterion label
    if_baseline_better: str  # the answer when the ratio's CI lies below 1
    if_variant_better: str  # ... above 1
    if_neither: str  # ... across 1


QUESTIONS = (
    Question("Does the criterion matter beyond the per-layer densities it picks?", r"snip\+shuffle", "snip",
             "yes: SNIP's positions beat its per-layer counts at random positions",
             "no: random positions with SNIP's per-layer counts do better",
             "not shown: SNIP's per-layer counts at random positions do as well"),
    Question("Do the kept weights' initial values matter?", r"snip\+reinit", "snip",
             "yes: re-drawing the kept weights hurts", "re-drawing the kept weights helps",
             "not shown: re-drawn kept weights do as well"),
    Question("Is a pruned big network better than a small dense one of the same size?", r"small-dense", "snip",
             "yes: SNIP-pruned beats the small dense network", "no: the small dense network does better",
             "not shown: the small dense network does as well"),
    Question("Does data-free SynFlow do as well as SNIP?", r"synflow", "snip",
             "no: SynFlow falls behind SNIP", "yes, better: SynFlow beats SNIP", "yes: no difference shown"),
    Question("Does iterative SNIP help?", r"snip\+r\d+", "snip",
             "no: iterative SNIP falls behind one-shot SNIP", "yes: iterative SNIP beats one-shot SNIP",
             "not shown: no difference from one-shot SNIP"),
    Question("Does SNIP beat random masks with ERK layer densities?", r"random\+erk", "snip",
             "yes: SNIP beats random-ERK", "no: random-ERK beats SNIP", "not shown: random-ERK does as well"),
    Question("Does SNIP beat magnitude pruning with ERK layer densities?", r"magnitude\+erk", "snip",
             "yes: SNIP beats magnitude-ERK", "no: magnitude-ERK beats SNIP", "not shown: magnitude-ERK does as well"),
    Question("Do masks found on another dataset serve?", r"snip\+masks-from", "snip",
             "no: transferred masks fall behind the dataset's own SNIP masks",
             "yes, better: transferred masks beat the dataset's own", "yes: no difference shown from its own masks"),
    Question("Does score transfer (FSTL) help?", r"snip\+fstl[\d.]+", "snip",
             "no: FSTL falls behind the dataset's own SNIP", "yes: FSTL beats the dataset's own SNIP",
             "not shown: no difference from the dataset's own SNIP"),
)

KEYS = ["algo", "dataset", "target_sparsity"]


def answer(question: Question, lo: float, hi: float) -> str:
    """The question's answer for a ratio (variant / baseline) whose CI is [lo, hi]."""
    if hi < 1:
        return question.if_baseline_better
    if lo > 1:
        return question.if_variant_better
    return question.if_neither


def question_table(finals: pd.DataFrame, reps: int = stats.DEFAULT_REPS) -> pd.DataFrame:
    """One row per question and case that `finals` (final scores with criterion labels in `prune`)
    holds both sides of: question | case | measurement | answer."""
    rows = []
    for q in QUESTIONS:
        variants = sorted(p for p in finals.prune.unique() if re.fullmatch(q.variant, p))
        for variant in variants:
            both = finals[finals.prune.isin([variant, q.baseline])]
            for (algo, dataset, sparsity), g in both.groupby(KEYS):
                v = g[g.prune == variant].normalized_score.to_numpy()
                b = g[g.prune == q.baseline].normalized_score.to_numpy()
                if not len(v) or not len(b) or b.mean() <= 0:
                    continue
                lo, hi = stats.stratified_bootstrap_ci([v, b], stats.ratio_of_means, reps)
                ratio = stats.ratio_of_means([v, b])
                rows.append(dict(
                    question=q.text, case=f"{algo} {dataset} {sparsity:g}",
                    measurement=f"{variant} {v.mean():.1f} vs {q.baseline} {b.mean():.1f}: {ratio:.2f} "
                                f"[95% CI {lo:.2f}-{hi:.2f}], {len(v)} / {len(b)} seeds",
                    # one seed on a side: the bootstrap CI collapses to the point estimate and says nothing
                    answer=answer(q, lo, hi) if min(len(v), len(b)) > 1 else "too few seeds to tell (one run)"))
    return pd.DataFrame(rows, columns=["question", "case", "measurement", "answer"])
