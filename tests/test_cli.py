"""`offprune run` end to end on a tiny Hopper-v5 dataset, and every user mistake."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from offprune.results import load, load_layers

from conftest import d4rl_arrays, run_cli


offprune = run_cli


def quick(hopper_file, out, *extra):
    return ("run", "--dataset", str(hopper_file), "--out", str(out), "--eval-episodes", "1", "--no-progress", *extra)


def test_bcq_snip_run_writes_rows_masks_and_resumes_without_duplicates(capsys, tmp_path, hopper_file):
    args = quick(hopper_file, tmp_path, "--algo", "bcq", "--sparsity", "0.95", "--steps", "4", "--eval-every", "2")
    code, out, err = offprune(capsys, *args)
    assert code == 0, err
    assert "realised sparsity: 0.9500 overall; actor 0.9500, critic 0.9500, vae 0.9500" in out
    run_dir = tmp_path / "bcq_hopper-random-v5_snip_s0.95_seed0"
    for f in ("config.json", "masks.pt", "checkpoint.pt", "results.parquet", "layers.parquet"):
        assert (run_dir / f).exists(), f
    rows = load(tmp_path)
    assert rows.step.tolist() == [2, 4]
    assert set(rows.run_id) == {run_dir.name}
    assert (rows.realised_sparsity == 0.95).all() and (rows.sparsity_vae == 0.95).all()
    for col in ("algo", "dataset", "env_id", "prune", "target_sparsity", "seed", "return_mean", "normalized_score",
                "loss_critic_loss", "loss_actor_loss", "loss_vae_loss", "steps_per_s", "train_seconds",
                "torch_version", "gymnasium_version", "mujoco_version", "offprune_version", "device"):
        assert col in rows.columns, col
    assert np.isfinite(rows.normalized_score).all()
    layers = load_layers(run_dir)
    assert layers.kept.sum() == rows.kept_weights.iloc[0]
    assert int(layers[layers.network == "critic"].total.sum()) == 400 * 14 + 400 * 300 + 300

    # resume to more steps: new rows only; resuming a finished run adds nothing
    assert offprune(capsys, *args[:-4], "--steps", "6", "--eval-every", "2", "--resume")[0] == 0
    assert offprune(capsys, *args[:-4], "--steps", "6", "--eval-every", "2", "--resume")[0] == 0
    assert load(tmp_path).step.tolist() == [2, 4, 6]


def test_resumed_run_continues_exactly(capsys, tmp_path, hopper_file):
    base = quick(hopper_file, tmp_path, "--algo", "bcq", "--prune", "grasp", "--sparsity", "0.9", "--eval-every", "3",
                 "--kernels", "sparse")
    assert offprune(capsys, *base, "--steps", "6", "--run-id", "straight")[0] == 0
    assert offprune(capsys, *base, "--steps", "3", "--run-id", "split")[0] == 0
    assert offprune(capsys, *base, "--steps", "6", "--run-id", "split", "--resume")[0] == 0
    rows = load(tmp_path).set_index(["run_id", "step"])
    for col in ("loss_critic_loss", "loss_actor_loss", "loss_vae_loss", "return_mean"):
        assert rows.loc[("split", 6), col] == pytest.approx(rows.loc[("straight", 6), col], rel=1e-6), col


@pytest.mark.parametrize("algo, prune", [("bc", "snip"), ("bc-mlp", "grasp"), ("bc", "dense")])
def test_bc_runs(capsys, tmp_path, hopper_file, algo, prune):
    sparsity = ["--sparsity", "0"] if prune == "dense" else ["--sparsity", "0.9"]
    code, out, err = offprune(capsys, *quick(hopper_file, tmp_path, "--algo", algo, "--prune", prune, *sparsity,
                                             "--steps", "3"))
    assert code == 0, err
    rows = load(tmp_path)
    assert len(rows) == 1 and rows.step.iloc[0] == 3
    assert rows.realised_sparsity.iloc[0] == pytest.approx(0.0 if prune == "dense" else 0.9, abs=1e-6)


def test_layer_collapse_is_warned(capsys, tmp_path):
    # Magnitude at init with one global threshold empties BCQ actor's 2nd and 3rd layers at 95% for
    # 17-dim states and 6-dim actions (HalfCheetah), as the reference facts record.
    from offprune.data import write_d4rl_file

    path = write_d4rl_file(tmp_path / "halfcheetah-synthetic.hdf5", d4rl_arrays(n=50, obs_dim=17, act_dim=6))
    code, out, err = offprune(capsys, *quick(path, tmp_path, "--algo", "bcq", "--prune", "magnitude",
                                             "--sparsity", "0.95", "--steps", "1"))
    assert code == 0, err
    assert "warning: layer collapse: actor net.2.weight keeps 0 of 120000 weights" in err
    assert "warning: layer collapse: actor net.4.weight keeps 0 of 1800 weights" in err
    assert "collapsed layers: actor/net.2.weight, actor/net.4.weight" in out


def bad_file(tmp_path, name, mutate):
    from offprune.data import write_d4rl_file

    arrays = d4rl_arrays(n=20)
    mutate(arrays)
    return str(write_d4rl_file(tmp_path / name, arrays))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--algo", "sac"], "Invalid value for '--algo': 'sac' is not one of"),
        (["--prune", "obd"], "Invalid value for '--prune': 'obd' is not one of"),
        (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
        (["--sparsity", "-0.2"], "--sparsity must be in [0, 1)"),
        (["--sparsity", "nan"], "--sparsity must be in [0, 1)"),
        (["--sparsity", "lots"], "'lots' is not a valid float"),
        (["--prune", "dense", "--sparsity", "0.5"], "--prune dense removes no weights"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--seed", "-1"], "seed must be a whole number in [0, 4294967295]"),
        (["--seed", str(2**32)], "seed must be a whole number in [0, 4294967295]"),
        (["--dataset", "hopper-nope-v2"], "dataset 'hopper-nope-v2' not found"),
        (["--env", "NotAnEnv-v9"], "cannot make environment 'NotAnEnv-v9'"),
        (["--env", "Walker2d-v5"], "pass --env with the matching environment"),
        (["--device", "cuda:7"], "device 'cuda:7' requested but torch sees no CUDA GPU"),
        (["--drop-fraction", "0.5"], "--drop-fraction applies to --prune set / rigl, not snip"),
        (["--prune", "gmp", "--prune-every", "10", "--drop-fraction", "0.5"], "--drop-fraction applies to --prune set / rigl, not gmp"),
        (["--omega", "0.5"], "--omega weighs a transfer: it needs --score-transfer or --weight-transfer"),
    ],
)
def test_bad_flags_end_in_one_line(capsys, tmp_path, hopper_file, args, message):
    code, out, err = offprune(capsys, *quick(hopper_file, tmp_path, "--steps", "1", *args))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("offprune: error:") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "bcq_hopper-random-v5_snip_s0.9_seed0" / "results.parquet").exists()


def test_resume_without_a_checkpoint_says_it_starts_from_scratch(capsys, tmp_path, hopper_file):
    code, out, err = offprune(capsys, *quick(hopper_file, tmp_path, "--algo", "bc", "--steps", "1", "--resume"))
    assert code == 0, err
    assert "bc_hopper-random-v5_snip_s0.9_seed0: no checkpoint in" in err and "starting at step 0" in err
    assert load(tmp_path).step.tolist() == [1]


def test_a_mistyped_env_fails_before_the_default_dataset_is_generated(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFPRUNE_DATASETS", str(tmp_path / "datasets"))
    code, out, err = offprune(capsys, "run", "--env", "NotAnEnv-v9", "--out", str(tmp_path), "--no-progress")
    assert code == 2 and err.startswith("offprune: error: cannot make environment 'NotAnEnv-v9'"), err
    assert not (tmp_path / "datasets").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.pop("terminals"), "missing required D4RL keys: terminals"),
        (lambda a: a.__setitem__("rewards", a["rewards"][:5]), "'observations' has 20 rows but 'rewards' has 5"),
        (lambda a: a["actions"].__setitem__((3, 1), np.nan), "'actions' contains NaN or inf"),
    ],
)
def test_bad_dataset_files_end_in_one_line(capsys, tmp_path, mutate, message):
    path = bad_file(tmp_path, "hopper-bad.hdf5", mutate)
    code, _, err = offprune(capsys, "run", "--dataset", path, "--out", str(tmp_path / "runs"), "--steps", "1")
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_not_hdf5_and_unwritable_out(capsys, tmp_path, hopper_file):
    junk = tmp_path / "hopper-junk.hdf5"
    junk.write_bytes(b"\x00garbage" * 100)
    code, _, err = offprune(capsys, "run", "--dataset", str(junk), "--steps", "1", "--out", str(tmp_path))
    assert code == 2 and "not a readable HDF5 file" in err and err.count("\n") == 1
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, _, err = offprune(capsys, *quick(hopper_file, blocker, "--steps", "1"))
    assert code == 2 and f"results folder {blocker} is not writable" in err and err.count("\n") == 1


def test_existing_run_is_never_clobbered(capsys, tmp_path, hopper_file):
    args = quick(hopper_file, tmp_path, "--algo", "bc-mlp", "--steps", "2")
    assert offprune(capsys, *args)[0] == 0
    results = tmp_path / "bc-mlp_hopper-random-v5_snip_s0.9_seed0" / "results.parquet"
    before = results.read_bytes()

    code, _, err = offprune(capsys, *args)
    assert code == 2 and "already exists" in err and "--resume" in err
    code, _, err = offprune(capsys, *args, "--prune-batch", "7", "--resume",
                            "--run-id", "bc-mlp_hopper-random-v5_snip_s0.9_seed0")
    assert code == 2 and "config differs (prune_batch: None -> 7" in err and err.count("\n") == 1
    assert results.read_bytes() == before
    assert len(pd.read_parquet(results)) == 1


def test_console_script_prints_one_line_on_error():
    proc = subprocess.run([sys.executable, "-m", "offprune.cli", "run", "--sparsity", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["offprune: error: --sparsity must be in [0, 1) "
                                                "(the fraction of weights removed), got 2.0"]


def test_help_states_the_defaults_the_code_uses(capsys):
    from offprune.algos import ALGOS
    from offprune.prune import DEFAULT_PRUNE_BATCH

    for command in ("run", "sweep"):
        code, out, _ = offprune(capsys, command, "--help")
        flat = " ".join(out.split())
        assert code == 0
        for method, size in DEFAULT_PRUNE_BATCH.items():  # the pruning batch defaults, from the code
            assert f"{size} for {method}" in flat, (command, method)
        for algo in ALGOS:  # every algorithm is named
            assert algo in flat, (command, algo)


def test_diverged_training_stops_with_one_line_and_keeps_last_checkpoint(capsys, tmp_path, hopper_file, monkeypatch):
    from offprune.algos import bc_mlp

    args = quick(hopper_file, tmp_path, "--algo", "bc-mlp", "--eval-every", "2")
    assert offprune(capsys, *args, "--steps", "2")[0] == 0
    monkeypatch.setattr(bc_mlp.Agent, "update", lambda self, batch: {"policy_loss": float("nan")})
    code, _, err = offprune(capsys, *args, "--steps", "4", "--resume")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("offprune: error:") and "Traceback" not in err
    assert "training diverged at step 3: policy_loss not finite" in err
    assert "up to step 2 are kept" in err
    assert load(tmp_path).step.tolist() == [2]


def test_datasets_make_and_list(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFPRUNE_DATASETS", str(tmp_path))
    code, out, err = offprune(capsys, "datasets", "make", "hopper", "--transitions", "50")
    assert code == 0, err
    assert "hopper-random-v5.hdf5: 50 transitions" in out
    code, _, err = offprune(capsys, "datasets", "make", "hopper", "--transitions", "50")
    assert code == 2 and "exists; pass --overwrite" in err
    code, out, _ = offprune(capsys, "datasets", "list")
    assert code == 0 and "hopper-random-v5" in out and "Hopper-v5" in out and " 50 " in out
    code, _, err = offprune(capsys, "datasets", "make", "pendulum")
    assert code == 2 and "Invalid value for 'ENV'" in err


def test_prune_rounds_rescore_and_are_recorded(capsys, tmp_path, hopper_file):
    import torch

    args = quick(hopper_file, tmp_path, "--algo", "bc-mlp", "--sparsity", "0.95", "--steps", "1")
    assert offprune(capsys, *args)[0] == 0
    assert offprune(capsys, *args, "--prune-rounds", "4")[0] == 0
    rows = load(tmp_path).set_index("run_id")
    assert rows.loc["bc-mlp_hopper-random-v5_snip_s0.95_r4_seed0", "prune_rounds"] == 4
    assert rows.loc["bc-mlp_hopper-random-v5_snip_s0.95_seed0", "prune_rounds"] == 1
    one = torch.load(tmp_path / "bc-mlp_hopper-random-v5_snip_s0.95_seed0" / "masks.pt")["policy"]
    four = torch.load(tmp_path / "bc-mlp_hopper-random-v5_snip_s0.95_r4_seed0" / "masks.pt")["policy"]
    assert sum(int(m.sum()) for m in one.values()) == sum(int(m.sum()) for m in four.values())  # same k
    assert any(not torch.equal(one[k], four[k]) for k in one)  # but re-scored
    code, _, err = offprune(capsys, *args, "--prune-rounds", "0")
    assert code == 2 and "--prune-rounds must be a whole number of at least 1" in err


def test_a_run_saved_before_a_new_config_field_still_resumes(capsys, tmp_path, hopper_file):
    import json

    args = quick(hopper_file, tmp_path, "--algo", "bc-mlp", "--sparsity", "0.9", "--steps", "2", "--eval-every", "1")
    assert offprune(capsys, *args)[0] == 0
    config = tmp_path / "bc-mlp_hopper-random-v5_snip_s0.9_seed0" / "config.json"
    saved = json.loads(config.read_text())
    del saved["prune_rounds"]  # as an older offprune wrote it
    config.write_text(json.dumps(saved))
    args = list(args)
    args[args.index("--steps") + 1] = "3"
    code, _, err = offprune(capsys, *args, "--resume")
    assert code == 0, err
    assert list(load(tmp_path).step) == [1, 2, 3]
