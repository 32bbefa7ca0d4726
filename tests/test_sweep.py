"""Sweeps: grid expansion, local execution, resume without duplicates, failures recorded."""

import json
from pathlib import Path

import pytest

from offprune.config import RunConfig
from offprune.errors import UserError
from offprune.results import load
from offprune.sweep import expand_grid, parse_list, status

from conftest import run_cli


def test_parse_lists_and_ranges():
    assert parse_list("0-4", int) == [0, 1, 2, 3, 4]
    assert parse_list("0,3,7", int) == [0, 3, 7]
    assert parse_list("0.1, 0.95", float) == [0.1, 0.95]
    assert parse_list("bc,bcq") == ["bc", "bcq"]
    with pytest.raises(UserError, match="'x' is not a valid float"):
        parse_list("0.1,x", float)
    with pytest.raises(UserError, match="range '5-2' is empty"):
        parse_list("5-2", int)
    with pytest.raises(UserError, match="'a-b' is not a valid int or range"):
        parse_list("a-b", int)


def test_grid_adds_one_dense_baseline_per_algo_dataset_seed():
    runs = expand_grid(["bc", "bcq"], ["d1", "d2"], [0, 1, 2], ["snip", "grasp", "dense"], [0.0, 0.5, 0.9],
                       RunConfig(steps=10))
    assert len(runs) == 2 * 2 * 3 * (1 + 2 * 2)
    dense = [r for r in runs if r.prune == "dense"]
    assert len(dense) == 12 and all(r.sparsity == 0 for r in dense)
    assert {(r.prune, r.sparsity) for r in runs if r.algo == "bc" and r.dataset == "d1" and r.seed == 0} == {
        ("dense", 0.0), ("snip", 0.5), ("snip", 0.9), ("grasp", 0.5), ("grasp", 0.9)}
    assert all(r.steps == 10 for r in runs)
    assert len({r.name for r in runs}) == len(runs)


def test_empty_grid_and_bad_values_are_user_errors():
    with pytest.raises(UserError, match="grid is empty"):
        expand_grid(["bc"], ["d"], [0], ["dense"], [0.5], RunConfig())
    with pytest.raises(UserError, match="unknown algo 'sac'"):
        expand_grid(["sac"], ["d"], [0], ["snip"], [0.5], RunConfig())
    with pytest.raises(UserError, match="--sparsity must be in"):
        expand_grid(["bc"], ["d"], [0], ["snip"], [1.5], RunConfig())


def sweep_args(tmp_path, dataset, *extra):
    return ("sweep", "--algo", "bc-mlp", "--prune", "snip", "--sparsity", "0.5,0.9", "--dataset", str(dataset),
            "--seeds", "0-1", "--steps", "4", "--eval-every", "2", "--eval-episodes", "1", "--kernels", "dense",
            "--jobs", "2", "--out", str(tmp_path / "sw"), "--no-progress", *extra)


def test_missing_dataset_fails_before_any_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, *sweep_args(tmp_path, tmp_path / "nope.hdf5"))
    assert code == 2 and "dataset file not found" in err and err.count("\n") == 1
    assert not (tmp_path / "sw").exists()


def test_sweep_runs_all_resumes_without_duplicates(capsys, tmp_path, hopper_file):
    # an interrupted run: the dense baseline of seed 0 stopped after its first evaluation
    first = run_cli(capsys, "run", "--algo", "bc-mlp", "--prune", "dense", "--sparsity", "0", "--kernels", "dense",
                   "--dataset", str(hopper_file), "--steps", "2", "--eval-every", "2", "--eval-episodes", "1", "--threads", "1",
                   "--out", str(tmp_path / "sw"), "--no-progress")
    assert first[0] == 0

    code, out, err = run_cli(capsys, *sweep_args(tmp_path, hopper_file))
    assert code == 0, err
    assert "6 done, 0 failed" in out
    rows = load(tmp_path / "sw")
    assert len(rows) == 6 * 2 and not rows.duplicated(["run_id", "step"]).any()
    assert set(rows.step) == {2, 4}
    assert sorted(rows.drop_duplicates("run_id").prune) == ["dense", "dense"] + ["snip"] * 4

    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "sw").rglob("results.parquet")}
    code, out, _ = run_cli(capsys, *sweep_args(tmp_path, hopper_file))
    assert code == 0 and "6 done" in out
    assert {p: p.stat().st_mtime for p in (tmp_path / "sw").rglob("results.parquet")} == mtimes  # skipped
    assert len(load(tmp_path / "sw")) == 12

    code, out, _ = run_cli(capsys, "sweep", "--status", "--out", str(tmp_path / "sw"))
    assert code == 0 and out.splitlines()[0].split() == ["done", "6"]


def test_a_failed_run_is_recorded_and_the_others_finish(capsys, tmp_path, hopper_file):
    bad = tmp_path / "hopper-broken.hdf5"
    bad.write_bytes(b"not hdf5 at all")
    args = list(sweep_args(tmp_path, f"{hopper_file},{bad}"))
    args[args.index("--seeds") + 1] = "0"
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and "3 run(s) failed" in err
    assert "3 done, 3 failed" in out
    groups = status(str(tmp_path / "sw"))
    assert len(groups["done"]) == 3 and len(groups["failed"]) == 3
    failed_dir = tmp_path / "sw" / groups["failed"][0]
    assert "not a readable HDF5 file" in json.loads((failed_dir / "status.json").read_text())["error"]
    assert len(load(tmp_path / "sw")) == 3 * 2


