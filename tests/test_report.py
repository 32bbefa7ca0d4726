"""Reports: statistics equal hand computations; the table's numbers from results with known values."""

import math

import numpy as np
import pandas as pd
import pytest

from offprune import stats
from offprune.report import final_scores, iqm_table, make_report
from offprune.results import LAYERS_FILE, RESULTS_FILE, write_parquet_atomic

from conftest import run_cli


def test_iqm_is_the_mean_of_the_middle_half():
    assert stats.iqm([8, 1, 7, 2, 6, 3, 5, 4]) == 4.5  # (3 + 4 + 5 + 6) / 4
    assert stats.iqm([1, 2, 3, 100]) == 2.5  # int(0.25 * 4) = 1 value cut at each end
    assert stats.iqm([1, 2, 3]) == 2.0  # int(0.75) = 0: nothing cut


def test_bootstrap_ci_brackets_the_statistic_and_collapses_on_constants():
    assert stats.bootstrap_ci([5.0, 5.0, 5.0]) == (5.0, 5.0)
    lo, hi = stats.bootstrap_ci([0.0, 10.0], reps=4000)
    assert lo == 0.0 and hi == 10.0  # resamples of 2 values: means 0, 5, 10; 25% are 0 and 25% are 10
    lo, hi = stats.bootstrap_ci(np.arange(100.0), reps=2000)
    assert lo < 49.5 < hi and hi - lo == pytest.approx(2 * 1.96 * np.arange(100.0).std() / 10, rel=0.15)


def test_a_bootstrap_interval_does_not_depend_on_the_order_of_the_values():
    values, base = [3.0, 9.0, 4.0, 12.0], [10.0, 7.0, 8.0]
    ratio = lambda g: g[0].mean() / g[1].mean()  # noqa: E731
    first = stats.stratified_bootstrap_ci([values, base], ratio, reps=500)
    assert stats.stratified_bootstrap_ci([values[::-1], base[::-1]], ratio, reps=500) == first
    assert stats.bootstrap_ci([2.0, 7.0, 1.0, 5.0], reps=500) == stats.bootstrap_ci([7.0, 5.0, 2.0, 1.0], reps=500)


def test_stratified_bootstrap_keeps_each_group_apart():
    # a ratio of means: numerator and denominator resampled on their own, never mixed
    lo, hi = stats.stratified_bootstrap_ci([[2.0, 2.0], [4.0, 4.0]], lambda g: g[0].mean() / g[1].mean())
    assert (lo, hi) == (0.5, 0.5)


def run_rows(run_id, algo, dataset, prune, sparsity, seed, scores, steps=(500, 1000)):
    return [dict(run_id=run_id, algo=algo, dataset=dataset, prune=prune, scope="global", target_sparsity=sparsity,
                 seed=seed, step=step, normalized_score=score) for step, score in zip(steps, scores)]


FINAL = {  # (criterion, sparsity) -> final scores of seeds 0, 1, 2
    ("dense", 0.0): [100.0, 100.0, 100.0],
    ("snip", 0.5): [95.0, 96.0, 94.0],
    ("snip", 0.9): [99.0, 80.0, 94.0],  # mean 91: keeps 90%, but its CI dips below
    ("snip", 0.95): [50.0, 50.0, 50.0],
    ("grasp", 0.5): [80.0, 80.0, 80.0],
}


@pytest.fixture
def results_dir(tmp_path):
    root = tmp_path / "sweep"
    for (prune, sparsity), scores in FINAL.items():
        for seed, score in enumerate(scores):
            run_id = f"bc_d_{prune}_s{sparsity:g}_seed{seed}"
            (root / run_id).mkdir(parents=True)
            write_parquet_atomic(pd.DataFrame(run_rows(run_id, "bc", "d", prune, sparsity, seed, [score, score])),
                                 root / run_id / RESULTS_FILE)
            layers = pd.DataFrame([dict(run_id=run_id, algo="bc", dataset="d", prune=prune, target_sparsity=sparsity,
                                        seed=seed, network="vae", layer=f"l{i}.weight", total=100, kept=kept,
                                        density=kept / 100) for i, kept in enumerate([20, 5])])
            write_parquet_atomic(layers, root / run_id / LAYERS_FILE)
    # an unfinished run: stopped at step 500, must not count
    (root / "unfinished").mkdir()
    write_parquet_atomic(pd.DataFrame(run_rows("unfinished", "bc", "d", "snip", 0.95, 3, [99.0], steps=(500,))),
                         root / "unfinished" / RESULTS_FILE)
    return root


