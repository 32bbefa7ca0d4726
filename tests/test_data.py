"""The D4RL reader on files written in D4RL's exact layout, and every bad file."""

import h5py
import numpy as np
import pytest

from offprune.data import load_dataset, normalized_score, TransitionSampler
from offprune.errors import UserError

from conftest import d4rl_arrays


def test_reads_file_with_next_observations_keeping_timeouts_non_terminal(write_d4rl):
    arrays = d4rl_arrays()
    d = load_dataset(str(write_d4rl("hopper-medium-v2.hdf5", arrays)))
    assert len(d) == 12
    np.testing.assert_array_equal(d.next_observations, arrays["next_observations"])
    np.testing.assert_array_equal(d.terminals, arrays["terminals"])
    np.testing.assert_array_equal(d.timeouts, arrays["timeouts"])
    assert d.episode_starts.tolist() == [0, 3, 7]
    assert d.env_id == "Hopper-v5"  # from the D4RL name
    assert d.observations.dtype == np.float32 and d.terminals.dtype == bool
    not_done = TransitionSampler(d, "cpu", 0).not_done[:, 0].numpy()
    assert not_done[2] == 0 and not_done[6] == 1  # terminal stops bootstrapping; timeout does not


def test_reads_old_file_without_next_observations_like_qlearning_dataset(write_d4rl):
    arrays = d4rl_arrays()
    del arrays["next_observations"]
    d = load_dataset(str(write_d4rl("walker2d-random-v0.hdf5", arrays)))
    # d4rl.qlearning_dataset: i in 0..N-2, skip timeouts, next_obs = obs[i+1]
    keep = [i for i in range(11) if not arrays["timeouts"][i]]
    assert len(d) == len(keep) == 10
    np.testing.assert_array_equal(d.observations, arrays["observations"][keep])
    np.testing.assert_array_equal(d.next_observations, arrays["observations"][np.array(keep) + 1])
    np.testing.assert_array_equal(d.terminals, arrays["terminals"][keep])
    assert d.env_id == "Walker2d-v5"


def test_env_comes_from_file_attribute_before_name(write_d4rl):
    d = load_dataset(str(write_d4rl("hopper-x.hdf5", d4rl_arrays(), {"env_id": "HalfCheetah-v5"})))
    assert d.env_id == "HalfCheetah-v5"
    assert load_dataset(str(write_d4rl("mystery.hdf5", d4rl_arrays()))).env_id is None
    assert load_dataset(str(write_d4rl("mystery2.hdf5", d4rl_arrays())), env_id="Ant-v5").env_id == "Ant-v5"


def test_normalized_score_uses_d4rl_references():
    assert normalized_score("Hopper-v5", 3234.3) == pytest.approx(100.0)
    assert normalized_score("Hopper-v5", -20.272305) == pytest.approx(0.0)
    assert normalized_score("HalfCheetah-v5", (12135.0 - 280.178953) / 2) == pytest.approx(50.0)
    assert normalized_score("Walker2d-v5", 1.629008) == pytest.approx(0.0)
    assert normalized_score("Ant-v5", 3879.7) == pytest.approx(100.0)
    assert np.isnan(normalized_score("Pendulum-v1", 10.0))


def test_generated_file_has_d4rl_schema(hopper_file):
    with h5py.File(hopper_file) as f:
        for key in ("observations", "actions", "next_observations", "rewards", "infos/qpos", "infos/qvel"):
            assert f[key].dtype == np.float32, key
        assert f["terminals"].dtype == bool and f["timeouts"].dtype == bool
        assert f["observations"].shape == (400, 11) and f["actions"].shape == (400, 3)
        assert f.attrs["env_id"] == "Hopper-v5"
        assert f["timeouts"][-1] or f["terminals"][-1]  # the last episode is closed
    d = load_dataset(str(hopper_file))
    assert len(d.episode_starts) == int(d.terminals.sum() + d.timeouts.sum())


def test_name_resolves_under_offprune_datasets(monkeypatch, hopper_file):
    monkeypatch.setenv("OFFPRUNE_DATASETS", str(hopper_file.parent))
    assert load_dataset("hopper-random-v5").path == str(hopper_file)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.pop("rewards"), "missing required D4RL keys: rewards"),
        (lambda a: a.__setitem__("actions", a["actions"][:-1]), "'actions' has 11 rows"),
        (lambda a: a["observations"].__setitem__((4, 2), np.nan), "'observations' contains NaN or inf in 1 rows"),
        (lambda a: a["rewards"].__setitem__(0, np.inf), "'rewards' contains NaN or inf"),
    ],
)
def test_bad_files_raise_user_errors(write_d4rl, mutate, message):
    arrays = d4rl_arrays()
    mutate(arrays)
    with pytest.raises(UserError, match=message):
        load_dataset(str(write_d4rl("bad.hdf5", arrays)))


def test_not_hdf5_and_missing_files(tmp_path, monkeypatch, hopper_file):
    text = tmp_path / "notes.hdf5"
    text.write_text("not hdf5")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        load_dataset(str(text))
    monkeypatch.setenv("OFFPRUNE_DATASETS", str(hopper_file.parent))
    with pytest.raises(UserError, match=r"'nope' not found .*available: hopper-random-v5"):
        load_dataset("nope")
