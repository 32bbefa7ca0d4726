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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

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
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- numbers


def final_scores(results: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per finished run: its identity, last step and normalised score there."""
    last = results.sort_values("step").groupby("run_id", as_index=False).tail(1)
    last = last[RUN_KEYS + ["step", "normalized_score"]].reset_index(drop=True)
    group_end = last.groupby(["algo", "dataset"])["step"].transform("max")
    unfinished = last[last.step < group_end]
    notes = [f"{len(unfinished)} unfinished run(s) left out: {', '.join(unfinished.run_id[:5])}"
             f"{' ...' if len(unfinished) > 5 else ''}"] if len(unfinished) else []
    return last[last.step == group_end].reset_index(drop=True), notes


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


def _ratio(groups: list[np.ndarray]) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.mean(groups[0]) / np.mean(groups[1]))


def retention_table(finals: pd.DataFrame, threshold: float = 0.9, reps: int = stats.DEFAULT_REPS) -> pd.DataFrame:
    """Per (algo, dataset, criterion): the highest sparsity whose mean final score is at least
    `threshold` x the dense mean, the ratio there with its bootstrap CI (pruned and dense seeds
    resampled independently), and the highest sparsity whose CI lower bound clears the threshold."""
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
                for sparsity, s in sorted(g.groupby("target_sparsity"), key=lambda kv: kv[0]):
                    scores = s.normalized_score.to_numpy()
                    ratio = _ratio([scores, dense])
                    lo, hi = stats.stratified_bootstrap_ci([scores, dense], _ratio, reps)
                    if ratio >= threshold:
                        row.update(highest_sparsity=sparsity, ratio=ratio, ratio_ci_lo=lo, ratio_ci_hi=hi)
                    if lo >= threshold:
                        row["highest_sparsity_ci"] = sparsity
                if math.isnan(row["highest_sparsity"]):
                    row["note"] = f"below {threshold:.0%} of dense at every sparsity"
            rows.append(row)
    return pd.DataFrame(rows)


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


def plot_score_vs_sparsity(scores: pd.DataFrame, iqms: pd.DataFrame, finals: pd.DataFrame, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import seaborn as sns

    panels = [("panel", a, d) for a, d in scores[["algo", "dataset"]].drop_duplicates().sort_values(["algo", "dataset"]).itertuples(index=False)]
    panels += [("iqm", a, None) for a in sorted(iqms.algo.unique())] if len(iqms) else []
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.3 * rows), squeeze=False)
    criteria = sorted(p for p in scores.prune.unique() if p != "dense")
    colors = dict(zip(criteria, sns.color_palette("deep", len(criteria))))
    for ax, (kind, algo, dataset) in zip(axes.flat, panels):
        if kind == "panel":
            t = scores[(scores.algo == algo) & (scores.dataset == dataset)]
            title = f"{algo} · {dataset}"
        else:
            t = iqms[iqms.algo == algo].rename(columns={"iqm": "mean"})
            title = f"{algo} · IQM over {int(t.datasets.max())} datasets"
        dense = t[t.prune == "dense"]
        if len(dense):
            d = dense.iloc[0]
            ax.axhspan(d.ci_lo, d.ci_hi, color="0.85", label="dense (95% CI)")
            ax.axhline(d["mean"], color="0.3", lw=1)
        for prune in criteria:
            c = t[t.prune == prune].sort_values("sparsity")
            if len(c):
                ax.plot(c.sparsity, c["mean"], marker="o", ms=3, color=colors[prune], label=prune)
                ax.fill_between(c.sparsity, c.ci_lo, c.ci_hi, color=colors[prune], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sparsity (fraction of weights removed)")
        ax.set_ylabel("final normalised score" if kind == "panel" else "IQM final normalised score")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Final normalised score vs sparsity", y=1.02)
    fig.tight_layout()
    return _save(fig, path, _caption(finals))


def plot_layers(layers: pd.DataFrame, sparsity: float, path: Path) -> Path:
    import seaborn as sns

    data = layers[np.isclose(layers.target_sparsity, sparsity) & (layers.prune != "dense")].copy()
    data["panel"] = data.algo + " · " + data.network
    data["layer"] = data.layer.str.removesuffix(".weight")
    panels = sorted(data.panel.unique())
    grid = sns.catplot(data=data, x="layer", y="density", hue="prune", col="panel", col_order=panels,
                       col_wrap=min(2, len(panels)), kind="bar", errorbar=None, sharex=False,
                       height=3.2, aspect=1.6)
    grid.set_titles("{col_name}")
    grid.set_axis_labels("layer (input -> output)", "fraction of weights kept")
    for ax in grid.axes.flat:
        ax.axhline(1 - sparsity, color="0.3", lw=1, ls="--")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    grid.figure.suptitle(f"Weights kept per layer at sparsity {sparsity:g} (dashed: uniform {1 - sparsity:.2f})", y=1.03)
    n_seeds = data.groupby(["algo", "prune"]).seed.nunique().min()
    return _save(grid.figure, path, f"mean over {n_seeds} seed(s) per criterion; masks are fixed at initialisation")


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def make_report(
    results_path: str | Path,
    out: str | Path,
    layer_sparsity: float | None = None,
    threshold: float = 0.9,
    reps: int = stats.DEFAULT_REPS,
    log: Callable[[str], None] = lambda message: None,
) -> Report:
    """Write figures (PNG), report.html (self-contained) and summary.md for the results at `results_path`."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    if not 0 < threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1], got {threshold}")
    results = load(results_path)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the report to {out}: {e.strerror}") from None
    report = Report(out)
    finals, report.notes = final_scores(results)
    results = results[results.run_id.isin(finals.run_id)]
    report.scores = score_table(finals, reps)
    iqms = iqm_table(finals, reps)
    report.retention = retention_table(finals, threshold, reps)
    sns.set_theme(style="whitegrid", context="paper")

    figures: list[tuple[Path, str]] = []
    criteria = sorted(p for p in finals.prune.unique() if p != "dense")
    for prune in criteria:
        log(f"figure: training curves, {prune}")
        path = plot_training_curves(results, finals, prune, out / f"fig1_curves_{prune}.png", min(reps, 1000))
        figures.append((path, f"Normalised score during training, {prune}, one line per sparsity (black: dense)."))
    if criteria:
        log("figure: final score vs sparsity")
        path = plot_score_vs_sparsity(report.scores, iqms, finals, out / "fig2_score_vs_sparsity.png")
        figures.append((path, "Final normalised score vs sparsity; grey band: dense 95% CI."))

    pruned_levels = sorted(finals.loc[finals.prune != "dense", "target_sparsity"].unique())
    try:
        layers = load(results_path, LAYERS_FILE)
        layers = layers[layers.run_id.isin(finals.run_id)]
    except UserError:
        layers = pd.DataFrame()
    if layer_sparsity is None and pruned_levels:
        layer_sparsity = float(pruned_levels[-1])
    if layer_sparsity is not None and len(layers) and np.isclose(layers.target_sparsity, layer_sparsity).any():
        log(f"figure: layers at sparsity {layer_sparsity:g}")
        path = plot_layers(layers, layer_sparsity, out / "fig3_layers.png")
        figures.append((path, f"Fraction of weights kept per layer at sparsity {layer_sparsity:g}."))
    elif layer_sparsity is not None:
        report.notes.append(f"no per-layer counts at sparsity {layer_sparsity:g}: figure 3 left out")

    try:
        storage = load(results_path, STORAGE_FILE)
        storage = storage[storage.run_id.isin(finals.run_id)]
    except UserError:
        storage = pd.DataFrame()
    if len(storage):
        log("figure: storage")
        path = plot_storage(storage, out / "fig5_storage.png")
        figures.append((path, "Bytes per network vs sparsity, per storage format (log scale)."))
    else:
        report.notes.append("no storage figures in these results (run `offprune storage RUN_DIR`): figure 5 left out")

    report.scores.to_csv(out / "scores.csv", index=False)
    report.retention.to_csv(out / "retention.csv", index=False)
    display = retention_display(report.retention, threshold)
    summary = _summary(finals, results_path, threshold)
    md = [f"# offprune report: {Path(str(results_path)).name}", "", *summary, "",
          f"## Highest sparsity keeping at least {threshold:.0%} of the dense score", "", markdown_table(display), "",
          "## Figures", ""]
    md += [f"![{caption}]({path.name})\n\n{caption}\n" for path, caption in figures]
    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes]
    report.files = [path for path, _ in figures]
    report.files.append(_write_text(out / "summary.md", "\n".join(md) + "\n"))
    report.files.append(_write_text(out / "report.html", _html(results_path, summary, display, figures, report.notes, threshold)))
    report.files += [out / "scores.csv", out / "retention.csv"]
    return report


