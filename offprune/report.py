"""Reports: the paper's figures and a sparsity table from results, as PNGs + one HTML page + markdown.

A run's *final score* is its normalised score at its last evaluation. Runs that stopped before the
last step reached by their (algo, dataset) group are unfinished and left out (the report says how
many). Confidence intervals are 95 % percentile bootstraps over seeds (offprune.stats); where
several datasets are aggregated, the IQM over all their runs with a stratified bootstrap.

Figures (numbered as in the issue that asked for them):
  1. normalised score over training steps, one line per sparsity, a panel per (algo, dataset);
     one figure per criterion (the paper's Figures 1 and 2)
  2. final normalised score vs sparsity per criterion, dense as a reference band (+ IQM panels)
  3. fraction of weights kept per layer at one sparsity, per criterion (the paper's Figure 3)
  4. table: highest sparsity keeping >= 90 % of the dense score, per (algo, dataset, criterion)
  5. bytes per network vs sparsity, per storage format (when storage.parquet files exist)
"""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from offprune import atomic
from offprune import stats
from offprune.errors import UserError
from offprune.results import LAYERS_FILE, STORAGE_FILE, load

RUN_KEYS = ["algo", "dataset", "prune", "target_sparsity", "seed", "run_id"]
D4RL_NOTE = "normalised with D4RL reference returns, which are approximate on gymnasium v5 environments"


@dataclass
class Report:
    out: Path
    files: list[Path] = field(default_factory=list)
    retention: pd.DataFrame | None = None  # item 4
    scores: pd.DataFrame | None = None  # final score per (algo, dataset, criterion, sparsity)
    claims: pd.DataFrame | None = None  # the paper's claims checked
    questions: pd.DataFrame | None = None  # the reviewer's questions answered
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- numbers


QUESTIONS_NOTE = ("Each row: a variant against its baseline at the same algorithm, dataset and sparsity, the ratio "
                  "of their mean final scores with a 95% bootstrap CI; the answer reads the CI: below 1, above 1, or "
                  "across 1 (no difference shown at this number of seeds).")
PAPER_BUDGET = "1M updates on D4RL v2 data (1M transitions per dataset), 5 seeds"
FINAL_EVALUATIONS = 2  # a run's final score: the mean of its last this-many evaluations


def criterion_labels(results: pd.DataFrame) -> pd.Series:
    """Per run_id, the criterion as the report names it: the `prune` column plus every option
    that makes it another variant ('snip+r10', 'random+erk', 'snip+shuffle', 'snip+reinit',
    'snip+pb10', 'snip+masks-from', 'snip+fstl0.2', 'magnitude+ftl0.2'), so variants are never pooled."""
    from offprune.prune import DEFAULT_PRUNE_BATCH, UNMASKED, default_prune_rounds
    from offprune.results import COLUMN_DEFAULTS

    runs = results.drop_duplicates("run_id").set_index("run_id")

    def column(name: str, default):
        return runs[name].where(runs[name].notna(), default) if name in runs else pd.Series(default, index=runs.index)

    labels = runs.prune.astype(str).copy()
    pruned = ~runs.prune.isin(UNMASKED)
    rounds = column("prune_rounds", 1)
    batch = column("prune_batch", 0)
    for run_id, prune in runs.prune.items():
        if not pruned[run_id]:
            continue
        if int(rounds[run_id]) not in (0, default_prune_rounds(prune)):  # 0: a method without rounds
            labels[run_id] += f"+r{int(rounds[run_id])}"
        if int(batch[run_id]) not in (0, DEFAULT_PRUNE_BATCH.get(prune, 100)):
            labels[run_id] += f"+pb{int(batch[run_id])}"
    for name, suffix in (("scope", lambda v: "" if v == "global" else f"+{v}"),
                         ("mask_transform", lambda v: "" if v == "none" else f"+{v}"),
                         ("reinit", lambda v: "+reinit" if bool(v) else ""),
                         ("masks_from", lambda v: "+masks-from" if v else ""),
                         ("score_transfer", lambda v: "+fstl" if v else ""),
                         ("weight_transfer", lambda v: "+ftl" if v else "")):
        values = column(name, COLUMN_DEFAULTS.get(name, "global" if name == "scope" else ""))
        labels += values.map(suffix).where(pruned, "")
    omega = column("omega", 0.0)
    for run_id in labels.index[labels.str.endswith(("+fstl", "+ftl"))]:
        labels[run_id] += f"{float(omega[run_id]):g}"
    return labels


