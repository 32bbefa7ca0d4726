"""The reviewer's-questions table, built from final scores with known values."""

import pandas as pd

from offprune.questions import QUESTIONS, answer, question_table


def finals_of(cases):
    return pd.DataFrame([dict(run_id=f"{algo}_{prune}_{sparsity}_{seed}", algo=algo, dataset="hopper-expert-v5",
                              prune=prune, target_sparsity=sparsity, seed=seed, step=10, normalized_score=score)
                         for (algo, prune, sparsity), scores in cases.items() for seed, score in enumerate(scores)])


def test_answers_follow_where_the_ratio_ci_lies():
    finals = finals_of({
        ("bc", "snip", 0.95): [50, 50, 50],
        ("bc", "snip+shuffle", 0.95): [25, 25, 25],  # ratio 0.5, CI exactly [0.5, 0.5]: SNIP's positions matter
        ("bc", "small-dense", 0.95): [75, 75, 75],  # ratio 1.5: the small dense network does better
        ("bc", "snip+reinit", 0.95): [40, 50, 60],  # ratio 1.0, CI across 1: not shown
        ("bc", "snip+r10", 0.98): [10, 10, 10],  # no SNIP at 0.98: no row
        ("bc", "snip+fstl0.2", 0.95): [50, 50, 50],
        ("bc", "grasp", 0.95): [1, 2, 3],  # asked by no question
    })
    t = question_table(finals, reps=500).set_index("question")
    assert len(t) == 4
    shuffle = t.loc["Does the criterion matter beyond the per-layer densities it picks?"]
    assert shuffle.case == "bc hopper-expert-v5 0.95"
    assert shuffle.measurement == "snip+shuffle 25.0 vs snip 50.0: 0.50 [95% CI 0.50-0.50], 3 / 3 seeds"
    assert shuffle.answer.startswith("yes: SNIP's positions")
    assert t.loc["Is a pruned big network better than a small dense one of the same size?"].answer.startswith(
        "no: the small dense network does better")
    assert t.loc["Do the kept weights' initial values matter?"].answer.startswith("not shown")
    assert t.loc["Does score transfer (FSTL) help?"].measurement.startswith("snip+fstl0.2 50.0 vs snip 50.0: 1.00")


def test_answer_reads_the_interval_against_one():
    q = QUESTIONS[0]
    assert answer(q, 0.2, 0.99) == q.if_baseline_better
    assert answer(q, 1.01, 3.0) == q.if_variant_better
    assert answer(q, 0.9, 1.1) == q.if_neither


def test_a_baseline_without_a_positive_mean_gives_no_row():
    finals = finals_of({("bc", "snip", 0.9): [0, 0, 0], ("bc", "synflow", 0.9): [5, 5, 5]})
    assert question_table(finals, reps=100).empty


def test_one_seed_on_a_side_answers_nothing():
    finals = finals_of({("bc", "snip", 0.95): [50, 50, 50], ("bc", "snip+shuffle", 0.95): [25]})
    row = question_table(finals, reps=100).iloc[0]
    assert row.measurement.endswith("1 / 3 seeds") and row.answer == "too few seeds to tell (one run)"