def test_report_table_has_the_known_numbers(results_dir, tmp_path):
    rep = make_report(results_dir, tmp_path / "rep", reps=1000)
    t = rep.retention.set_index("criterion")
    snip = t.loc["snip"]
    assert snip.seeds == 3 and snip.dense_score == 100.0
    assert snip.highest_sparsity == 0.9 and snip.ratio == pytest.approx(0.91)
    assert snip.ratio_ci_lo < 0.9 < snip.ratio_ci_hi and snip.ratio_ci_lo >= 0.80 and snip.ratio_ci_hi <= 0.99
    assert snip.highest_sparsity_ci == 0.5  # 0.5's CI is within [0.94, 0.96]
    grasp = t.loc["grasp"]
    assert math.isnan(grasp.highest_sparsity) and "below 90%" in grasp.note

    scores = rep.scores.set_index(["prune", "sparsity"])
    assert scores.loc[("snip", 0.5), "mean"] == 95.0
    assert 94.0 <= scores.loc[("snip", 0.5), "ci_lo"] <= 95.0 <= scores.loc[("snip", 0.5), "ci_hi"] <= 96.0
    assert scores.loc[("snip", 0.95), "seeds"] == 3  # the unfinished seed 3 is left out
    assert any("1 unfinished run" in n for n in rep.notes)

    out = tmp_path / "rep"
    for name in ("fig1_curves_snip.png", "fig1_curves_grasp.png", "fig2_score_vs_sparsity.png", "fig3_layers.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "fig5_storage.png").exists() and any("figure 5 left out" in n for n in rep.notes)
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4 and "http" not in page.split("<body>")[1]
    assert "<td>0.91 (" in page
    md = (out / "summary.md").read_text()
    assert "| bc | d | snip | 3 | 100.00 | 0.9 | 0.91 (" in md and "| 0.5 |" in md
    assert "approximate on gymnasium v5" in md


def test_layer_figure_uses_the_chosen_sparsity(results_dir, tmp_path):
    rep = make_report(results_dir, tmp_path / "rep", layer_sparsity=0.7, reps=200)
    assert not (tmp_path / "rep" / "fig3_layers.png").exists()
    assert any("no per-layer counts at sparsity 0.7" in n for n in rep.notes)


def test_iqm_over_datasets():
    rows = [dict(algo="bc", dataset=d, prune="snip", target_sparsity=0.5, seed=s, normalized_score=v)
            for d, values in (("a", [1, 2, 3, 4]), ("b", [5, 6, 7, 8])) for s, v in enumerate(values)]
    t = iqm_table(pd.DataFrame(rows), reps=500)
    assert len(t) == 1 and t.iqm[0] == 4.5 and t.datasets[0] == 2 and t.runs[0] == 8
    assert t.ci_lo[0] < 4.5 < t.ci_hi[0]
    assert iqm_table(pd.DataFrame(rows[:4]), reps=100).empty  # one dataset: nothing to aggregate


def test_final_scores_drop_runs_that_stopped_early():
    df = pd.DataFrame(run_rows("a", "bc", "d", "dense", 0.0, 0, [1.0, 2.0, 6.0], steps=(500, 1000, 1500)) +
                      run_rows("b", "bc", "d", "snip", 0.5, 0, [3.0], steps=(500,)))
    finals, notes = final_scores(df)
    # the final score is the mean of the last two evaluations: (2 + 6) / 2
    assert finals.run_id.tolist() == ["a"] and finals.normalized_score.tolist() == [4.0] and "b" in notes[0]


def test_report_cli_prints_the_table_and_rejects_empty_paths(capsys, results_dir, tmp_path):
    code, out, err = run_cli(capsys, "report", str(results_dir), "--out", tmp_path / "r", "--bootstrap", "200")
    assert code == 0, err
    assert "| bc | d | snip | 3 | 100.00 | 0.9 |" in out and "report.html" in out
    code, out, err = run_cli(capsys, "report", str(results_dir / "*" / "results.parquet"), "--out", tmp_path / "g",
                             "--bootstrap", "200")
    assert code == 0 and (tmp_path / "g" / "fig3_layers.png").exists()  # a glob finds the layer files too
    code, _, err = run_cli(capsys, "report", str(tmp_path / "nothing"), "--out", tmp_path / "r2")
    assert code == 2 and err.strip() == f"offprune: error: no results (results.parquet) found at {tmp_path / 'nothing'}"
    code, _, err = run_cli(capsys, "report", str(results_dir), "--threshold", "1.5")
    assert code == 2 and "--threshold must be in (0, 1]" in err and err.count("\n") == 1


def test_sweep_then_storage_then_report_end_to_end(capsys, tmp_path, hopper_file):
    out = tmp_path / "sw"
    code, _, err = run_cli(capsys, "sweep", "--algo", "bc-mlp", "--prune", "snip", "--sparsity", "0.5,0.9",
                           "--dataset", hopper_file, "--seeds", "0", "--steps", "4", "--eval-every", "2",
                           "--eval-episodes", "1", "--kernels", "dense", "--jobs", "1", "--out", out, "--no-progress")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "storage", out)
    assert code == 0, err
    assert "wrote storage.parquet in 3 run folders" in stdout
    storage = pd.read_parquet(out / "bc-mlp_hopper-random-v5_snip_s0.9_seed0" / "storage.parquet")
    prunable = 11 * 256 + 256 * 256 + 256 * 3
    assert set(storage.nonzero_weights[storage.network == "policy"]) == {round(prunable * 0.1)}
    rep = make_report(out, tmp_path / "rep", reps=200)
    assert (tmp_path / "rep" / "fig5_storage.png").exists()
    assert not any("figure 5" in n for n in rep.notes)
    assert sorted(rep.scores.sparsity) == [0.0, 0.5, 0.9] and set(rep.scores.seeds) == {1}


