"""A study's README: the study's own text around the tables its consolidated results give.

`offprune report reports/NAME/results.parquet --out reports/NAME --readme studies/NAME.md` writes
reports/NAME/README.md. The text file (beside the study's studies/NAME.toml) holds what only a
person can write, in parts separated by lines that are exactly `---`:

  1. what the study asks and its budget (the README's opening),
  2. optional: how the runs were made, beyond what the results record (the offprune commits, whether
     the machine was shared), listed under "Machine and time",
  3. what the runs show (after the tables); with two parts, parts 1 and 3.

The rest comes from the results: how many runs of the study's grid (runs.json) are done and which
are missing, the commands, the CPU, threads and versions the runs recorded, their run time, and
the report's own tables (final scores, the paper's claims, the reviewer's questions), so the README
and report.html never disagree.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from offprune.errors import UserError

PART_SEPARATOR = "---"


def split_text(text: str) -> tuple[str, str, str]:
    """(opening, machine notes, findings) of a study's text (see the module docstring)."""
    parts, current = [], []
    for line in text.splitlines():
        if line.strip() == PART_SEPARATOR:
            parts.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    parts.append("\n".join(current).strip())
    if len(parts) > 3:
        raise UserError(f"a study text has at most 3 parts separated by '{PART_SEPARATOR}' lines, this one has "
                        f"{len(parts)}")
    if len(parts) == 1:
        return parts[0], "", ""
    if len(parts) == 2:
        return parts[0], "", parts[1]
    return parts[0], parts[1], parts[2]


def _values(results: pd.DataFrame, column: str) -> str:
    seen = [str(v) for v in results[column].dropna().unique()] if column in results else []
    return " / ".join(seen) or "not recorded"


def study_readme(text_file: str | Path, results: pd.DataFrame, finals: pd.DataFrame, grid: list[str] | None,
                 tables: dict[str, str], threshold: float, final_evaluations: int, report_command: str) -> str:
    """The README's markdown. `results`: the finished runs' rows; `finals`: their final scores (the
    mean of their last `final_evaluations`); `grid`: the study's run names (None: the finished runs
    are the grid); `tables`: markdown of the report's 'scores', 'claims' and 'questions' (with its
    note) tables ('' when empty)."""
    text_file = Path(text_file)
    try:
        opening, machine, findings = split_text(text_file.read_text())
    except OSError as e:
        raise UserError(f"cannot read the study text {text_file}: {e.strerror or e}") from None
    config = text_file.with_suffix(".toml")
    grid = sorted(finals.run_id.unique()) if grid is None else grid
    finished = set(finals.run_id)
    missing = [name for name in grid if name not in finished]
    status = f"{len(grid) - len(missing)} of {len(grid)} runs of the grid are done"
    if missing:
        status += (f"; missing: {', '.join(missing)}." if len(missing) <= 40
                   else f"; {len(missing)} missing (the report lists them).")
    else:
        status += "."
    commands = ["```", f"offprune sweep --config {config} --plan", f"offprune sweep --config {config}",
                report_command, "```"]
    last = results.sort_values("step").groupby("run_id").tail(1)
    run_hours = (last.train_seconds.sum() + results.eval_seconds.sum()) / 3600
    span_hours = (results.timestamp.max() - results.timestamp.min()).total_seconds() / 3600
    lines = [opening, "", "## Status", "", status, "",
             ("Continue it on any machine (finished runs are skipped, missing datasets are made from the shipped "
              "policies):" if missing else "The commands that made it (run again, the sweep skips every finished run):"),
             "", *commands, "",
             "## Machine and time", "",
             f"- CPU: {_values(results, 'cpu')}; device: {_values(results, 'device')}; torch threads per run: "
             f"{_values(results, 'torch_threads')}",
             f"- run time of the finished runs (training + evaluation, summed): {run_hours:.1f} h; wall time from the "
             f"first to the last result: {span_hours:.1f} h",
             f"- offprune {_values(results, 'offprune_version')}; torch {_values(results, 'torch_version')}, "
             f"gymnasium {_values(results, 'gymnasium_version')}, mujoco {_values(results, 'mujoco_version')}"]
    if machine:
        lines += [machine]
    lines += ["", "## Final scores", "",
              f"Mean normalised score of the last {final_evaluations} evaluations ({_values(results, 'eval_episodes')} "
              "episodes each) per run, then mean [95% bootstrap CI] over seeds; bold: the CI's lower bound is at least "
              f"{threshold:.0%} of the dense mean.", "", tables["scores"], "",
              "## Paper claim | offprune's measurement | agrees?", "",
              tables["claims"] or "(none of the paper's claims is about these runs)", ""]
    if tables["questions"]:
        lines += ["## The reviewer's questions", "", tables["questions"], ""]
    if findings:
        lines += [findings, ""]
    return "\n".join(lines)
