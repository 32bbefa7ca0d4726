"""Studies: consolidated results that a sweep on another machine continues from."""

import json

import pandas as pd
import pytest

from offprune import study
from offprune.config import SweepConfig
from offprune.errors import UserError
from offprune.sweep import grid

from conftest import run_cli


def study_file(tmp_path, dataset, **extra):
    lines = ['algo = ["bc-mlp"]', 'prune = ["snip"]', "sparsity = [0.5, 0.9]", f'dataset = ["{dataset}"]',
             'seeds = "0"', "algo_steps = { bc-mlp = 4 }", "eval_every = 2", "eval_episodes = 1",
             'kernels = "dense"', "jobs = 2", f'out = "{tmp_path / "runs"}"', f'results = "{tmp_path / "reports"}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_study_continues_from_its_consolidated_results_elsewhere(capsys, tmp_path, hopper_file):
    path = study_file(tmp_path, hopper_file)
    code, out, err = run_cli(capsys, "sweep", "--config", path, "--no-progress")
    assert code == 0, err
    assert "3 done" in out
    consolidated = pd.read_parquet(tmp_path / "reports" / "results.parquet")
    assert consolidated.run_id.nunique() == 3 and len(consolidated) == 3 * 2
    assert (consolidated.schema_version == study.SCHEMA_VERSION).all()
    layers = pd.read_parquet(tmp_path / "reports" / "layers.parquet")
    assert set(layers.run_id) == set(consolidated.run_id)
    assert layers[layers.run_id.str.contains("snip_s0.9")].kept.sum() < layers[layers.run_id.str.contains("dense")].kept.sum()
    assert len(json.loads((tmp_path / "reports" / "runs.json").read_text())) == 3

    # "another machine": the run folders are gone; one finished run is missing from the consolidated file
    keep = consolidated[consolidated.run_id != "bc-mlp_hopper-random-v5_snip_s0.9_seed0"]
    keep.to_parquet(tmp_path / "reports" / "results.parquet", index=False)
    code, out, err = run_cli(capsys, "sweep", "--config", path, "--out", tmp_path / "elsewhere", "--no-progress")
    assert code == 0, err
    ran = sorted(p.name for p in (tmp_path / "elsewhere").iterdir() if p.is_dir())
    assert ran == ["bc-mlp_hopper-random-v5_snip_s0.9_seed0"]  # only the missing one ran
    after = pd.read_parquet(tmp_path / "reports" / "results.parquet")
    assert after.run_id.nunique() == 3 and len(after) == 6
    # the kept runs' rows are untouched
    pd.testing.assert_frame_equal(after[after.run_id != ran[0]].reset_index(drop=True),
                                  keep.sort_values(["run_id", "step"]).reset_index(drop=True))


def test_consolidation_is_idempotent(capsys, tmp_path, hopper_file):
    path = study_file(tmp_path, hopper_file)
    assert run_cli(capsys, "sweep", "--config", path, "--no-progress")[0] == 0
    runs = grid(SweepConfig.build(path))
    first = (tmp_path / "reports" / "results.parquet").read_bytes()
    assert study.consolidate(tmp_path / "runs", tmp_path / "reports", runs) == 3
    assert study.consolidate(tmp_path / "runs", tmp_path / "reports", runs) == 3
    assert pd.read_parquet(tmp_path / "reports" / "results.parquet").equals(pd.read_parquet(pd.io.common.BytesIO(first)))


def test_consolidation_waits_for_another_sweep_consolidating_the_same_study(capsys, tmp_path, hopper_file):
    import threading

    from offprune import checkpoint

    path = study_file(tmp_path, hopper_file)
    assert run_cli(capsys, "sweep", "--config", path, "--no-progress")[0] == 0
    runs = grid(SweepConfig.build(path))
    finished = threading.Event()
    with checkpoint.locked(tmp_path / "reports"):  # another sweep is merging its runs in
        worker = threading.Thread(target=lambda: (study.consolidate(tmp_path / "runs", tmp_path / "reports", runs),
                                                  finished.set()))
        worker.start()
        assert not finished.wait(0.5)  # it reads the file only after the other wrote it
    worker.join(10)
    assert finished.is_set()


def test_finished_means_the_final_row_at_this_budget(tmp_path):
    runs = grid(SweepConfig.build(None, algo="bc", prune="snip", sparsity="0.9", seeds="0", steps=10))
    rows = pd.DataFrame({"run_id": [runs[0].name, runs[1].name], "step": [10, 5],
                         "schema_version": study.SCHEMA_VERSION})
    tmp_path.mkdir(exist_ok=True)
    rows.to_parquet(tmp_path / "results.parquet")
    assert study.finished_runs(tmp_path, runs) == {runs[0].name}  # the other stopped at 5 of 10


def test_a_results_file_of_another_schema_is_refused_untouched(capsys, tmp_path, hopper_file):
    path = study_file(tmp_path, hopper_file)
    (tmp_path / "reports").mkdir()
    foreign = pd.DataFrame({"run_id": ["x"], "step": [4], "schema_version": [99]})
    foreign.to_parquet(tmp_path / "reports" / "results.parquet")
    before = (tmp_path / "reports" / "results.parquet").read_bytes()
    code, _, err = run_cli(capsys, "sweep", "--config", path, "--no-progress")
    assert code == 2 and "written with results schema ['99']" in err and err.count("\n") == 1
    assert (tmp_path / "reports" / "results.parquet").read_bytes() == before
    assert not (tmp_path / "runs").exists()


def test_a_dataset_the_study_cannot_make_is_one_line(capsys, tmp_path):
    path = study_file(tmp_path, "mystery-data")
    code, _, err = run_cli(capsys, "sweep", "--config", path, "--no-progress")
    assert code == 2 and "dataset mystery-data not found and offprune cannot make it" in err
    assert err.count("\n") == 1


def test_study_axes_prune_batch_and_per_algo_steps(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('algo = ["bc", "bcq"]\nprune = ["snip"]\nsparsity = [0.95]\nprune_batch = [10, 1000]\n'
                    'seeds = "0"\nalgo_steps = { bc = 100, bcq = 200 }\n')
    runs = grid(SweepConfig.build(path))
    assert len(runs) == 2 * (1 + 2)
    assert {(r.algo, r.steps) for r in runs} == {("bc", 100), ("bcq", 200)}
    assert sorted(r.name for r in runs if r.algo == "bc") == [
        "bc_hopper-random-v5_dense_s0_seed0", "bc_hopper-random-v5_snip_s0.95_pb1000_seed0",
        "bc_hopper-random-v5_snip_s0.95_pb10_seed0"]
    path.write_text('algo_steps = { bc = 0 }\n')
    with pytest.raises(UserError, match="algo_steps: updates must be at least 1"):
        SweepConfig.build(path)
    # per-algo criteria: BC only as its dense baseline beside pruned TD3+BC
    path.write_text('algo = ["bc", "td3-bc"]\nprune = ["snip", "random"]\nsparsity = [0.9]\nseeds = "0"\n'
                    'algo_prune = { bc = [] }\n')
    assert sorted(r.name for r in grid(SweepConfig.build(path))) == [
        "bc_hopper-random-v5_dense_s0_seed0", "td3-bc_hopper-random-v5_dense_s0_seed0",
        "td3-bc_hopper-random-v5_random_s0.9_seed0", "td3-bc_hopper-random-v5_snip_s0.9_seed0"]
    path.write_text('algo = ["bc"]\nalgo_prune = { iql = [] }\n')
    with pytest.raises(UserError, match="algo_prune names iql, not in algo"):
        SweepConfig.build(path)


def test_the_committed_study_files_parse():
    from pathlib import Path

    counts = {}
    for path in sorted(Path(__file__).parent.parent.glob("studies/*.toml")):
        cfg = SweepConfig.build(path)
        assert cfg.results == f"reports/{path.stem}"
        counts[path.stem] = len(grid(cfg))
    # paper-95: 2 algos x 3 envs x 3 seeds x (dense + 3 criteria); bc-sparsity: 2 envs x 3 seeds x (1 + 3 x 6);
    # prune-batch: 3 seeds x (1 + 2 sparsities x 4 batch sizes); algos-95: 2 envs x 3 seeds x
    # (2 algos x (dense + 3 criteria x 2 sparsities) + BC dense)
    # criteria: 2 envs x 3 seeds x (1 + 9 variants x 3 sparsities); criteria-bcq: 1 env of the same
    # dynamic: 2 envs x 3 seeds x (1 + 6 methods x 3 sparsities); dynamic-bcq: 3 seeds x (1 + 6 x 2);
    # bcq-seeds: 8 seeds x (dense + 3 variants); learned-sparsity: 2 envs x 3 seeds x (1 + 2 methods x 2)
    assert counts == {"paper-95": 72, "bc-sparsity": 114, "prune-batch": 27, "algos-95": 90, "criteria": 168,
                      "criteria-bcq": 84, "dynamic": 114, "dynamic-bcq": 39, "transfer": 12, "bcq-seeds": 32,
                      "learned-sparsity": 30}


def test_plan_counts_runs_exactly_and_estimates_from_the_probe(capsys, tmp_path, hopper_file, monkeypatch):
    from offprune import plan

    probed = []

    def fake_probe(cfg, updates=8, acts=50):
        probed.append((cfg.algo, cfg.prune, cfg.sparsity))
        # 100 updates/s, 1 ms per act, 1 ms per env step
        return plan.Probe(update_s=0.01, act_s=0.001, env_step_s=0.001), "sparse" if cfg.prune != "dense" else "dense"

    monkeypatch.setattr(plan, "probe", fake_probe)
    path = study_file(tmp_path, hopper_file)  # 1 dense + 2 sparsities, seed 0, 4 updates, eval every 2 over 1 episode
    code, out, err = run_cli(capsys, "sweep", "--config", path, "--plan", "--seeds", "0-1")
    assert code == 0, err
    assert out.splitlines()[0] == "6 runs in the sweep: 0 done, 6 to run (2 at a time)"
    assert sorted(probed) == [("bc-mlp", "dense", 0.0), ("bc-mlp", "snip", 0.5), ("bc-mlp", "snip", 0.9)]  # once per kind
    # per run: 4 updates x 0.01 s + 2 evaluations x 1 episode x 1,000 steps x 2 ms = 4.04 s; 6 runs on 2 workers
    assert "total 0.01 h of run time; wall time with --jobs 2: ~0.00 h" in out
    assert plan.run_seconds(grid(SweepConfig.build(path))[0], plan.Probe(0.01, 0.001, 0.001)) == pytest.approx(4.04)
    assert plan.wall_seconds([4.04] * 6, 2) == pytest.approx(3 * 4.04)
    assert not (tmp_path / "runs").exists()  # nothing ran

    assert run_cli(capsys, "sweep", "--config", path, "--no-progress")[0] == 0
    code, out, _ = run_cli(capsys, "sweep", "--config", path, "--plan", "--seeds", "0-1")
    assert out.splitlines()[0] == "6 runs in the sweep: 3 done, 3 to run (2 at a time)"
    # a run interrupted after its first evaluation (update 2 of 4) is counted from there: 2 updates + 1 evaluation
    cfg = grid(SweepConfig.build(path))[0]
    assert plan.run_seconds(cfg, plan.Probe(0.01, 0.001, 0.001), 2) == pytest.approx(2.02)
    monkeypatch.setattr(plan, "probe", lambda c, *a: (plan.Probe(update_s=60.0, act_s=0.0, env_step_s=0.0), "sparse"))
    lines = plan.plan([cfg], set(), 1, log=lambda m: None, started={cfg.name: 2})
    assert lines[0] == "1 runs in the sweep: 0 done, 1 to run (1 at a time), 1 of them continuing from a checkpoint"
    assert lines[2].split()[-2:] == ["2.0", "2.0"]  # min/run, min total: 2 updates left of 4, a minute each
    assert plan.plan([cfg], set(), 1, log=lambda m: None)[2].split()[-2:] == ["4.0", "4.0"]


def test_status_of_a_study_counts_runs_finished_on_another_machine(capsys, tmp_path, hopper_file):
    path = study_file(tmp_path, hopper_file)
    assert run_cli(capsys, "sweep", "--config", path, "--no-progress")[0] == 0
    code, out, _ = run_cli(capsys, "sweep", "--config", path, "--status", "--out", tmp_path / "new-machine",
                           "--seeds", "0-1")
    assert code == 0
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert lines == {"done": "3", "running": "0", "failed": "0", "left": "3"}  # seed 1 not run anywhere yet


def test_rows_written_before_a_column_existed_get_its_default_when_consolidated():
    import pandas as pd

    from offprune.results import COLUMN_DEFAULTS
    from offprune.study import _merge

    old = pd.DataFrame({"run_id": ["old", "old"], "step": [1, 2]})
    new = pd.DataFrame({"run_id": ["new"], "step": [2], "reinit": [True], "mask_transform": ["shuffle"]})
    merged = _merge(old, [new], ("run_id", "step")).set_index("run_id")
    assert merged.loc["old", "reinit"].tolist() == [COLUMN_DEFAULTS["reinit"]] * 2
    assert merged.loc["old", "mask_transform"].tolist() == ["none", "none"]
    assert merged.loc["new", "reinit"] and merged.loc["new", "mask_transform"] == "shuffle"


def test_criterion_variants_in_a_grid_become_run_options(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('algo = ["bc"]\nprune = ["snip+r10", "random+erk", "snip+shuffle+reinit", "synflow"]\n'
                    'sparsity = [0.9]\nseeds = "0"\n')
    runs = {r.name: r for r in grid(SweepConfig.build(path))}
    r10 = runs["bc_hopper-random-v5_snip_s0.9_r10_seed0"]
    assert r10.prune_rounds == 10 and r10.prune == "snip"
    assert runs["bc_hopper-random-v5_random_erk_s0.9_seed0"].scope == "erk"
    both = runs["bc_hopper-random-v5_snip_s0.9_shuffle_reinit_seed0"]
    assert both.mask_transform == "shuffle" and both.reinit
    assert runs["bc_hopper-random-v5_synflow_s0.9_r100_seed0"].prune_rounds == 100
    path.write_text('algo = ["bc"]\nprune = ["snip+masks-from", "snip+fstl"]\nsparsity = [0.95]\nseeds = "1"\n'
                    'transfer_source = "src/bc_s{sparsity}_seed{seed}"\nomega = 0.5\n')
    runs = {r.name: r for r in grid(SweepConfig.build(path))}
    assert runs["bc_hopper-random-v5_snip_s0.95_from-bc_s0.95_seed1_seed1"].masks_from == "src/bc_s0.95_seed1"
    fstl = runs["bc_hopper-random-v5_snip_s0.95_fstl-bc_s0.95_seed1_o0.5_seed1"]
    assert fstl.score_transfer == "src/bc_s0.95_seed1" and fstl.omega == 0.5
    path.write_text('algo = ["bc"]\nprune = ["snip+fstl"]\nsparsity = [0.9]\n')
    with pytest.raises(UserError, match="give the sweep a transfer_source"):
        grid(SweepConfig.build(path))
    path.write_text('algo = ["bc"]\nprune = ["snip+r0"]\nsparsity = [0.9]\n')
    with pytest.raises(UserError, match="criterion 'snip\\+r0': unknown option 'r0'"):
        grid(SweepConfig.build(path))


def test_a_sweep_over_part_of_a_study_keeps_the_studys_grid(capsys, tmp_path, hopper_file):
    """A subset (--sparsity) is consolidated under the study's own grid; runs with other settings
    (--eval-episodes) run but never enter the study's results."""
    path = study_file(tmp_path, hopper_file)
    code, out, err = run_cli(capsys, "sweep", "--config", path, "--sparsity", "0.5", "--no-progress")
    assert code == 0, err
    assert len(json.loads((tmp_path / "reports" / "runs.json").read_text())) == 3  # the file's grid, not the subset's
    consolidated = pd.read_parquet(tmp_path / "reports" / "results.parquet")
    assert sorted(consolidated.run_id.unique()) == ["bc-mlp_hopper-random-v5_dense_s0_seed0",
                                                    "bc-mlp_hopper-random-v5_snip_s0.5_seed0"]

    code, out, err = run_cli(capsys, "sweep", "--config", path, "--sparsity", "0.9", "--eval-episodes", "2",
                             "--out", tmp_path / "other", "--no-progress")
    assert code == 0, err
    assert "2 of this sweep's runs are not runs of" in err
    assert (tmp_path / "other" / "bc-mlp_hopper-random-v5_snip_s0.9_seed0").is_dir()  # it ran
    after = pd.read_parquet(tmp_path / "reports" / "results.parquet")
    pd.testing.assert_frame_equal(after, consolidated)  # and stayed out of the study
    assert len(json.loads((tmp_path / "reports" / "runs.json").read_text())) == 3


def test_a_study_readme_puts_its_text_around_the_results_tables(capsys, tmp_path, hopper_file):
    from offprune.readme import split_text

    assert split_text("ask\n---\nshow\n") == ("ask", "", "show")
    assert split_text("ask\n---\n- made by abc\n---\nshow") == ("ask", "- made by abc", "show")
    path = study_file(tmp_path, hopper_file)
    assert run_cli(capsys, "sweep", "--config", path, "--sparsity", "0.5", "--no-progress")[0] == 0  # 2 of 3 runs
    text = tmp_path / "tiny.md"
    text.write_text("# tiny: does SNIP hold?\n---\n- runs made by commit abc\n---\n## Findings\n\nNot yet.\n")
    code, out, err = run_cli(capsys, "report", tmp_path / "reports" / "results.parquet", "--out", tmp_path / "reports",
                             "--readme", text, "--bootstrap", "100")
    assert code == 0, err
    readme = (tmp_path / "reports" / "README.md").read_text()
    assert readme.startswith("# tiny: does SNIP hold?\n\n## Status\n\n2 of 3 runs of the grid are done; missing: "
                             "bc-mlp_hopper-random-v5_snip_s0.9_seed0.")
    assert f"offprune sweep --config {tmp_path / 'tiny.toml'}\n" in readme
    machine = readme[readme.index("## Machine and time"):readme.index("## Final scores")]
    assert "torch threads per run: " in machine and machine.rstrip().endswith("- runs made by commit abc")
    scores = readme[readme.index("## Final scores"):readme.index("## Paper claim")]
    assert "| bc-mlp | hopper-random-v5 | snip |" in scores and "0.9 |" not in scores  # the finished runs only
    assert readme.rstrip().endswith("## Findings\n\nNot yet.")
    code, _, err = run_cli(capsys, "report", tmp_path / "reports" / "results.parquet", "--out", tmp_path / "r2",
                           "--readme", tmp_path / "none.md", "--bootstrap", "100")
    # a missing study text fails before anything is written
    assert code == 2 and "'--readme': File" in err and "does not exist" in err and not (tmp_path / "r2").exists()
