"""Command line: flags -> configs, nothing else. Every user mistake ends in one line on stderr."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import click
from tqdm import tqdm

from offprune.algos import ALGOS
from offprune.config import IGNORABLE_FIELDS, MASK_TRANSFORMS, MAX_SEED, PROFILES, RunConfig, parse_pairs
from offprune.errors import UserError
from offprune.prune import DEFAULT_PRUNE_BATCH, DEFAULT_PRUNE_ROUNDS, METHODS, SCOPES, default_prune_rounds, default_scope
from offprune.sparse import KERNELS, MIN_ESTIMATED_SPEEDUP

KERNELS_HELP = ("dense: masked dense matrices. sparse: store and train only kept weights (CSR). auto: sparse when "
                f"a fixed rule on layer shapes and densities estimates >= {MIN_ESTIMATED_SPEEDUP}x (never timing-dependent, so "
                "reruns are identical). measure: time both here, take sparse if >= 1.1x faster (recorded).")

# help shared by run and sweep, built from the code so it cannot drift from the defaults
ALGO_HELP = " ".join(f"{name}: {module.__doc__.split(chr(10))[0].rstrip('.')}." for name, module in sorted(ALGOS.items()))
PRUNE_BATCH_DEFAULT = ("[default: " + ", ".join(f"{n} for {m}" for m, n in DEFAULT_PRUNE_BATCH.items())
                       + " (the paper's); 100 for the others]")
PROFILE_HELP = "Budget: " + "; ".join(
    f"{name} = {b['steps']:,} updates, eval every {b['eval_every']:,} over {b['eval_episodes']} episodes"
    for name, b in PROFILES.items()) + "".join(
    f"; {algo}'s {name}: " + ", ".join(f"{k}={v}" for k, v in {**refined, **refined.get("algo_options", {})}.items()
                                        if k != "algo_options")
    for algo, module in sorted(ALGOS.items()) for name, refined in getattr(module, "PROFILES", {}).items()) + "."

# The options `run` and `sweep` share, declared once: flag -> (type for one value, help). `run`
# takes one value (default: RunConfig's unless RUN_DEFAULTS says otherwise); `sweep` takes a comma
# list where the option is a grid axis, and shows SweepConfig's default (a config file may set it).
SHARED_OPTIONS: dict[str, tuple[Any, str]] = {
    "algo": (click.Choice(sorted(ALGOS)), ALGO_HELP),
    "prune": (click.Choice(METHODS), "Pruning criterion, scored on ONE batch per network before training; "
                                     "'dense' prunes nothing; synflow is data-free; small-dense trains narrower "
                                     "dense networks of the pruned size; gmp, set and rigl change the masks during "
                                     "training; edge-popup and biprop freeze the weights and learn a "
                                     "score per weight, keeping the top scores in every forward pass (dense kernels)."),
    "sparsity": (float, "Fraction of prunable weights removed, in [0, 1)."),
    "dataset": (str, "D4RL-format HDF5: a name under $OFFPRUNE_DATASETS (else ./datasets) or a path."),
    "env": (str, "Gymnasium env to evaluate in (default: from the dataset file or name)."),
    "scope": (click.Choice(SCOPES), "How sparsity spreads over a network's weight matrices. global: one "
                                    "threshold per network (the paper). layer: the same fraction in every matrix. "
                                    "erk: Erdos-Renyi-kernel fractions (Evci et al. 2020), then top scores per matrix."),
    "profile": (click.Choice(sorted(PROFILES)), PROFILE_HELP),
    "steps": (int, "Gradient updates per run (overrides the profile)."),
    "eval-every": (int, "Updates between evaluations and checkpoints."),
    "eval-episodes": (int, "Episodes per evaluation."),
    "prune-batch": (int, f"Samples in the pruning batch.  {PRUNE_BATCH_DEFAULT}"),
    "kernels": (click.Choice(KERNELS), KERNELS_HELP),
    "device": (str, "auto, cpu, cuda or cuda:N."),
    "threads": (int, "Threads per run (with sparse kernels: torch's ops on one, wide target products split over all)."),
}
# run's defaults that are not a plain RunConfig default: None = decided later (help says how)
RUN_DEFAULTS: dict[str, tuple[Any, str]] = {
    "sparsity": (None, "  [default: 0.9; 0 with --prune dense]"),
    "env": (None, ""), "steps": (None, ""), "eval_every": (None, ""), "eval_episodes": (None, ""),
    "prune_batch": (None, ""),
    "scope": (None, "  [default: global; layer for edge-popup and biprop, as their references]"),
    "threads": (None, "  [default: torch's; 1 with sparse kernels]"),
    "profile": ("quick", ""),
    "dataset": (RunConfig.dataset, "  The default is generated on first use."),
}
SWEEP_HELP = {"prune": "  A dense baseline per (algo, dataset, seed) is always added. A criterion may carry "
                       "options after '+': snip+r10 (10 rounds), random+erk (a scope), snip+shuffle, snip+reinit."}


def flags_given(*names: str) -> list[str]:
    """Of the current command's parameters `names`, those the user set (not left at their default)."""
    ctx = click.get_current_context()
    defaults = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)
    return [name for name in names if ctx.get_parameter_source(name) not in defaults]


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def shared_options(command: str) -> Callable:
    """Decorate `run` or `sweep` with SHARED_OPTIONS."""
    from offprune.config import SweepConfig

    sweep_defaults = {f.name: f.default for f in dataclasses.fields(SweepConfig)}

    def decorate(f: Callable) -> Callable:
        for flag, (kind, help_text) in reversed(SHARED_OPTIONS.items()):
            field = flag.replace("-", "_")
            if command == "run":
                default, note = RUN_DEFAULTS[field] if field in RUN_DEFAULTS else (getattr(RunConfig, field), "")
                f = click.option(f"--{flag}", type=kind, default=default, show_default=default is not None,
                                 help=help_text + note)(f)
            elif field in SweepConfig._LISTS:  # a grid axis: a comma list
                choices = f" Of: {', '.join(kind.choices)}." if isinstance(kind, click.Choice) else ""
                f = click.option(f"--{flag}", default=None, help=f"Comma list (a grid axis){choices} {help_text}"
                                 + ("" if field == "prune_batch" else f"  [default: {_shown(sweep_defaults[field])}]")
                                 + SWEEP_HELP.get(field, ""))(f)
            else:
                default = sweep_defaults[field]
                f = click.option(f"--{flag}", type=kind, default=None, help=help_text + (
                    f"  [default: {_shown(default)}]" if default is not None else ""))(f)
        return f
    return decorate