def test_highest_sparsity_needs_every_lower_sparsity_to_hold(tmp_path):
    from offprune.report import retention_table

    rows = []
    for (prune, sparsity), scores in {("dense", 0.0): [100, 100, 100], ("random", 0.5): [57, 57, 57],
                                      ("random", 0.9): [95, 95, 95], ("snip", 0.5): [99, 99, 99],
                                      ("snip", 0.8): [70, 70, 70], ("snip", 0.9): [92, 92, 92]}.items():
        rows += [dict(algo="bc", dataset="d", prune=prune, target_sparsity=sparsity, seed=i, normalized_score=v,
                      run_id=f"{prune}{sparsity}{i}") for i, v in enumerate(scores)]
    t = retention_table(pd.DataFrame(rows), reps=200).set_index("criterion")
    assert math.isnan(t.loc["random"].highest_sparsity)  # 57% at 0.5: holding at 0.9 does not count
    assert "below 90% of dense at the lowest sparsity" in t.loc["random"].note
    assert "non-monotone: holds again at 0.9" in t.loc["random"].note
    assert t.loc["snip"].highest_sparsity == 0.5 and t.loc["snip"].note == "non-monotone: holds again at 0.9"


def test_score_matrix_bolds_where_the_ci_clears_the_threshold(results_dir, tmp_path):
    from offprune.report import score_matrix

    rep = make_report(results_dir, tmp_path / "rep", reps=1000)
    m = score_matrix(rep.scores, 0.9, "md").set_index("criterion")
    assert m.loc["snip", "0.5"].startswith("**95.0 [") and m.loc["snip", "0.5"].endswith("]**")
    assert m.loc["snip", "0.9"].startswith("91.0 [")  # mean above 90 but its CI dips below: not bold
    assert m.loc["dense", "dense"] == "100.0 [100.0, 100.0]" and m.loc["grasp", "0.9"] == ""
    one_seed = rep.scores[(rep.scores.prune == "snip") & (rep.scores.sparsity == 0.5)].assign(seeds=1)
    single = score_matrix(pd.concat([rep.scores[rep.scores.prune == "dense"], one_seed]), 0.9, "md")
    assert single.set_index("criterion").loc["snip", "0.5"] == "95.0 (1 seed)"  # no CI, never bold
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "<b>95.0 [" in page and "**" not in page
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "| bc | d | snip |  | **95.0 [" in md or "| bc | d | snip | " in md