def final_scores(results: pd.DataFrame, last: int = FINAL_EVALUATIONS) -> tuple[pd.DataFrame, list[str]]:
    """One row per finished run: its identity, last step and final score (`normalized_score`: the
    mean normalised score of its last `last` evaluations, each itself a mean over episodes)."""
    ordered = results.sort_values("step")
    tail = ordered.groupby("run_id", as_index=False).tail(last)
    mean_tail = tail.groupby("run_id").normalized_score.mean()
    last_rows = ordered.groupby("run_id", as_index=False).tail(1)
    last_rows = last_rows[RUN_KEYS + ["step"]].reset_index(drop=True)
    last_rows["normalized_score"] = last_rows.run_id.map(mean_tail)
    group_end = last_rows.groupby(["algo", "dataset"])["step"].transform("max")
    unfinished = last_rows[last_rows.step < group_end]
    notes = [f"{len(unfinished)} unfinished run(s) left out (in progress or stopped): "
             f"{', '.join(sorted(unfinished.run_id))}"] if len(unfinished) else []
    return last_rows[last_rows.step == group_end].reset_index(drop=True), notes


def score_table(finals: pd.DataFrame, reps: int = stats.DEFAULT_REPS) -> pd.DataFrame:
    """Mean final score and its bootstrap CI per (algo, dataset, criterion, sparsity)."""
    rows = []
    for (algo, dataset, prune, sparsity), g in finals.groupby(["algo", "dataset", "prune", "target_sparsity"]):
        lo, hi = stats.bootstrap_ci(g.normalized_score, reps=reps)
        rows.append(dict(algo=algo, dataset=dataset, prune=prune, sparsity=sparsity, seeds=len(g),
                         mean=g.normalized_score.mean(), ci_lo=lo, ci_hi=hi))
    return pd.DataFrame(rows)


def iqm_table(finals: pd.DataFrame, reps: int = stats.DEFAULT_REPS) -> pd.DataFrame:
    """IQM over all datasets' runs per (algo, criterion, sparsity), with a stratified bootstrap
    CI (runs resampled within each dataset); only for algos with more than one dataset."""
    rows = []
    for (algo, prune, sparsity), g in finals.groupby(["algo", "prune", "target_sparsity"]):
        if g.dataset.nunique() < 2:
            continue
        groups = [d.normalized_score.to_numpy() for _, d in g.groupby("dataset")]
        lo, hi = stats.stratified_bootstrap_ci(groups, lambda gs: stats.iqm(np.concatenate(gs)), reps)
        rows.append(dict(algo=algo, prune=prune, sparsity=sparsity, datasets=len(groups), runs=len(g),
                         iqm=stats.iqm(g.normalized_score), ci_lo=lo, ci_hi=hi))
    return pd.DataFrame(rows)


def retention_table(finals: pd.DataFrame, threshold: float = 0.9, reps: int = stats.DEFAULT_REPS) -> pd.DataFrame:
    """Per (algo, dataset, criterion): the highest sparsity up to which EVERY sparsity keeps a mean
    final score of at least `threshold` x the dense mean, the ratio there with its bootstrap CI
    (pruned and dense seeds resampled independently), and the same rule on the CI's lower bound.
    A sparsity that holds again above the first that does not is named in `note` (non-monotone)."""
    rows = []
    for (algo, dataset), group in finals.groupby(["algo", "dataset"]):
        dense = group[group.prune == "dense"].normalized_score.to_numpy()
        for prune, g in group[group.prune != "dense"].groupby("prune"):
            row = dict(algo=algo, dataset=dataset, criterion=prune, seeds=g.seed.nunique(),
                       dense_score=float(dense.mean()) if len(dense) else math.nan,
                       highest_sparsity=math.nan, ratio=math.nan, ratio_ci_lo=math.nan, ratio_ci_hi=math.nan,
                       highest_sparsity_ci=math.nan, note="")
            if len(dense) == 0:
                row["note"] = "no dense baseline"
            elif dense.mean() <= 0:
                row["note"] = "dense score <= 0: ratio undefined"
            else:
                holding, holding_ci, again = True, True, []
                for sparsity, s in sorted(g.groupby("target_sparsity"), key=lambda kv: kv[0]):
                    scores = s.normalized_score.to_numpy()
                    ratio = stats.ratio_of_means([scores, dense])
                    lo, hi = stats.stratified_bootstrap_ci([scores, dense], stats.ratio_of_means, reps)
                    if ratio >= threshold and holding:
                        row.update(highest_sparsity=sparsity, ratio=ratio, ratio_ci_lo=lo, ratio_ci_hi=hi)
                    elif ratio >= threshold:
                        again.append(f"{sparsity:g}")
                    else:
                        holding = False
                    holding_ci = holding_ci and lo >= threshold
                    if holding_ci:
                        row["highest_sparsity_ci"] = sparsity
                notes = []
                if math.isnan(row["highest_sparsity"]):
                    notes.append(f"below {threshold:.0%} of dense at the lowest sparsity")
                if again:
                    notes.append(f"non-monotone: holds again at {', '.join(again)}")
                row["note"] = "; ".join(notes)
            rows.append(row)
    columns = ["algo", "dataset", "criterion", "seeds", "dense_score", "highest_sparsity", "ratio", "ratio_ci_lo",
               "ratio_ci_hi", "highest_sparsity_ci", "note"]
    return pd.DataFrame(rows, columns=columns)