EXIT_USER_ERROR = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="offprune")
def cli() -> None:
    """offprune: prune offline-RL agents at initialisation (SNIP, GraSP, ...), train with frozen
    masks, evaluate in MuJoCo, and write every result to parquet."""


@cli.command()
@shared_options("run")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prune-rounds", type=int, default=None,
              help="Score R times on one batch, masking between rounds, sparsity rising as 1 - (1 - s)^(r/R) "
                   "(iterative pruning at initialisation); 1 is the paper's single shot.  [default: "
                   + ", ".join(f"{n} for {m}" for m, n in DEFAULT_PRUNE_ROUNDS.items()) + "; 1 for the others]")
@click.option("--mask-transform", type=click.Choice(MASK_TRANSFORMS), default="none", show_default=True,
              help="Sanity check (Frankle et al. 2021): shuffle keeps each layer's kept count at random positions.")
@click.option("--reinit", is_flag=True,
              help="Sanity check: re-draw the kept weights from the initialiser after the masks are computed.")
@click.option("--masks-from", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="Train with another run's masks (same network shapes; e.g. halfcheetah -> walker2d, both 17/6) "
                   "instead of pruning; --prune names the source's criterion, --sparsity its sparsity.")
@click.option("--score-transfer", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="FSTL: rank weights by random + OMEGA x RUN_DIR's scores + this run's own, each divided by its "
                   "mean |score| over the network (RUN_DIR: a run of the same shapes, pruned by a criterion).")
@click.option("--weight-transfer", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="FTL: initial weights = fresh + OMEGA x RUN_DIR's trained weights, before pruning.")
@click.option("--omega", type=float, default=0.2, show_default=True, help="Weight of the transferred scores or weights.")
@click.option("--transfer-noise", type=float, default=1.0, show_default=True,
              help="FSTL: weight of the random part of the mixed score (0: none).")
@click.option("--prune-start", type=float, default=RunConfig.prune_start, show_default=True,
              help="gmp: fraction of the updates after which pruning starts.")
@click.option("--prune-end", type=float, default=RunConfig.prune_end, show_default=True,
              help="gmp, set, rigl: fraction of the updates after which the masks stop changing.")
@click.option("--prune-every", type=int, default=RunConfig.prune_every, show_default=True,
              help="gmp, set, rigl: updates between mask changes.")
@click.option("--drop-fraction", type=float, default=RunConfig.drop_fraction, show_default=True,
              help="set, rigl: fraction of each layer's kept weights replaced at the first change (cosine-decayed to 0).")
@click.option("--out", default="runs", show_default=True, help="Results folder; the run writes to OUT/RUN_ID/.")
@click.option("--run-id", default=None, help="Name of the run folder (default: algo_dataset_prune_sSPARSITY_seedN).")
@click.option("--resume", is_flag=True, help="Continue the run from its last checkpoint (may raise --steps).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal only).")
@click.option("--sparsity-of", "sparsity_of", multiple=True, metavar="NETWORK=S",
              help="Another sparsity for one prunable network, e.g. rssm=0.7 (repeatable; 0 keeps it dense).")
@click.option("--algo-opt", "algo_opts", multiple=True, metavar="KEY=VALUE",
              help="Override a field of the algorithm's Config, e.g. penalty=0 or actor_hidden=256,256 (repeatable).")
@click.option("--seq-len", type=int, default=None,
              help="Sequence length of sequence-based algorithms (dreamer); same as --algo-opt seq_len=N.")