def _summary(finals: pd.DataFrame, results_path, threshold: float) -> list[str]:
    seeds = sorted(finals.seed.unique())
    return [
        f"- results: `{results_path}`: {finals.run_id.nunique()} finished runs",
        f"- algos: {', '.join(sorted(finals.algo.unique()))}; datasets: {', '.join(sorted(finals.dataset.unique()))}",
        f"- criteria: {', '.join(sorted(finals.prune.unique()))}; sparsities: "
        f"{', '.join(f'{s:g}' for s in sorted(finals.target_sparsity.unique()))}",
        f"- seeds: {len(seeds)} ({', '.join(map(str, seeds))}); updates per run: "
        f"{', '.join(f'{s:,}' for s in sorted(finals.step.unique()))}",
        f"- final score = normalised score at a run's last evaluation; {D4RL_NOTE}",
        f"- the table keeps a sparsity when mean(pruned) / mean(dense) ≥ {threshold:g}; CIs are 95% percentile "
        f"bootstraps over seeds (pruned and dense resampled independently)",
    ]


def _html(results_path, summary, display, figures, notes, threshold) -> str:
    def md_inline(text: str) -> str:
        parts = html.escape(text).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    body = [f"<h1>offprune report: {html.escape(Path(str(results_path)).name)}</h1>", "<ul>"]
    body += [f"<li>{md_inline(line.removeprefix('- '))}</li>" for line in summary]
    body += ["</ul>", f"<h2>Highest sparsity keeping at least {threshold:.0%} of the dense score</h2>",
             display.to_html(index=False, border=0, classes="table"), "<h2>Figures</h2>"]
    for path, caption in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    if notes:
        body += ["<h2>Notes</h2>", "<ul>"] + [f"<li>{md_inline(n)}</li>" for n in notes] + ["</ul>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:0.9em}th,td{padding:4px 8px;border-bottom:1px solid #ddd;"
             "text-align:left}figure{margin:2em 0}img{max-width:100%}figcaption{font-size:0.9em;color:#555}")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>offprune report: {html.escape(Path(str(results_path)).name)}</title><style>{style}</style></head>"
            "<body>\n" + "\n".join(body) + "\n</body></html>\n")
