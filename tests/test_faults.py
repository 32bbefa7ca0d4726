"""Faults a user meets: a full disk, corrupt checkpoints, crashes between writes, reruns with
another budget, two writers, a killed sweep's workers, output that is not a terminal."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from offprune import atomic, checkpoint
from offprune.results import load

from conftest import run_cli


def bc_mlp(hopper_file, out, *extra):
    return ("run", "--algo", "bc-mlp", "--sparsity", "0.9", "--dataset", str(hopper_file), "--out", str(out),
            "--steps", "4", "--eval-every", "2", "--eval-episodes", "1", "--no-progress", *extra)


RUN = "bc-mlp_hopper-random-v5_snip_s0.9_seed0"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".new"))


def test_the_atomic_writer_names_the_file_and_leaves_no_temporary(tmp_path):
    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(atomic.WriteError, match=f"cannot write {target}: No space left on device"):
        atomic.write_with(target, full)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder should be
    with pytest.raises(atomic.WriteError, match="cannot write .*file/y.json: "):
        atomic.write_json(blocker / "y.json", {})


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs (root may mount one); skipped where mounting is not permitted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_no_row_without_its_checkpoint(capsys, small_disk, hopper_file):
    # BCQ's checkpoint (~12 MB) cannot fit; masks (~1 MB), scores (~5 MB) and layers do
    code, _, err = run_cli(capsys, "run", "--algo", "bcq", "--sparsity", "0.95", "--dataset", hopper_file,
                           "--out", small_disk, "--steps", "2", "--eval-every", "1", "--eval-episodes", "1",
                           "--kernels", "dense", "--no-progress")
    assert code == 2 and err.count("\n") == 1, err
    assert "cannot write" in err and "checkpoint.pt: No space left on device" in err
    run_dir = small_disk / "bcq_hopper-random-v5_snip_s0.95_seed0"
    assert leftovers(small_disk) == []  # no temporary keeps the disk full
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "results.parquet").exists()


def test_a_row_is_written_after_its_checkpoint_and_recovered_from_it(capsys, tmp_path, hopper_file, monkeypatch):
    from offprune import train

    calls = {"n": 0}
    real = train.append_rows

    def crash_on_second(path, rows):
        calls["n"] += 1
        if calls["n"] == 2:  # the process dies after checkpoint 2 was saved, before its row
            raise KeyboardInterrupt
        return real(path, rows)

    monkeypatch.setattr(train, "append_rows", crash_on_second)
    assert run_cli(capsys, *bc_mlp(hopper_file, tmp_path))[0] == 130
    run_dir = tmp_path / RUN
    assert list(pd.read_parquet(run_dir / "results.parquet").step) == [2]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 4
    monkeypatch.setattr(train, "append_rows", real)
    code, _, err = run_cli(capsys, *bc_mlp(hopper_file, tmp_path, "--resume"))
    assert code == 0, err
    assert "wrote the results row of step 4" in err
    assert list(pd.read_parquet(run_dir / "results.parquet").step) == [2, 4]


def test_an_unreadable_checkpoint_falls_back_one_generation(capsys, tmp_path, hopper_file):
    args = bc_mlp(hopper_file, tmp_path)
    assert run_cli(capsys, *args)[0] == 0
    run_dir = tmp_path / RUN
    assert torch.load(run_dir / "checkpoint.prev.pt", weights_only=False)["step"] == 2
    data = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated
    args = list(args)
    args[args.index("--steps") + 1] = "6"
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err
    assert "resuming from checkpoint.prev.pt (step 2)" in err
    rows = pd.read_parquet(run_dir / "results.parquet")
    assert list(rows.step) == [2, 4, 6] and not rows.duplicated("step").any()


def test_no_readable_checkpoint_is_one_line_and_config_untouched(capsys, tmp_path, hopper_file):
    args = bc_mlp(hopper_file, tmp_path)
    assert run_cli(capsys, *args)[0] == 0
    run_dir = tmp_path / RUN
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run_dir / name).write_bytes(b"garbage")
    config = (run_dir / "config.json").read_bytes()
    args = list(args)
    args[args.index("--steps") + 1] = "6"
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and err.count("\n") == 1
    assert f"cannot read the checkpoint of {run_dir}" in err and "move it aside" in err
    assert (run_dir / "config.json").read_bytes() == config  # --steps 6 not recorded: nothing resumed


def test_a_sweep_moves_an_unreadable_checkpoint_aside_and_restarts(capsys, tmp_path, hopper_file):
    sweep = ("sweep", "--algo", "bc-mlp", "--prune", "snip", "--sparsity", "0.9", "--dataset", hopper_file,
             "--seeds", "0", "--steps", "4", "--eval-every", "2", "--eval-episodes", "1", "--kernels", "dense",
             "--jobs", "1", "--out", tmp_path, "--no-progress")
    assert run_cli(capsys, *sweep)[0] == 0
    run_dir = tmp_path / RUN
    before = pd.read_parquet(run_dir / "results.parquet")
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run_dir / name).write_bytes(b"garbage")
    (run_dir / "status.json").write_text('{"state": "left"}')
    code, out, err = run_cli(capsys, *sweep, "--steps", "6")
    assert code == 0, err
    assert "unreadable checkpoint moved aside" in err and "restarting it from scratch" in err
    assert len(list(run_dir.glob("checkpoint.pt.unreadable-*"))) == 1
    after = pd.read_parquet(run_dir / "results.parquet")
    assert list(after.step) == [2, 4, 6]
    # restarted from scratch with the same seed: the same numbers as the first time
    pd.testing.assert_series_equal(after.normalized_score[:2], before.normalized_score)


def test_a_sweep_extends_finished_runs_and_refuses_a_smaller_budget(capsys, tmp_path, hopper_file):
    sweep = ["sweep", "--algo", "bc-mlp", "--prune", "snip", "--sparsity", "0.9", "--dataset", hopper_file,
             "--seeds", "0", "--steps", "4", "--eval-every", "2", "--eval-episodes", "1", "--kernels", "dense",
             "--jobs", "2", "--out", tmp_path, "--no-progress"]
    assert run_cli(capsys, *sweep)[0] == 0
    sweep[sweep.index("--steps") + 1] = "6"
    code, out, err = run_cli(capsys, *sweep)
    assert code == 0 and "2 done" in out, err
    rows = load(tmp_path)
    assert rows.groupby("run_id").step.max().tolist() == [6, 6]  # the dense baseline too
    assert len(rows) == 2 * 3
    sweep[sweep.index("--steps") + 1] = "2"
    code, _, err = run_cli(capsys, *sweep)
    assert code == 2 and err.count("\n") == 1 and "has trained 6 updates, more than --steps 2" in err


def test_a_second_writer_of_a_run_is_refused(capsys, tmp_path, hopper_file):
    run_dir = tmp_path / RUN
    with checkpoint.locked(run_dir):
        code, _, err = run_cli(capsys, *bc_mlp(hopper_file, tmp_path))
    assert code == 2 and err.count("\n") == 1 and "is being written by another process" in err
    assert not (run_dir / "config.json").exists()


def test_without_a_terminal_a_run_prints_a_line_per_evaluation(capsys, tmp_path, hopper_file):
    args = [a for a in bc_mlp(hopper_file, tmp_path) if a != "--no-progress"]
    code, _, err = run_cli(capsys, *args)  # pytest's captured stderr is not a terminal
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith(f"{RUN}: step")]
    assert [line.split(",")[0] for line in lines] == [f"{RUN}: step 2/4", f"{RUN}: step 4/4"]


@pytest.mark.slow
def test_sweep_workers_end_when_the_sweep_dies(tmp_path, hopper_file):
    args = ["sweep", "--algo", "bc-mlp", "--prune", "snip", "--sparsity", "0.9", "--dataset", str(hopper_file),
            "--seeds", "0", "--steps", "100000", "--eval-every", "50000", "--eval-episodes", "1",
            "--kernels", "dense", "--jobs", "2", "--out", str(tmp_path), "--no-progress"]
    sweep = subprocess.Popen([sys.executable, "-m", "offprune.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})

    def children() -> list[int]:
        found = []
        for task in Path(f"/proc/{sweep.pid}/task").glob("*"):
            found += [int(c) for c in (task / "children").read_text().split()]
        return found

    deadline = time.time() + 60
    while time.time() < deadline and not any(checkpoint.is_locked(p) for p in tmp_path.glob("*") if p.is_dir()):
        time.sleep(0.2)
    workers = [pid for pid in children() if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert workers, "no worker started"
    os.kill(sweep.pid, signal.SIGKILL)  # the parent alone, as a crash or an OOM kill would
    sweep.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and
                                         "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                                         for pid in workers):
        time.sleep(0.2)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == [], "workers outlived their sweep"


def test_a_damaged_results_file_is_one_line_for_run_and_restarted_by_a_sweep(capsys, tmp_path, hopper_file):
    args = list(bc_mlp(hopper_file, tmp_path))
    assert run_cli(capsys, *args)[0] == 0
    run_dir = tmp_path / RUN
    (run_dir / "results.parquet").write_text("garbage")
    args[args.index("--steps") + 1] = "6"
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and err.count("\n") == 1 and f"cannot read {run_dir / 'results.parquet'}" in err

    sweep = ("sweep", "--algo", "bc-mlp", "--prune", "snip", "--sparsity", "0.9", "--dataset", hopper_file,
             "--seeds", "0", "--steps", "6", "--eval-every", "2", "--eval-episodes", "1", "--jobs", "1",
             "--out", tmp_path, "--no-progress")
    code, _, err = run_cli(capsys, *sweep)
    assert code == 0, err
    assert "unreadable results file moved aside" in err
    assert list(pd.read_parquet(run_dir / "results.parquet").step) == [2, 4, 6]
    assert len(list(run_dir.glob("results.parquet.unreadable-*"))) == 1


def test_a_damaged_sweep_manifest_is_one_line(capsys, tmp_path):
    (tmp_path / "sweep.json").write_text("[")
    code, _, err = run_cli(capsys, "sweep", "--status", "--out", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "sweep.json is not valid JSON" in err


def test_results_read_while_another_process_rewrites_them_are_whole(tmp_path):
    """A report or sweep reading results.parquet while a run replaces it (atomically, by rename)
    reads one version of the file, never a mix of two (reading by path reopened the file)."""
    path = tmp_path / "run" / "results.parquet"
    path.parent.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", f"""
import time, numpy as np, pandas as pd
from offprune.results import write_parquet_atomic
from pathlib import Path
end, i = time.time() + 3, 0
while time.time() < end:
    i += 1
    write_parquet_atomic(pd.DataFrame({{"run_id": ["r"] * (i % 40 + 1), "step": np.arange(i % 40 + 1)}}),
                         Path({str(path)!r}))
"""])
    reads = 0
    try:
        deadline = time.time() + 2.5
        while time.time() < deadline:
            if path.exists():
                rows = load(path)
                assert list(rows["step"]) == list(range(len(rows)))  # one whole version
                reads += 1
    finally:
        writer.wait(timeout=30)
    assert writer.returncode == 0 and reads > 50