def run(algo, prune, sparsity, scope, dataset, env, seed, profile, steps, eval_every, eval_episodes,
        prune_batch, prune_rounds, mask_transform, reinit, masks_from, score_transfer, weight_transfer, omega,
        transfer_noise, prune_start, prune_end, prune_every, drop_fraction, device, threads, kernels, out, run_id, resume, progress, sparsity_of, algo_opts,
        seq_len) -> None:
    """Prune one agent at initialisation, train it with frozen masks, evaluate it.

    \b
    Examples:
      offprune run --algo bcq --prune snip --sparsity 0.95 --dataset hopper-expert-v2 --steps 1000000
      offprune run --algo dreamer --sparsity 0.9 --sparsity-of rssm=0.7 --algo-opt penalty=0
    The networks each algorithm prunes: bcq actor, critic, vae; bc vae; dreamer encoder, rssm,
    decoder, reward, actor, value. Config fields: see offprune/algos/ALGO.py.
    """
    from offprune.data.generate import ensure_default_dataset
    from offprune.envs import check_env_id
    from offprune.train import check_network_names, run as train_run

    if seq_len is not None and not ALGOS[algo].Agent.sequential:
        raise UserError(f"--seq-len: {algo} trains on single transitions, not sequences")
    cfg = RunConfig.from_profile(  # an algorithm may refine a profile; explicit flags win
        profile,
        algo,
        parse_pairs(algo_opts, "--algo-opt") + ((("seq_len", str(seq_len)),) if seq_len is not None else ()),
        dataset=dataset,
        prune=prune,
        sparsity=(0.0 if prune == "dense" else 0.9) if sparsity is None else sparsity,
        scope=scope or default_scope(prune),
        seed=seed,
        steps=steps,
        eval_every=eval_every,
        eval_episodes=eval_episodes,
        prune_batch=prune_batch,
        prune_rounds=default_prune_rounds(prune) if prune_rounds is None else prune_rounds,
        mask_transform=mask_transform,
        reinit=reinit,
        masks_from=masks_from,
        score_transfer=score_transfer,
        weight_transfer=weight_transfer,
        omega=omega,
        transfer_noise=transfer_noise,
        prune_start=prune_start,
        prune_end=prune_end,
        prune_every=prune_every,
        drop_fraction=drop_fraction,
        env=env,
        device=device,
        threads=threads,
        kernels=kernels,
        out=out,
        run_id=run_id,
        progress=progress,
        sparsity_of=parse_pairs(sparsity_of, "--sparsity-of", float),
    ).validate()
    ignored = cfg.ignored_options(flags_given(*IGNORABLE_FIELDS))
    if ignored:
        raise UserError("; ".join(ignored))
    if dataset == RunConfig.dataset:
        if env:
            check_env_id(env)  # a mistyped --env fails before the default dataset is generated
        check_network_names(cfg)  # and so does a mistyped --sparsity-of name
        ensure_default_dataset(dataset, log=lambda m: click.echo(m, err=True))
    result = train_run(cfg, resume=resume, log=lambda m: click.echo(m, err=True))
    click.echo(format_summary(result))


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file with any of these options as keys (algo = ['bc', 'bcq'], seeds = '0-4', ...); "
                   "flags given here override it.")
@shared_options("sweep")
@click.option("--seeds", default=None, help="Comma list or range, e.g. 0-4 or 0,3,7.  [default: 0-2]")
@click.option("--jobs", type=int, default=None, help="Runs at a time (local processes or local Ray CPUs).  [default: 2]")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="local: worker processes on this machine. ray: Ray tasks (needs `pip install ray`).  [default: local]")
@click.option("--ray-address", default=None,
              help="Existing Ray cluster ('auto' or HOST:PORT; OUT must be on a shared filesystem). "
                   "Without it --executor ray starts a local Ray instance.")
@click.option("--out", default=None, help="Folder of the sweep's runs.  [default: runs/sweep]")
@click.option("--status", "show_status", is_flag=True, help="Show done / running / failed / left for the sweep in --out.")
@click.option("--plan", "show_plan", is_flag=True,
              help="Print the runs left, each kind's time probed on this machine, and the wall time for --jobs; "
                   "run nothing.")
@click.option("--consolidate", "only_consolidate", is_flag=True,
              help="A study (config with `results`): copy its finished runs from --out into the results folder "
                   "and list its grid there (runs.json); run nothing.")
@click.option("--progress/--no-progress", default=None, help="Sweep progress bar (default: on a terminal only).")
def sweep(config_file, show_status, show_plan, only_consolidate, progress, **flags) -> None:
    """Run a grid of runs (dense baselines added); rerun the same command to resume it.

    \b
    Examples:
      offprune sweep --algo bc --prune snip,grasp --sparsity 0.1,0.5,0.9,0.95 --seeds 0-2 --jobs 2
      offprune sweep --config sweeps/paper-bc.toml --executor ray --ray-address auto
      offprune sweep --status --out runs/sweep
    """
    from offprune import sweep as sw
    from offprune.config import SweepConfig

    cfg = SweepConfig.build(config_file, **flags)
    if show_status:
        _echo_sweep_status(cfg)
        return
    runs = sw.grid(cfg)
    if show_plan:
        _echo_sweep_plan(cfg, runs)
        return
    if only_consolidate and not cfg.results:
        raise UserError("--consolidate needs a study: a config with results = 'FOLDER'")
    skip: set[str] = set()
    on_finished = None
    if cfg.results:
        from offprune import study

        study.check(cfg.results)
        study_grid = sw.grid(SweepConfig.build(config_file))  # the study is its file's grid, whatever the flags
        own = study.own_runs(runs, study_grid)
        if len(own) < len(runs):
            click.echo(f"{len(runs) - len(own)} of this sweep's runs are not runs of {config_file} (other settings): "
                       f"they are not consolidated into {cfg.results}", err=True)
        if only_consolidate:
            held = study.consolidate(cfg.out, cfg.results, own, study_grid)
            click.echo(f"{cfg.results}: {held} runs consolidated of the {len(study_grid)} in the study's grid")
            return
        skip = study.finished_runs(cfg.results, own)
        study.make_missing_datasets([r for r in runs if r.name not in skip], log=lambda m: click.echo(m, err=True))
        study.consolidate(cfg.out, cfg.results, own, study_grid)  # runs.json, and runs finished before

        def on_finished(name, error):
            if error is None:
                study.consolidate(cfg.out, cfg.results, own, study_grid)
    else:
        sw.check_datasets(runs)
    errors = sw.execute(runs, cfg.out, cfg.jobs, progress, cfg.executor, cfg.ray_address, skip, on_finished)
    groups = sw.status_of(runs, cfg.out, skip)  # this sweep's grid: another sweep may share the folder's manifest
    done = len(groups["done"])
    report_from = f"{cfg.results}/results.parquet" if cfg.results else cfg.out
    click.echo(f"sweep {cfg.out}: {done} done, {len(groups['failed'])} failed, "
               f"{len(runs) - done - len(groups['failed'])} not finished; "
               f"report: offprune report {report_from}")
    failed = [n for n, e in errors.items() if e]
    if failed:
        raise UserError(f"{len(failed)} run(s) failed (see their log.txt); rerun the sweep to retry them")