def test_report_of_dense_runs_only_says_so(tmp_path):
    root = tmp_path / "sweep"
    for seed in range(2):
        run_id = f"bc_d_dense_seed{seed}"
        (root / run_id).mkdir(parents=True)
        write_parquet_atomic(pd.DataFrame(run_rows(run_id, "bc", "d", "dense", 0.0, seed, [50.0, 60.0 + seed])),
                             root / run_id / RESULTS_FILE)
    rep = make_report(root, tmp_path / "rep", reps=200)
    assert any("only dense runs: there is nothing pruned to compare" in n for n in rep.notes)
    assert any("only 2 seed(s)" in n and "not meaningful" in n for n in rep.notes)
    assert rep.scores["mean"].tolist() == [pytest.approx(55.25)]  # seeds: (50 + 60) / 2 and (50 + 61) / 2
    assert "only dense runs" in (tmp_path / "rep" / "report.html").read_text()


def test_a_study_report_lists_the_runs_it_is_missing(results_dir, tmp_path):
    import json

    from offprune.config import RunConfig

    grid = [RunConfig(algo="bc", dataset="d", prune="snip", sparsity=0.5, seed=s, run_id=f"bc_d_snip_s0.5_seed{s}")
            for s in range(3)]
    grid.append(RunConfig(algo="bc", dataset="d", prune="snip", sparsity=0.99, seed=0, run_id="bc_d_snip_s0.99_seed0"))
    (results_dir / "runs.json").write_text(json.dumps([g.to_dict() for g in grid]))
    rep = make_report(results_dir, tmp_path / "rep", reps=200)
    assert any(n.startswith("partial study: 3 of 4 runs done; 1 missing or in progress: bc_d_snip_s0.99_seed0")
               for n in rep.notes)


def test_a_failing_report_leaves_nothing_behind(results_dir, tmp_path, monkeypatch):
    from offprune import report

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_layers", broken)
    out = tmp_path / "rep"
    with pytest.raises(report.UserError, match="cannot write the report to .*: No space left on device"):
        make_report(results_dir, out, reps=200)
    assert list(out.iterdir()) == []


def test_criterion_labels_keep_variants_apart():
    from offprune.report import criterion_labels

    base = dict(algo="bc", dataset="d", seed=0, step=1, scope="global", prune_rounds=1, prune_batch=100,
                mask_transform="none", reinit=False, masks_from="", score_transfer="", weight_transfer="", omega=0.0)
    rows = [dict(base, run_id="a", prune="snip"), dict(base, run_id="b", prune="snip", prune_rounds=10),
            dict(base, run_id="c", prune="random", scope="erk"), dict(base, run_id="d", prune="snip", reinit=True),
            dict(base, run_id="e", prune="snip", mask_transform="shuffle"), dict(base, run_id="f", prune="grasp",
                                                                                prune_batch=200),
            dict(base, run_id="g", prune="snip", prune_batch=10), dict(base, run_id="h", prune="synflow", prune_rounds=100),
            dict(base, run_id="i", prune="snip", score_transfer="src", omega=0.2),
            dict(base, run_id="j", prune="dense", prune_rounds=0, prune_batch=0),
            dict(base, run_id="k", prune="small-dense", prune_rounds=0, prune_batch=0),
            dict(base, run_id="l", prune="edge-popup", scope="layer", prune_rounds=0, prune_batch=0)]
    labels = criterion_labels(pd.DataFrame(rows)).to_dict()
    assert labels == {"a": "snip", "b": "snip+r10", "c": "random+erk", "d": "snip+reinit", "e": "snip+shuffle",
                      "f": "grasp", "g": "snip+pb10", "h": "synflow", "i": "snip+fstl0.2", "j": "dense",
                      "k": "small-dense", "l": "edge-popup+layer"}