def score_matrix(scores: pd.DataFrame, threshold: float = 0.9, markup: str = "md") -> pd.DataFrame:
    """Mean final score [95% CI] per (algo, dataset, criterion) x sparsity, as strings; bold where
    the CI's lower bound is at least `threshold` x the dense mean. A cell of one seed has no CI
    (a study in progress): its mean and '(1 seed)', never bold. `markup`: 'md' or 'html'."""
    bold = ("**", "**") if markup == "md" else ("<b>", "</b>")
    rows = []
    for (algo, dataset), group in scores.groupby(["algo", "dataset"]):
        dense = group[group.prune == "dense"]
        dense_mean = float(dense["mean"].iloc[0]) if len(dense) else math.nan
        for prune, g in group.groupby("prune"):
            row = {"algo": algo, "dataset": dataset, "criterion": prune}
            for r in g.itertuples():
                cell = f"{r.mean:.1f} [{r.ci_lo:.1f}, {r.ci_hi:.1f}]" if r.seeds > 1 else f"{r.mean:.1f} (1 seed)"
                if (prune != "dense" and r.seeds > 1 and not math.isnan(dense_mean)
                        and r.ci_lo >= threshold * dense_mean):
                    cell = f"{bold[0]}{cell}{bold[1]}"
                row["dense" if prune == "dense" else f"{r.sparsity:g}"] = cell
            rows.append(row)
    table = pd.DataFrame(rows)
    levels = sorted((c for c in table.columns if c not in ("algo", "dataset", "criterion", "dense")), key=float)
    columns = ["algo", "dataset", "criterion"] + (["dense"] if "dense" in table.columns else []) + levels
    return table.reindex(columns=columns).fillna("")


# ---------------------------------------------------------------------------------- figures


def _caption(finals: pd.DataFrame) -> str:
    seeds = finals.groupby(["algo", "dataset", "prune", "target_sparsity"]).seed.nunique()
    steps = sorted(finals.step.unique())
    seed_text = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    return (f"{seed_text} seed(s) per point; {', '.join(f'{s:,}' for s in steps)} updates; "
            f"95% bootstrap CIs; {D4RL_NOTE}")


def _sparsity_label(prune: str, sparsity: float) -> str:
    return "dense" if prune == "dense" else f"{sparsity:g}"


def _save(fig, path: Path, caption: str) -> Path:
    fig.text(0.0, -0.02, caption, fontsize=8, ha="left", va="top", wrap=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_training_curves(results: pd.DataFrame, finals: pd.DataFrame, prune: str, path: Path, reps: int) -> Path:
    import seaborn as sns

    keep = finals.run_id[(finals.prune == prune) | (finals.prune == "dense")]
    data = results[results.run_id.isin(keep)].copy()
    data["panel"] = data.algo + " · " + data.dataset
    data["sparsity"] = [_sparsity_label(p, s) for p, s in zip(data.prune, data.target_sparsity)]
    levels = sorted(data.loc[data.prune != "dense", "target_sparsity"].unique())
    order = (["dense"] if (data.prune == "dense").any() else []) + [f"{s:g}" for s in levels]
    colors = dict(zip([f"{s:g}" for s in levels], sns.color_palette("viridis_r", len(levels))))
    colors["dense"] = (0, 0, 0)
    panels = sorted(data.panel.unique())
    grid = sns.relplot(data=data, x="step", y="normalized_score", hue="sparsity", hue_order=order, palette=colors,
                       col="panel", col_order=panels, col_wrap=min(3, len(panels)), kind="line",
                       errorbar=("ci", 95), n_boot=reps, seed=0, height=3.2, aspect=1.3,
                       facet_kws={"sharey": False})
    grid.set_titles("{col_name}")
    grid.set_axis_labels("gradient updates", "normalised score")
    grid.figure.suptitle(f"{prune}: normalised score during training, per sparsity", y=1.03)
    return _save(grid.figure, path, _caption(finals[finals.run_id.isin(keep)]))


DENSITY_TICKS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)