def _echo_sweep_status(cfg) -> None:
    """`sweep --status`: runs per state; a study counts the runs finished on any machine (its
    consolidated results) as done."""
    from offprune import sweep as sw

    if cfg.results:
        from offprune import study

        runs = sw.grid(cfg)
        groups = sw.status_of(runs, cfg.out, study.finished_runs(cfg.results, runs))
    else:
        groups = sw.status(cfg.out)
    for state, names in groups.items():
        click.echo(f"{state:<8} {len(names):>4}" + (f"  {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                                                   if names and state != "done" else ""))


def _echo_sweep_plan(cfg, runs) -> None:
    """`sweep --plan`: the runs left and their time, probed here; nothing runs."""
    from offprune import study
    from offprune import sweep as sw
    from offprune.plan import plan

    done = {r.name for r in runs if sw.read_state(Path(cfg.out) / r.name) == "done"}
    if cfg.results:
        study.check(cfg.results)
        done |= study.finished_runs(cfg.results, runs)
    started = {r.name: sw.trained_steps(Path(cfg.out) / r.name) for r in runs if r.name not in done}
    for line in plan(runs, done, cfg.jobs, log=lambda m: click.echo(m, err=True), started=started):
        click.echo(line)


@cli.command()
@click.argument("results", metavar="RESULTS")
@click.option("--out", default=None, help="Report folder.  [default: reports/NAME, NAME = RESULTS' folder name]")
@click.option("--layer-sparsity", type=float, default=None,
              help="Sparsity of the per-layer figure (the paper's Figure 3).  [default: the highest in RESULTS]")
@click.option("--threshold", type=float, default=0.9, show_default=True,
              help="Fraction of the dense score a sparsity must keep to count in the table.")
@click.option("--bootstrap", "reps", type=int, default=2000, show_default=True, help="Bootstrap resamples per CI.")
@click.option("--readme", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A study's text (studies/NAME.md: its question, then '---' lines before what the runs show): "
                   "also write README.md, the text around the status, machine, time and the report's tables.")
def report(results, out, layer_sparsity, threshold, reps, readme) -> None:
    """Figures (PNG), one self-contained HTML page and a markdown summary from results.

    \b
    RESULTS is a run or sweep folder, a results.parquet file, or a quoted glob.
    Writes: fig1_curves_CRITERION.png (score over training, per sparsity), fig2_score_vs_sparsity.png
    (final score vs sparsity, bootstrap CIs, dense band, IQM over datasets), fig3_layers.png (weights
    kept per layer), fig5_storage.png (bytes per format, when `offprune storage` was run),
    summary.md + report.html with the table of the highest sparsity keeping >= 90% of dense.

    \b
    Example:
      offprune report runs/sweep --out reports/bc-hopper
    """
    from offprune.report import make_report, markdown_table, retention_display

    if reps < 100:
        raise UserError("--bootstrap must be at least 100 resamples")
    name = Path(results.rstrip("/")).name.replace("*", "all") or "results"
    out = out or Path("reports") / name
    command = (f"offprune report {results} --out {out}" + (f" --threshold {threshold:g}" if threshold != 0.9 else "")
               + (f" --readme {readme}" if readme else ""))
    rep = make_report(results, out, layer_sparsity, threshold, reps, log=lambda m: click.echo(m, err=True),
                      readme=readme, command=command)
    click.echo(markdown_table(retention_display(rep.retention, threshold)))
    for note in rep.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {rep.out}/report.html, summary.md" + (", README.md" if readme else "")
               + f" and {sum(p.suffix == '.png' for p in rep.files)} figure(s)")


@cli.command("bench")
@click.option("--baseline", default="benchmarks/bench_baseline.json", show_default=True, type=click.Path(dir_okay=False),
              help="Stored baseline (JSON; its 'tolerances' set how far results may move).")
@click.option("--update-baseline", is_flag=True, help="Rewrite the baseline with this machine's results.")
@click.option("--algo", "algos", default="bc,bcq,td3-bc,iql", show_default=True, help="Comma list of algos in the suite.")
@click.option("--steps", type=int, default=300, show_default=True, help="Updates per run.")
def bench_command(baseline, update_baseline, algos, steps) -> None:
    """Regression benchmark for CI: a fixed suite (dense, SNIP, GraSP at 0.9 and 0.95 per algo, seed 0,
    a tiny generated Hopper dataset) compared with a stored baseline; exits 1 on a regression.

    \b
    Checks: kept counts, realised sparsity and mask hashes exactly; final losses and normalised
    scores within the baseline's tolerances; masked/dense time per update within its tolerance.
    """
    from offprune.bench import bench
    from offprune.config import parse_list

    names = parse_list(algos)
    unknown = [a for a in names if a not in ALGOS]
    if unknown or not names:
        raise UserError(f"unknown algo '{unknown[0] if unknown else algos}' (choose from {', '.join(ALGOS)})")
    if steps < 1:
        raise UserError("--steps must be at least 1")
    checks, current = bench(names, steps, baseline, update_baseline, log=lambda m: click.echo(m, err=True))
    if update_baseline:
        click.echo(f"wrote {baseline}: {len(current)} cases")
        return
    width = max(len(c.case) for c in checks)
    click.echo(f"{'case':<{width}}  {'metric':<22} {'baseline':>24} {'current':>24}  {'rule':<12} ok")
    for c in checks:
        click.echo(f"{c.case:<{width}}  {c.metric:<22} {str(c.baseline):>24} {str(c.current):>24}  {c.rule:<12} "
                   f"{'ok' if c.ok else 'REGRESSION'}")
    failed = [c for c in checks if not c.ok]
    click.echo(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    if failed:
        click.echo(f"offprune: bench: {len(failed)} regression(s) against {baseline}", err=True)
        sys.exit(1)


def format_summary(result) -> str:
    rows, layers = result.rows, result.layers
    lines = [f"run {result.run_dir.name}  ->  {result.run_dir}/results.parquet"]
    if not rows.empty:
        first = rows.iloc[0]
        nets = [c for c in rows.columns if c.startswith("sparsity_") and c != "sparsity_overrides"]
        lines.append(
            f"realised sparsity: {first['realised_sparsity']:.4f} overall; "
            + ", ".join(f"{c.removeprefix('sparsity_')} {first[c]:.4f}" for c in nets)
        )
        lines.append(f"{'step':>9} {'return':>10} {'± std':>8} {'normalised':>10} {'steps/s':>8}")
        for r in rows.itertuples():
            lines.append(
                f"{r.step:>9} {r.return_mean:>10.1f} {r.return_std:>8.1f} {r.normalized_score:>10.2f} {r.steps_per_s:>8.1f}"
            )
    dead = layers[layers.kept == 0]
    if len(dead):
        lines.append("collapsed layers: " + ", ".join(f"{r.network}/{r.layer}" for r in dead.itertuples()))
    return "\n".join(lines)


@cli.group()
def datasets() -> None:
    """Make and list D4RL-format datasets."""


ENVS = ["hopper", "halfcheetah", "walker2d", "ant"]


@datasets.command("train")
@click.argument("env", metavar="ENV", type=click.Choice(ENVS))
@click.option("--algo", type=click.Choice(["sac", "ppo"]), default=None,
              help="Behaviour learner (stable-baselines3); PPO uses per-env settings (offprune.data.behaviour"
                   ".PPO_SETTINGS).  [default: ppo]")
@click.option("--profile", type=click.Choice(["quick", "d4rl"]), default="quick", show_default=True,
              help="quick: SAC 100k / PPO 2M env steps, at most 40 minutes, a snapshot every 10k / 50k. "
                   "d4rl: SAC 1M / PPO 10M, no time bound, a snapshot every 50k / 250k.")
@click.option("--steps", type=int, default=None, help="Env steps of training (overrides the profile).")
@click.option("--minutes", type=float, default=None, help="Wall-clock bound (overrides the profile).")
@click.option("--eval-every", type=int, default=None, help="Env steps between snapshots + evaluations.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted or finished training (e.g. with more --steps).")
def datasets_train(env, algo, profile, steps, minutes, eval_every, seed, resume) -> None:
    """Train the behaviour policy that medium / expert / medium-replay data come from.

    \b
    Kept in DATASETS/behaviour/ENV-ALGO/: a snapshot + evaluation every --eval-every steps, all
    collected transitions, and a checkpoint for --resume. Expert = the best snapshot; medium =
    an earlier snapshot at about a third of its return (D4RL's recipe).
    """
    from offprune.data.behaviour import DEFAULT_ALGO, PROFILES, pick_snapshots, read_state, train_behaviour

    algo = algo or DEFAULT_ALGO[env]
    budget = PROFILES[profile]
    folder = train_behaviour(env, algo, steps or budget[f"{algo}_steps"],
                             budget["minutes"] if minutes is None else minutes, seed,
                             eval_every or budget[f"{algo}_eval_every"], resume, progress=sys.stderr.isatty(),
                             log=lambda m: click.echo(m, err=True))
    state = read_state(folder)
    picks = pick_snapshots(state)
    click.echo(f"{folder}: {state['steps_done']} steps in {state['seconds'] / 60:.1f} min; expert = step "
               f"{picks['expert']['step']} (return {picks['expert']['return_mean']:.1f}), medium = step "
               f"{picks['medium']['step']} (return {picks['medium']['return_mean']:.1f})")


@datasets.command("make")
@click.argument("env", metavar="ENV", type=click.Choice(ENVS))
@click.option("--quality", type=click.Choice(["random", "medium", "expert", "medium-replay", "medium-expert"]),
              default="random", show_default=True,
              help="random: uniform actions. medium/expert: a behaviour policy's stochastic actions (your "
                   "'offprune datasets train ENV' if it finished, else the policy offprune ships, else --policy). "
                   "medium-replay: a local training's data up to medium. medium-expert: medium + expert files.")
@click.option("--algo", type=click.Choice(["sac", "ppo"]), default=None, help="Which behaviour training.  [default: ppo]")
@click.option("--profile", type=click.Choice(["quick", "d4rl"]), default="quick", show_default=True,
              help="Transitions: quick 100k, d4rl 1M.")
@click.option("--transitions", type=int, default=None, help="Overrides the profile.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--out", default=None, help="Output file (default: $OFFPRUNE_DATASETS or ./datasets / ENV-QUALITY-v5.hdf5).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("--policy", "policy_path", type=click.Path(), default=None,
              help="Act with this policy: a shipped-format .pt (with its .json card) or a stable-baselines3 PPO "
                   "snapshot .zip (e.g. DATASETS/behaviour/hopper-ppo/snapshots/step_N.zip).")
def datasets_make(env, quality, algo, profile, transitions, seed, out, overwrite, policy_path) -> None:
    """Write a D4RL-format dataset rolled out in a gymnasium v5 env (recorded in the folder's manifest)."""
    from offprune.data.behaviour import DEFAULT_ALGO, PROFILES
    from offprune.data.d4rl import datasets_dir, load_dataset
    from offprune.data.generate import default_name, make_dataset

    path = Path(out) if out else datasets_dir() / f"{default_name(env, quality)}.hdf5"
    n = transitions if transitions is not None else PROFILES[profile]["transitions"]
    make_dataset(env, quality, n, seed, path, algo or DEFAULT_ALGO[env], progress=sys.stderr.isatty(),
                 overwrite=overwrite, policy_path=policy_path)
    d = load_dataset(str(path))
    click.echo(f"wrote {path}: {len(d)} transitions, {d.attrs['episodes']} episodes, "
               f"mean return {d.attrs['return_mean']:.1f} (normalised {d.attrs['normalized_score']:.2f})")


@datasets.command("ship-policies")
@click.argument("env", metavar="ENV", type=click.Choice(ENVS))
@click.option("--to", "folder", type=click.Path(file_okay=False), default=None,
              help="Folder to write to.  [default: the package's offprune/data/policies]")
@click.option("--episodes", type=int, default=20, show_default=True, help="Evaluation episodes for the card.")
def datasets_ship_policies(env, folder, episodes) -> None:
    """Put the expert and medium policies of a finished PPO training of ENV into the package
    (a few KB each, with a card: steps, minutes, evaluation, versions, sha256), so that
    'datasets make ENV --quality expert' works on any machine without training."""
    from offprune.data.behaviour import ship_policies

    if episodes < 1:
        raise UserError("--episodes must be at least 1")
    ship_policies(env, "ppo", Path(folder) if folder else None, episodes, log=click.echo)


@datasets.command("import-minari")
@click.argument("path", type=click.Path())
@click.option("--out", default=None, help="Output file (default: DATASETS/<minari id with / as ->.hdf5).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def datasets_import_minari(path, out, overwrite) -> None:
    """Convert a local Minari dataset folder (HDF5 backend) to a D4RL-format file."""
    from offprune.data.d4rl import datasets_dir, load_dataset
    from offprune.data.generate import import_minari

    if not Path(path).exists():
        raise UserError(f"Minari dataset folder not found: {path}")
    name = "-".join(Path(path).resolve().parts[-2:]) if not out else None
    target = Path(out) if out else datasets_dir() / f"{name}.hdf5"
    import_minari(path, target, overwrite)
    d = load_dataset(str(target))
    click.echo(f"wrote {target}: {len(d)} transitions, {d.attrs['episodes']} episodes ({d.env_id})")


@datasets.command("list")
def datasets_list() -> None:
    """Datasets found under $OFFPRUNE_DATASETS (else ./datasets)."""
    import h5py

    from offprune.data.d4rl import available_datasets, datasets_dir, resolve_dataset_path

    names = available_datasets()
    if not names:
        click.echo(f"no datasets in {datasets_dir()}/ (make one with 'offprune datasets make hopper')")
        return
    click.echo(f"{'name':<30} {'env':<15} {'quality':<14} {'transitions':>11} {'episodes':>8} {'return':>9} {'normalised':>10}")
    for name in names:
        try:
            with h5py.File(resolve_dataset_path(name), "r") as f:
                a = dict(f.attrs)
                n = len(f["rewards"])
            click.echo(f"{name:<30} {str(a.get('env_id', '?')):<15} {str(a.get('quality', '?')):<14} {n:>11} "
                       f"{a.get('episodes', '?'):>8} {float(a.get('return_mean', float('nan'))):>9.1f} "
                       f"{float(a.get('normalized_score', float('nan'))):>10.2f}")
        except (OSError, KeyError) as e:
            click.echo(f"{name:<30} unreadable: {e}")


@datasets.command("info")
@click.argument("name")
def datasets_info(name) -> None:
    """Arrays, attributes (provenance) and manifest entry of one dataset (NAME or a path)."""
    import h5py

    from offprune.data import manifest
    from offprune.data.d4rl import resolve_dataset_path

    path = resolve_dataset_path(name)
    try:
        with h5py.File(path, "r") as f:
            click.echo(f"{path} ({path.stat().st_size} bytes)")
            f.visititems(lambda key, obj: click.echo(f"  {key:<26} {str(obj.dtype):<8} {obj.shape}")
                         if isinstance(obj, h5py.Dataset) else None)
            for k, v in f.attrs.items():
                click.echo(f"  @{k}: {v.decode() if isinstance(v, bytes) else v}")
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({e})") from None
    entry = manifest.read(path.parent).get(path.name)
    click.echo(f"  manifest: {'sha256 ' + entry['sha256'] if entry else 'not recorded'}")


@datasets.command("verify")
@click.argument("name")
def datasets_verify(name) -> None:
    """Check the schema, read every array, and compare the sha256 with the manifest."""
    from offprune.data import manifest

    for line in manifest.verify(name):
        click.echo(f"ok  {line}")
    click.echo(f"{name}: verified")


@cli.command()
@click.argument("run_dir", required=False, type=click.Path())
@click.option("--table1", is_flag=True, help="Reproduce the paper's Table 1 from fresh BCQ networks (s=17, a=6).")
@click.option("--latency", is_flag=True, help="Also time inference per network (1 thread, batch 1/10/100) and act().")
@click.option("--repeats", type=int, default=50, show_default=True, help="Timed calls per measurement (median).")
def storage(run_dir, table1, latency, repeats) -> None:
    """Bytes a run's networks take in every format; with --latency, what they cost to run.

    \b
    Formats: dense torch.save; torch.sparse COO (the paper's way); CSR with int64 / int32
    indices; bitmap + values; offprune's packed export; the entropy bound of the masks.
    The table is also written to RUN_DIR/storage.parquet for reports. RUN_DIR may be a sweep
    folder: then every run in it gets its storage.parquet (one line each).
    """
    import torch

    from offprune import checkpoint, speed
    from offprune import storage as st
    from offprune.envs import cpu_model

    if table1:
        t = st.table1()
        click.echo("Table 1 (10^6 bytes): BCQ networks, s=17, a=6; SNIP 95%")
        click.echo(t.to_string(index=False, float_format=lambda v: f"{v:.5f}"))
        if not run_dir:
            return
    if not run_dir:
        raise UserError("give a RUN_DIR (or a checkpoint path), or --table1")
    runs = sorted(p.parent for p in Path(run_dir).glob("*/checkpoint.pt")) if Path(run_dir).is_dir() else []
    if runs and not (Path(run_dir) / "checkpoint.pt").exists():  # a sweep folder: every run, one line each
        for path in tqdm(runs, desc="storage", unit="run", disable=not sys.stderr.isatty()):
            total = st.run_storage(path).iloc[-1]
            click.echo(f"{path.name}: packed {int(total['packed'])} bytes ({total['dense'] / total['packed']:.2f}x "
                       f"smaller than dense, {total['coo'] / total['packed']:.2f}x than COO)")
        click.echo(f"wrote storage.parquet in {len(runs)} run folders (offprune report {run_dir} plots them)")
        return
    agent, ckpt = checkpoint.load_run(run_dir)
    table = st.run_storage(run_dir, (agent, ckpt))
    total = table.iloc[-1]
    click.echo(f"bytes per network ({Path(run_dir)}):")
    click.echo(table.to_string(index=False))
    click.echo(f"total: packed is {total['dense'] / total['packed']:.2f}x smaller than dense, "
               f"{total['coo'] / total['packed']:.2f}x smaller than COO; entropy bound "
               f"{total['dense'] / total['entropy']:.2f}x")
    if latency:
        torch.set_num_threads(1)
        click.echo("\nlatency, 1 thread, ms per pass through each network's Linear layers (median):")
        click.echo(speed.layer_latency_table(checkpoint.stored_networks(agent), repeats=repeats).to_string(
            index=False, float_format=lambda v: f"{v:.3f}"))
        batch = agent.act_batch
        agents = {"modules": agent, "dense": speed.inference_agent(agent, batch, "dense"),
                  "auto": speed.inference_agent(agent, batch, "auto")}
        ms = {k: 1e3 * v for k, v in speed.act_latencies(agents, ckpt["agent"]["obs_dim"]).items()}
        dense_ms, ed_ms, auto_ms = ms["modules"], ms["dense"], ms["auto"]
        click.echo(f"\nact() with {batch} row(s) per call (median of 15 interleaved rounds of 100 calls, CPU: "
                   f"{cpu_model()}): dense modules {dense_ms:.3f} ms; inference copy, dense kernels "
                   f"{ed_ms:.3f} ms; inference copy, kernels by rule {auto_ms:.3f} ms -> {dense_ms / auto_ms:.2f}x vs dense "
                   f"modules ({ed_ms / auto_ms:.2f}x from sparse kernels alone)")


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Packed file to write.")
def export(run_dir, out) -> None:
    """Write a run's networks to one compact, lossless, checksummed file (load with
    offprune.packed.load_packed)."""
    from offprune import checkpoint, packed
    from offprune import storage as st

    agent, ckpt = checkpoint.load_run(run_dir)
    path = packed.write_packed(agent, ckpt, out)
    dense = sum(st.saved_size(m.state_dict()) for m in checkpoint.stored_networks(agent).values())
    click.echo(f"wrote {path}: {path.stat().st_size} bytes ({dense / path.stat().st_size:.2f}x smaller than "
               f"dense torch.save, {dense} bytes)")


@cli.command()
@click.option("--algo", type=click.Choice(sorted(ALGOS)), default="bcq", show_default=True)
@click.option("--sparsity", type=float, default=0.95, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="Threads for every variant (sparse: torch's ops on one thread, large sparse products shared over all, as a run trains).")
@click.option("--obs-dim", type=int, default=11, show_default=True, help="11/3: Hopper; 17/6: HalfCheetah, Walker2d.")
@click.option("--act-dim", type=int, default=3, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True, help="Interleaved rounds (median reported).")
@click.option("--steps", type=int, default=30, show_default=True, help="Updates per round.")
@click.option("--profile", type=click.Choice(list(PROFILES)), default="quick", show_default=True,
              help="Budget profile whose algorithm options (e.g. Dreamer's batch) the agents get.")
@click.option("--algo-opt", "algo_opts", multiple=True, metavar="KEY=VALUE",
              help="Override a field of the algorithm's Config, as for run (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (steps/s) for scripts and CI.")
@click.option("--changes-every", type=int, default=None, metavar="N",
              help="Instead: SET and RigL changing random-ERK masks every N updates, on dense vs sparse kernels (the "
                   "cost of topology changes, RigL's dense gradient included).")
@click.option("--breakdown", is_flag=True,
              help="Instead: where one update's time goes (profiled), dense masked vs sparse: forward and input-grad "
                   "gathers, the weight-grad sampled product, dense products, the optimizer step, the rest.")
@click.option("--compare-threads", type=int, default=None, metavar="N",
              help="Instead: dense masked and sparse on 1 and on N threads, all four interleaved in one "
                   "process (what N threads gain, free of the machine's drift between runs).")
@click.option("--learned", is_flag=True,
              help="Instead: edge-popup and biprop (per-layer masks re-ranked from learned scores after every update; "
                   "dense kernels) against the unpruned agent.")
def speed(algo, sparsity, threads, obs_dim, act_dim, repeats, steps, profile, algo_opts, as_json, changes_every,
          breakdown, compare_threads, learned) -> None:
    """Update steps/s of one algorithm's SNIP-pruned agent, interleaved in one process.

    dense_unmasked: no pruning; dense_masked: offprune's dense kernels (--kernels dense);
    sparse: offprune's sparse kernels (--kernels sparse); dense_reparam: torch.nn.utils.prune's
    weight * mask in every forward, for comparison with the usual pruning code bases;
    sparse_python (when the C++ chain loops are built): the sparse kernels' Python loops, which
    compute the same bits, as where no C++ compiler is available."""
    import json

    import torch

    from offprune.speed import algo_config, measure

    config = algo_config(algo, profile, parse_pairs(algo_opts, "--algo-opt"))
    if not 0 < sparsity < 1:
        raise UserError(f"--sparsity must be in (0, 1) for a speed comparison, got {sparsity}")
    for name, value in (("threads", threads), ("repeats", repeats), ("steps", steps)):
        if value < 1:
            raise UserError(f"--{name} must be at least 1")
    torch.set_num_threads(threads)
    from offprune.envs import cpu_model

    if changes_every is not None:
        from offprune.speed import measure_changing

        if changes_every < 1:
            raise UserError("--changes-every must be at least 1")
        r = measure_changing(algo, sparsity, changes_every, obs_dim, act_dim, repeats, steps, config=config)
        click.echo(f"{algo}, SET and RigL (random ERK {sparsity}, changes every {changes_every} updates), "
                   f"{threads} thread(s), median of {repeats} interleaved rounds x {steps} updates, CPU: {cpu_model()}")
        for method in ("set", "rigl"):
            dense, sparse = r[f"{method}_dense"], r[f"{method}_sparse"]
            click.echo(f"  {method + '_dense':12s}{dense:8.1f} steps/s\n  {method + '_sparse':12s}{sparse:8.1f} steps/s   "
                       f"{sparse / dense:5.2f}x dense masked")
        return
    if compare_threads is not None:
        from offprune.speed import measure_threads

        if compare_threads < 2:
            raise UserError("--compare-threads must be at least 2")
        r = measure_threads(algo, sparsity, compare_threads, obs_dim, act_dim, repeats, steps, config=config)
        if as_json:
            click.echo(json.dumps({"algo": algo, "sparsity": sparsity, "cpu": cpu_model(),
                                   **{f"{v}@{t}": rate for (v, t), rate in r.items()}}))
            return
        click.echo(f"{algo}, SNIP {sparsity}, 1 vs {compare_threads} threads, median of {repeats} interleaved "
                   f"rounds x {steps} updates, CPU: {cpu_model()}")
        for (variant, t), rate in r.items():
            click.echo(f"  {variant:<13} {t:>2} thread(s) {rate:8.1f} steps/s   {rate / r[(variant, 1)]:5.2f}x its "
                       f"1-thread rate   {rate / r[('dense_masked', t)]:5.2f}x dense masked on {t}")
        return
    if learned:
        from offprune.speed import measure_learned

        r = measure_learned(algo, sparsity, obs_dim, act_dim, repeats, steps, config=config)
        click.echo(f"{algo}, edge-popup and biprop at {sparsity} (per layer), {threads} thread(s), median of {repeats} "
                   f"interleaved rounds x {steps} updates, CPU: {cpu_model()}")
        for name, value in r.items():
            click.echo(f"  {name:<15} {value:8.1f} steps/s   {r['dense_unmasked'] / value:5.2f}x the unpruned update's time")
        return
    if breakdown:
        from offprune.speed import BREAKDOWN_PHASES, build, update_batches, update_breakdown

        batches = update_batches(algo, config, obs_dim, act_dim, steps + 2)
        table = {v: update_breakdown(build(algo, v, sparsity, obs_dim, act_dim, config=config), batches)
                 for v in ("dense_masked", "sparse")}
        click.echo(f"{algo}, SNIP {sparsity}, {threads} thread(s): ms per update over {steps} profiled updates "
                   f"(the profiler adds its own cost to 'rest'), CPU: {cpu_model()}")
        click.echo(f"  {'phase':<28} {'dense_masked':>12} {'sparse':>8}")
        for phase in (*BREAKDOWN_PHASES, "total"):
            row = {v: sum(t.values()) if phase == "total" else t[phase] for v, t in table.items()}
            click.echo(f"  {phase:<28} {row['dense_masked']:12.2f} {row['sparse']:8.2f}")
        return
    r = measure(algo, sparsity, obs_dim, act_dim, repeats, steps, config=config)
    if as_json:
        click.echo(json.dumps({"algo": algo, "sparsity": sparsity, "threads": threads, "cpu": cpu_model(), **r}))
        return
    click.echo(f"{algo}, SNIP {sparsity}, {threads} thread(s), obs {obs_dim}, act {act_dim}, "
               f"median of {repeats} interleaved rounds x {steps} updates, CPU: {cpu_model()}")
    for name, value in r.items():
        click.echo(f"  {name:<15} {value:8.1f} steps/s   {value / r['dense_masked']:5.2f}x dense masked   "
                   f"{value / r['dense_reparam']:5.2f}x dense reparam")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes print one line and exit 2; Ctrl-C exits 130 (checkpoints stay)."""
    try:
        cli.main(args=argv, prog_name="offprune", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        click.echo(f"offprune: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"offprune: error: {e}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("offprune: interrupted; finished evaluations and the last checkpoint are kept (--resume)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