def test_report_answers_the_reviewer_questions_its_runs_can(tmp_path):
    root = tmp_path / "sweep"
    for prune, scores in (("dense", [100.0] * 3), ("snip", [60.0] * 3), ("small-dense", [30.0] * 3)):
        sparsity = 0.0 if prune == "dense" else 0.95
        for seed, score in enumerate(scores):
            run_id = f"bc_d_{prune}_seed{seed}"
            (root / run_id).mkdir(parents=True)
            write_parquet_atomic(pd.DataFrame(run_rows(run_id, "bc", "d", prune, sparsity, seed, [score, score])),
                                 root / run_id / RESULTS_FILE)
    make_report(root, tmp_path / "rep", reps=200)
    md = (tmp_path / "rep" / "summary.md").read_text()
    row = ("| Is a pruned big network better than a small dense one of the same size? | bc d 0.95 | small-dense 30.0 "
           "vs snip 60.0: 0.50 [95% CI 0.50-0.50], 3 / 3 seeds | yes: SNIP-pruned beats the small dense network |")
    assert "## The reviewer's questions" in md and row in md
    assert "yes: SNIP-pruned beats the small dense network" in (tmp_path / "rep" / "report.html").read_text()
    assert len(pd.read_csv(tmp_path / "rep" / "questions.csv")) == 1


def test_masks_that_change_get_the_realised_sparsity_figure_not_the_layer_figure(tmp_path):
    root = tmp_path / "sweep"
    for prune, sparsity, score in (("dense", 0.0, 100.0), ("snip", 0.9, 80.0), ("gmp", 0.9, 90.0)):
        for seed in range(2):
            run_id = f"bc_d_{prune}_seed{seed}"
            (root / run_id).mkdir(parents=True)
            rows = pd.DataFrame(run_rows(run_id, "bc", "d", prune, sparsity, seed, [score, score]))
            rows["realised_sparsity"] = [0.4, 0.9] if prune == "gmp" else [sparsity, sparsity]
            rows["mask_changes"] = [3, 7] if prune == "gmp" else [0, 0]
            write_parquet_atomic(rows, root / run_id / RESULTS_FILE)
            kept = 100 if prune == "gmp" else 10  # gmp's layers.parquet holds its initial (dense) masks
            write_parquet_atomic(pd.DataFrame([dict(run_id=run_id, algo="bc", dataset="d", prune=prune,
                                                    target_sparsity=sparsity, seed=seed, network="vae",
                                                    layer="l0.weight", total=100, kept=kept, density=kept / 100)]),
                                 root / run_id / LAYERS_FILE)
    rep = make_report(root, tmp_path / "rep", reps=100, layer_sparsity=0.9)
    assert (tmp_path / "rep" / "fig4_realised_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "rep" / "summary.md").read_text()
    assert "mask changes per run (mean): gmp 7" in md
    assert any(n.startswith("figure 3 shows fixed masks only") for n in rep.notes)
    assert rep.scores.set_index("prune").loc["gmp", "mean"] == 90.0


def test_the_report_opens_with_its_budget_beside_the_papers(results_dir, tmp_path):
    make_report(results_dir, tmp_path / "rep", reps=100)
    first = (tmp_path / "rep" / "summary.md").read_text().splitlines()[2]
    assert first == ("- budget: 1,000 updates per run, 3 seed(s), the datasets below; the pruning paper's: 1M updates "
                     "on D4RL v2 data (1M transitions per dataset), 5 seeds. Scores that fall short here may not at its "
                     "budget")
    assert "the pruning paper&#x27;s: 1M updates" in (tmp_path / "rep" / "report.html").read_text().split("<li>")[1]