def test_config_file_sets_the_grid_and_flags_override_it(tmp_path):
    from offprune.config import SweepConfig
    from offprune.sweep import grid

    path = tmp_path / "sweep.toml"
    path.write_text('algo = ["bc", "bcq"]\nprune = "snip"\nsparsity = [0.5, 0.9]\nseeds = "0-1"\n'
                    'dataset = "d1"\nsteps = 7\neval-every = 7\n')
    cfg = SweepConfig.build(path, steps=3, eval_every=3)
    assert cfg.algo == ("bc", "bcq") and cfg.sparsity == (0.5, 0.9) and cfg.seeds == (0, 1) and cfg.steps == 3
    runs = grid(cfg)
    assert len(runs) == 2 * 2 * (1 + 2) and all(r.steps == 3 and r.threads == 1 for r in runs)
    assert SweepConfig.build(path, algo="bc").algo == ("bc",)  # a flag replaces the file's list
    assert SweepConfig.build(None, profile="paper").base_run().steps == 1_000_000


@pytest.mark.parametrize("text, message", [
    ('algo = "bc"\nsparsities = [0.5]\n', "unknown key 'sparsities' in"),
    ("algo = [bc\n", "is not valid TOML"),
    ('executor = "slurm"\n', "unknown executor 'slurm'"),
    ('ray_address = "h:1"\n', "--ray-address needs --executor ray"),
])
def test_bad_config_files_are_one_line_errors(capsys, tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    code, _, err = run_cli(capsys, "sweep", "--config", path, "--out", tmp_path / "sw")
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "sw").exists()


def test_ray_errors_say_what_to_do(capsys, tmp_path, hopper_file, monkeypatch):
    code, _, err = run_cli(capsys, *sweep_args(tmp_path, hopper_file, "--executor", "ray", "--ray-address", "127.0.0.1:1"))
    assert code == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in err and err.count("\n") == 1
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    code, _, err = run_cli(capsys, *sweep_args(tmp_path, hopper_file, "--executor", "ray"))
    assert code == 2 and "pip install 'ray>=2.9'" in err


@pytest.mark.slow
def test_ray_executor_on_a_local_instance(capsys, tmp_path, hopper_file):
    pytest.importorskip("ray")
    args = list(sweep_args(tmp_path, hopper_file, "--executor", "ray"))
    args[args.index("--seeds") + 1] = "0"
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "3 done, 0 failed" in out
    rows = load(tmp_path / "sw")
    assert len(rows) == 3 * 2 and not rows.duplicated(["run_id", "step"]).any()


@pytest.mark.slow
def test_a_killed_sweep_resumes_from_checkpoints_without_duplicates(capsys, tmp_path, hopper_file):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = list(sweep_args(tmp_path, hopper_file))
    args[args.index("--steps") + 1] = "1500"
    args[args.index("--eval-every") + 1] = "250"
    args[args.index("--jobs") + 1] = "1"
    sweep = subprocess.Popen([sys.executable, "-m", "offprune.cli", *args], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    deadline = time.time() + 120
    while time.time() < deadline and not any(
            len(load(p)) >= 2 for p in (tmp_path / "sw").glob("*/results.parquet")):
        time.sleep(0.2)
    os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and its workers, mid-run
    sweep.wait()
    partial = {p.parent.name: load(p) for p in (tmp_path / "sw").glob("*/results.parquet")}
    unfinished = {name: rows for name, rows in partial.items() if rows.step.max() < 1500}
    assert unfinished, "the kill came after every run had finished; nothing was tested"
    deadline = time.time() + 10  # SIGKILLed workers release their run locks once the kernel reaps them
    while status(str(tmp_path / "sw"))["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert status(str(tmp_path / "sw"))["running"] == []  # dead runs are not shown as running

    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "6 done, 0 failed" in out
    rows = load(tmp_path / "sw")
    assert len(rows) == 6 * 6 and not rows.duplicated(["run_id", "step"]).any()
    for name, before in unfinished.items():  # continued from its checkpoint: the first rows were kept as they were
        after = rows[rows.run_id == name].set_index("step")
        assert (after.loc[before.step, "timestamp"].to_numpy() == before.timestamp.to_numpy()).all()


def test_an_algorithm_refines_the_profile_of_its_sweep_runs():
    from offprune.config import SweepConfig
    from offprune.sweep import grid

    runs = grid(SweepConfig.build(None, algo="dreamer,bc", prune="snip", sparsity="0.9", seeds="0"))
    by_algo = {(r.algo, r.prune): r for r in runs}
    dreamer = by_algo[("dreamer", "snip")]
    assert (dreamer.steps, dreamer.eval_every) == (2_000, 500)
    assert dreamer.algo_config().batch_size == 8 and dreamer.algo_config().imag_starts == 128
    assert by_algo[("bc", "snip")].steps == 5_000 and by_algo[("bc", "snip")].algo_options == ()
    assert SweepConfig.build(None, algo="dreamer", steps=7).base_run("dreamer").steps == 7  # a flag still wins


def test_the_summary_counts_this_sweeps_grid_when_another_sweep_shares_the_folder(capsys, tmp_path, hopper_file,
                                                                                   monkeypatch):
    import offprune.sweep as sw

    execute = sw.execute

    def execute_then_another_sweep_starts(runs, out, *args):
        errors = execute(runs, out, *args)
        from offprune import atomic  # a second study writes its (one-run) grid to the shared folder
        atomic.write_json(Path(out) / sw.MANIFEST, [runs[0].to_dict()])
        return errors

    monkeypatch.setattr(sw, "execute", execute_then_another_sweep_starts)
    code, out, err = run_cli(capsys, *sweep_args(tmp_path, hopper_file))
    assert code == 0, err
    assert "6 done, 0 failed, 0 not finished" in out