def plot_score_vs_sparsity(scores: pd.DataFrame, finals: pd.DataFrame, path: Path, threshold: float = 0.9) -> Path:
    """Final score against the fraction of weights kept (log axis, sparser to the right): a line and
    CI band per criterion, dense as a band, a dashed line at `threshold` x dense; a row of panels
    per dataset (shared y), a column per algo."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    datasets = sorted(scores.dataset.unique())
    algos = sorted(scores.algo.unique())
    fig, axes = plt.subplots(len(datasets), len(algos), figsize=(4.4 * len(algos), 3.3 * len(datasets)),
                             squeeze=False, sharey="row")
    criteria = sorted(p for p in scores.prune.unique() if p != "dense")
    colors = dict(zip(criteria, sns.color_palette("deep", len(criteria))))
    densities = 1 - scores.loc[scores.prune != "dense", "sparsity"]
    for (i, dataset), (j, algo) in ((a, b) for a in enumerate(datasets) for b in enumerate(algos)):
        ax = axes[i, j]
        t = scores[(scores.algo == algo) & (scores.dataset == dataset)]
        dense = t[t.prune == "dense"]
        if len(dense):
            d = dense.iloc[0]
            ax.axhspan(d.ci_lo, d.ci_hi, color="0.85", label="dense (95% CI)")
            ax.axhline(d["mean"], color="0.3", lw=1)
            ax.axhline(threshold * d["mean"], color="0.3", lw=1, ls="--", label=f"{threshold:.0%} of dense")
        for prune in criteria:
            c = t[t.prune == prune].sort_values("sparsity")
            if len(c):
                ax.plot(1 - c.sparsity, c["mean"], marker="o", ms=3, color=colors[prune], label=prune)
                ax.fill_between(1 - c.sparsity, c.ci_lo, c.ci_hi, color=colors[prune], alpha=0.2)
                ax.errorbar(1 - c.sparsity, c["mean"], yerr=[c["mean"] - c.ci_lo, c.ci_hi - c["mean"]], fmt="none",
                            ecolor=colors[prune], capsize=3, lw=1)
        ax.set_xscale("log")
        if len(densities):
            ticks = [x for x in DENSITY_TICKS if densities.min() * 0.8 <= x <= densities.max() * 1.25]
            ticks = ticks or sorted(densities.unique())
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.minorticks_off()
            ax.set_xlim(max(densities.max() * 1.3, 0.0), densities.min() / 1.3)  # sparser to the right
        ax.set_title(f"{algo} · {dataset}" + ("" if len(t) else " (no runs)"), fontsize=10)
        ax.set_xlabel("fraction of weights kept (log)")
        if j == 0:
            ax.set_ylabel("final normalised score")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.suptitle("Final normalised score vs fraction of weights kept", y=1.02)
    fig.tight_layout()
    fig.legend(handles, labels, loc="center left", fontsize=8, title="criterion", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path, _caption(finals))


def plot_layers(layers: pd.DataFrame, sparsity: float, path: Path) -> Path:
    """Fraction of weights kept per layer at `sparsity`, a bar per criterion (the paper's Figure 3);
    each layer labelled with its size, a layer that some run emptied marked 'collapsed'."""
    import seaborn as sns

    data = layers[np.isclose(layers.target_sparsity, sparsity) & (layers.prune != "dense")].copy()
    # a panel per dataset too: layer sizes depend on the environment's observation and action sizes
    data["panel"] = data.algo + " · " + data.dataset + " · " + data.network
    collapsed = set(data.loc[data.kept == 0, "layer"] + "@" + data.loc[data.kept == 0, "panel"])
    data["label"] = [f"{layer.removesuffix('.weight')}\n{total:,} w" + ("\nCOLLAPSED" if f"{layer}@{panel}" in collapsed else "")
                     for layer, total, panel in zip(data.layer, data.total, data.panel)]
    data = data.rename(columns={"prune": "criterion"})
    panels = sorted(data.panel.unique())
    grid = sns.catplot(data=data, x="label", y="density", hue="criterion", col="panel", col_order=panels,
                       col_wrap=min(2, len(panels)), kind="bar", errorbar=None, sharex=False,
                       height=3.2, aspect=1.7)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("layer (input -> output), weights", "fraction of weights kept")
    for ax in grid.axes.flat:
        ax.axhline(1 - sparsity, color="0.3", lw=1, ls="--")
        ax.tick_params(axis="x", labelsize=7, labelrotation=35)
    grid.figure.suptitle(f"Weights kept per layer at sparsity {sparsity:g} (dashed: uniform {1 - sparsity:.2f})", y=1.03)
    n_seeds = data.groupby(["algo", "criterion"]).seed.nunique().min()
    return _save(grid.figure, path, f"mean over {n_seeds} seed(s) per criterion; masks are fixed at initialisation; "
                                    "COLLAPSED: some run kept none of the layer's weights")


def plot_realised_sparsity(results: pd.DataFrame, path: Path, caption: str) -> Path:
    """Realised sparsity over training of the runs whose masks change (gmp's rises on its
    schedule; set, rigl, edge-popup and biprop hold theirs while the positions move), a line per
    criterion and target sparsity, a panel per algo and dataset."""
    import seaborn as sns

    data = results.copy()
    data["panel"] = data.algo + " · " + data.dataset
    data["target"] = data.target_sparsity.map(lambda s: f"{s:g}")
    panels = sorted(data.panel.unique())
    grid = sns.relplot(data=data, x="step", y="realised_sparsity", hue="prune", style="target", col="panel",
                       col_order=panels, col_wrap=min(3, len(panels)), kind="line", errorbar=None, height=3.2,
                       aspect=1.3)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("gradient updates", "realised sparsity")
    grid.legend.set_title("criterion / target")
    grid.figure.suptitle("Sparsity during training of masks that change", y=1.03)
    return _save(grid.figure, path, caption)


def _mask_changes_text(results: pd.DataFrame) -> str:
    changes = results.sort_values("step").groupby("run_id").tail(1).groupby("prune").mask_changes.mean()
    return "mask changes per run (mean): " + ", ".join(f"{prune} {count:,.0f}" for prune, count in changes.items())


def plot_storage(storage: pd.DataFrame, path: Path) -> Path:
    import seaborn as sns

    data = storage.copy()
    networks = data[data.network != "total"].groupby("algo").network.nunique()
    single = networks[networks == 1].index  # 'total' repeats the only network
    data = data[~((data.network == "total") & data.algo.isin(single))]
    data["panel"] = data.algo + " · " + data.network
    panels = sorted(data.panel.unique())
    grid = sns.relplot(data=data, x="target_sparsity", y="bytes", hue="format", col="panel", col_order=panels,
                       col_wrap=min(3, len(panels)), kind="line", marker="o", errorbar=None, height=3.0,
                       aspect=1.3, facet_kws={"sharey": False})
    grid.set(yscale="log")
    grid.set_titles("{col_name}")
    grid.set_axis_labels("sparsity (fraction of weights removed)", "bytes")
    grid.figure.suptitle("Bytes per network vs sparsity, per storage format", y=1.03)
    return _save(grid.figure, path, "from `offprune storage` (storage.parquet); mean over the runs measured")


# ---------------------------------------------------------------------------------- page


def _fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def retention_display(table: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """The item-4 table as strings, for markdown and HTML."""
    return pd.DataFrame({
        "algo": table.algo, "dataset": table.dataset, "criterion": table.criterion, "seeds": table.seeds,
        "dense score": [_fmt(v) for v in table.dense_score],
        f"highest sparsity ≥{threshold:.0%} dense": [_fmt(v, "g") for v in table.highest_sparsity],
        "score / dense there (95% CI)": [
            "—" if math.isnan(r) else f"{r:.2f} ({lo:.2f}–{hi:.2f})"
            for r, lo, hi in zip(table.ratio, table.ratio_ci_lo, table.ratio_ci_hi)],
        "highest sparsity, CI lower bound ≥ threshold": [_fmt(v, "g") for v in table.highest_sparsity_ci],
        "note": table.note,
    })


def markdown_table(df: pd.DataFrame) -> str:
    cells = [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in df.columns) + "|")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> Path:
    return atomic.write_text(path, text, fsync=False)  # moved into place when the whole report is made


def make_report(
    results_path: str | Path,
    out: str | Path,
    layer_sparsity: float | None = None,
    threshold: float = 0.9,
    reps: int = stats.DEFAULT_REPS,
    log: Callable[[str], None] = lambda message: None,
    readme: str | Path | None = None,
    command: str = "",
) -> Report:
    """Write figures (PNG), report.html (self-contained) and summary.md for the results at `results_path`;
    with `readme` (a study's text, offprune.readme), README.md too, naming `command` as what made it.

    Everything is made in a temporary folder inside `out` and moved in at the end, so a failure
    leaves no half-written report (a study's folder also holds its results and README)."""
    import shutil

    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], got {threshold}")
    results = load(results_path)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    except OSError as e:
        raise UserError(f"cannot write the report to {out}: {e.strerror}") from None
    try:
        report = _make_report(results, results_path, work, layer_sparsity, threshold, reps, log, readme, command)
        report.files = [out / f.name for f in report.files]
        for f in report.files:
            os.replace(work / f.name, f)
    except OSError as e:
        raise UserError(f"cannot write the report to {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.out = out
    return report


Figure = tuple[Path, str]  # a written PNG and its caption


def _make_report(results: pd.DataFrame, results_path, out: Path, layer_sparsity, threshold, reps, log,
                 readme: str | Path | None = None, command: str = "") -> Report:
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    from offprune.claims import claim_table
    from offprune.questions import question_table

    report = Report(out)
    raw_finals, _ = final_scores(results)
    raw_layers = _layers(results_path, raw_finals)
    changing = _changing_runs(results)
    labels = criterion_labels(results)
    report.claims = claims = claim_table(results, raw_finals, raw_layers, reps, labels)  # plain criteria
    results = results.assign(prune=results.run_id.map(labels))
    finals, report.notes = final_scores(results)
    results = results[results.run_id.isin(finals.run_id)]
    report.notes += _missing_runs(results_path, finals)
    report.scores = score_table(finals, reps)
    report.questions = questions = question_table(finals, reps)  # by the labelled variants
    iqms = iqm_table(finals, reps)
    report.retention = retention_table(finals, threshold, reps)
    report.notes[:0] = _coverage_notes(finals)

    sns.set_theme(style="whitegrid", context="paper")
    figures = _score_figures(results, finals, report.scores, out, threshold, reps, log)
    figures += _changing_mask_figures(results, changing, out, log)
    layers = raw_layers.assign(prune=raw_layers.run_id.map(labels)) if len(raw_layers) else raw_layers
    layer_figures, layer_notes = _layer_figures(layers, finals, changing, layer_sparsity, out, log)
    storage_figures, storage_notes = _storage_figures(results_path, finals, out, log)
    figures += layer_figures + storage_figures
    report.notes += layer_notes + storage_notes

    tables = {"scores.csv": report.scores, "retention.csv": report.retention,
              "iqm.csv": iqms,  # IQM over datasets per (algo, criterion, sparsity)
              "claims.csv": claims, "questions.csv": questions}
    for name, table in tables.items():
        table.to_csv(out / name, index=False)
    report.files = [path for path, _ in figures]
    report.files += _write_pages(report, results_path, finals, claims, questions, figures, threshold)
    report.files += [out / name for name in tables]
    if readme is not None:
        report.files.append(_write_readme(report, results_path, results, finals, readme, threshold, command))
    return report


def _write_readme(report: Report, results_path, results: pd.DataFrame, finals: pd.DataFrame, text_file,
                  threshold: float, command: str) -> Path:
    """README.md of a study from its text and the report's tables (`results`: the finished runs'
    rows); the grid is the results folder's runs.json when there is one."""
    from offprune.readme import study_readme

    names = _study_grid(results_path)
    tables = {"scores": markdown_table(score_matrix(report.scores, threshold, "md")),
              "claims": markdown_table(report.claims) if len(report.claims) else "",
              "questions": QUESTIONS_NOTE + "\n\n" + markdown_table(report.questions) if len(report.questions) else ""}
    text = study_readme(text_file, results, finals, names, tables, threshold, FINAL_EVALUATIONS, command)
    return _write_text(report.out / "README.md", text)


def _changing_runs(results: pd.DataFrame) -> set[str]:
    """The run_ids whose masks move during training (changing schedules and learned masks)."""
    from offprune.dynamic import DYNAMIC_METHODS
    from offprune.prune import SUPERMASK_METHODS

    return set(results.run_id[results.prune.isin(DYNAMIC_METHODS + SUPERMASK_METHODS)])


def _coverage_notes(finals: pd.DataFrame) -> list[str]:
    """Warnings, first in the report's notes, about what the results cannot show."""
    notes = []
    if not (finals.prune != "dense").any():
        notes.append("these results hold only dense runs: there is nothing pruned to compare")
    few_seeds = finals.groupby(["algo", "dataset", "prune", "target_sparsity"]).seed.nunique().min()
    if few_seeds < 3:
        notes.append(f"some points have only {few_seeds} seed(s): with fewer than 3 seeds the 95% "
                     "confidence intervals are not meaningful (one seed draws a zero-width interval)")
    return notes


def _score_figures(results: pd.DataFrame, finals: pd.DataFrame, scores: pd.DataFrame, out: Path, threshold: float,
                   reps: int, log) -> list[Figure]:
    """Figures 1 (training curves, one per criterion) and 2 (final score vs sparsity)."""
    figures: list[Figure] = []
    criteria = sorted(p for p in finals.prune.unique() if p != "dense")
    for prune in criteria:
        log(f"figure: training curves, {prune}")
        path = plot_training_curves(results, finals, prune, out / f"fig1_curves_{prune}.png", min(reps, 1000))
        figures.append((path, f"Normalised score during training, {prune}, one line per sparsity (black: dense)."))
    if criteria:
        log("figure: final score vs sparsity")
        path = plot_score_vs_sparsity(scores, finals, out / "fig2_score_vs_sparsity.png", threshold)
        figures.append((path, "Final normalised score vs fraction of weights kept (log axis, sparser to the right); "
                              f"grey band: dense 95% CI; dashed: {threshold:.0%} of dense."))
    return figures


def _changing_mask_figures(results: pd.DataFrame, changing: set[str], out: Path, log) -> list[Figure]:
    """Figure 4: realised sparsity during training of the runs whose masks change."""
    if not changing or "realised_sparsity" not in results:
        return []
    log("figure: realised sparsity of changing masks")
    moving = results[results.run_id.isin(changing)]
    changes = _mask_changes_text(moving)
    path = plot_realised_sparsity(moving, out / "fig4_realised_sparsity.png", changes)
    return [(path, "Realised sparsity during training of the runs whose masks change (gmp, set, rigl, "
                   "edge-popup, biprop); their final scores stand beside the fixed masks' in figure 2; "
                   + changes + ".")]


def _layer_figures(layers: pd.DataFrame, finals: pd.DataFrame, changing: set[str], layer_sparsity: float | None,
                   out: Path, log) -> tuple[list[Figure], list[str]]:
    """Figure 3 (kept fraction per layer at one sparsity, 0.95 when there is one, else the highest)
    and a note per collapsed layer."""
    figures: list[Figure] = []
    notes: list[str] = []
    if changing and len(layers):  # layers.parquet holds their initial masks, not what they trained to
        layers = layers[~layers.run_id.isin(changing)]
        notes.append("figure 3 shows fixed masks only: the per-layer counts of masks that change are in each "
                     "run's mask_changes.parquet")
    pruned_levels = sorted(finals.loc[finals.prune != "dense", "target_sparsity"].unique())
    if layer_sparsity is None and pruned_levels:
        near_95 = [s for s in pruned_levels if np.isclose(s, 0.95)]
        layer_sparsity = float(near_95[0] if near_95 else pruned_levels[-1])
    if layer_sparsity is not None and len(layers) and np.isclose(layers.target_sparsity, layer_sparsity).any():
        log(f"figure: layers at sparsity {layer_sparsity:g}")
        path = plot_layers(layers, layer_sparsity, out / "fig3_layers.png")
        figures.append((path, f"Fraction of weights kept per layer at sparsity {layer_sparsity:g}, per criterion."))
        dead = layers[np.isclose(layers.target_sparsity, layer_sparsity) & (layers.kept == 0)]
        for (algo, prune, network, layer), g in dead.groupby(["algo", "prune", "network", "layer"]):
            notes.append(f"layer collapse at {layer_sparsity:g}: {algo} {prune} {network} {layer} kept no "
                         f"weights in {g.run_id.nunique()} run(s)")
    elif layer_sparsity is not None:
        notes.append(f"no per-layer counts at sparsity {layer_sparsity:g}: figure 3 left out")
    return figures, notes


def _storage_figures(results_path, finals: pd.DataFrame, out: Path, log) -> tuple[list[Figure], list[str]]:
    """Figure 5: bytes per network and storage format, from the runs' storage.parquet files."""
    try:
        storage = load(results_path, STORAGE_FILE)
        storage = storage[storage.run_id.isin(finals.run_id)]
    except UserError:
        storage = pd.DataFrame()
    if not len(storage):
        return [], ["no storage figures in these results (run `offprune storage RUN_DIR`): figure 5 left out"]
    log("figure: storage")
    path = plot_storage(storage, out / "fig5_storage.png")
    return [(path, "Bytes per network vs sparsity, per storage format (log scale).")], []


def _write_pages(report: Report, results_path, finals: pd.DataFrame, claims: pd.DataFrame, questions: pd.DataFrame,
                 figures: list[Figure], threshold: float) -> list[Path]:
    """summary.md and the self-contained report.html; returns their paths."""
    display = retention_display(report.retention, threshold)
    matrix_md = score_matrix(report.scores, threshold, "md")
    summary = _summary(finals, results_path, threshold)
    md = [f"# offprune report: {_title(results_path)}", "", *summary, ""]
    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    md += [f"## Final score per criterion and sparsity (mean [95% CI]; bold: CI lower bound ≥ {threshold:.0%} of dense)",
           "", markdown_table(matrix_md), ""]
    if len(display):
        md += [f"## Highest sparsity up to which every sparsity keeps ≥ {threshold:.0%} of the dense score", "",
               markdown_table(display), ""]
    if len(claims):
        md += ["## The paper's claims, checked", "", markdown_table(claims), ""]
    if len(questions):
        md += ["## The reviewer's questions", "", QUESTIONS_NOTE, "", markdown_table(questions), ""]
    md += ["## Figures", ""]
    md += [f"![{caption}]({path.name})\n\n{caption}\n" for path, caption in figures]
    page = _html(results_path, summary, display, score_matrix(report.scores, threshold, "html"), claims, questions,
                 figures, report.notes, threshold)
    return [_write_text(report.out / "summary.md", "\n".join(md) + "\n"), _write_text(report.out / "report.html", page)]


def _layers(results_path, finals: pd.DataFrame) -> pd.DataFrame:
    """The per-layer counts of the runs in `finals` (empty when the results have none)."""
    try:
        layers = load(results_path, LAYERS_FILE)
    except UserError:
        return pd.DataFrame()
    return layers[layers.run_id.isin(finals.run_id)]


def _title(results_path) -> str:
    path = Path(str(results_path))
    return path.parent.name if path.suffix == ".parquet" else path.name


def _study_grid(results_path) -> list[str] | None:
    """The run names of a study's grid (runs.json next to its results); None when there is none."""
    from offprune.config import RunConfig
    from offprune.study import expected_runs

    path = Path(str(results_path))
    folder = path.parent if path.suffix == ".parquet" else path
    grid = expected_runs(folder) if folder.is_dir() else None
    return [RunConfig(**cfg).name for cfg in grid] if grid else None


def _missing_runs(results_path, finals: pd.DataFrame) -> list[str]:
    """Runs a study's grid expects that have no final result yet."""
    names = _study_grid(results_path)
    if not names:
        return []
    missing = [n for n in names if n not in set(finals.run_id)]
    done = len(names) - len(missing)
    if not missing:
        return [f"all {len(names)} runs of the study's grid are done"]
    return [f"partial study: {done} of {len(names)} runs done; {len(missing)} missing or in progress: "
            + ", ".join(missing)]


def _summary(finals: pd.DataFrame, results_path, threshold: float) -> list[str]:
    seeds = sorted(finals.seed.unique())
    return [
        f"- budget: {', '.join(f'{s:,}' for s in sorted(finals.step.unique()))} updates per run, {len(seeds)} seed(s), "
        f"the datasets below; the pruning paper's: {PAPER_BUDGET}. Scores that fall short here may not at its budget",
        f"- results: `{results_path}`: {finals.run_id.nunique()} finished runs",
        f"- algos: {', '.join(sorted(finals.algo.unique()))}; datasets: {', '.join(sorted(finals.dataset.unique()))}",
        f"- criteria: {', '.join(sorted(finals.prune.unique()))}; sparsities: "
        f"{', '.join(f'{s:g}' for s in sorted(finals.target_sparsity.unique()))}",
        f"- seeds: {len(seeds)} ({', '.join(map(str, seeds))}); updates per run: "
        f"{', '.join(f'{s:,}' for s in sorted(finals.step.unique()))}",
        f"- final score = mean normalised score of a run's last {FINAL_EVALUATIONS} evaluations; {D4RL_NOTE}",
        f"- a sparsity holds when mean(pruned) / mean(dense) ≥ {threshold:g}; the highest sparsity that holds is "
        "the highest up to which every sparsity holds; CIs are 95% percentile bootstraps over seeds (pruned and "
        "dense resampled independently)",
    ]


def _html(results_path, summary, display, matrix, claims, questions, figures, notes, threshold) -> str:
    def md_inline(text: str) -> str:
        parts = html.escape(text).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    title = html.escape(_title(results_path))
    body = [f"<h1>offprune report: {title}</h1>", "<ul>"]
    body += [f"<li>{md_inline(line.removeprefix('- '))}</li>" for line in summary]
    body += ["</ul>"]
    if notes:
        body += ["<h2>Notes</h2>", "<ul>"] + [f"<li>{md_inline(n)}</li>" for n in notes] + ["</ul>"]
    body += [f"<h2>Final score per criterion and sparsity</h2><p>mean [95% CI] over seeds; bold: CI lower bound "
             f"≥ {threshold:.0%} of the dense mean</p>", matrix.to_html(index=False, border=0, classes="table",
                                                                     escape=False)]
    if len(display):
        body += [f"<h2>Highest sparsity up to which every sparsity keeps ≥ {threshold:.0%} of the dense score</h2>",
                 display.to_html(index=False, border=0, classes="table")]
    if len(claims):
        body += ["<h2>The paper's claims, checked</h2>", claims.to_html(index=False, border=0, classes="table")]
    if len(questions):
        body += ["<h2>The reviewer's questions</h2>", f"<p>{html.escape(QUESTIONS_NOTE)}</p>",
                 questions.to_html(index=False, border=0, classes="table")]
    body += ["<h2>Figures</h2>"]
    for path, caption in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:0.9em}th,td{padding:4px 8px;border-bottom:1px solid #ddd;"
             "text-align:left}figure{margin:2em 0}img{max-width:100%}figcaption{font-size:0.9em;color:#555}"
             "li{margin:0.2em 0;word-break:break-word}")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>offprune report: {title}</title><style>{style}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")
