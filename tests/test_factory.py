"""Dataset factory: behaviour training (tiny budget), every quality, manifest, verify, Minari import."""

import json

import h5py
import numpy as np
import pytest

from offprune.data import behaviour, load_dataset
from offprune.data.manifest import MANIFEST, verify
from offprune.envs import make_env
from offprune.errors import UserError

from conftest import run_cli


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    """A datasets folder with a tiny SAC behaviour training (real updates after step 200) and
    every quality made from it."""
    folder = tmp_path_factory.mktemp("datasets")
    mp = pytest.MonkeyPatch()
    mp.setenv("OFFPRUNE_DATASETS", str(folder))
    mp.setattr(behaviour, "SAC_LEARNING_STARTS", 200)
    from offprune.data.generate import make_dataset

    behaviour.train_behaviour("hopper", "sac", 400, None, seed=0, eval_every=100, log=lambda m: None)
    paths = {q: make_dataset("hopper", q, 300, 0, folder / f"hopper-{q}-v5.hdf5", "sac", progress=False)
             for q in ("random", "medium", "expert", "medium-replay", "medium-expert")}
    yield folder, paths
    mp.undo()


def read_all(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, o: out.__setitem__(k, o[()]) if isinstance(o, h5py.Dataset) else None)
        attrs = dict(f.attrs)
    return out, attrs


def test_files_have_d4rls_layout_dtypes_and_provenance(factory):
    _, paths = factory
    for quality, path in paths.items():
        arrays, attrs = read_all(path)
        n = len(arrays["rewards"])
        for key in ("observations", "actions", "next_observations", "rewards", "infos/qpos", "infos/qvel",
                    "infos/action_log_probs"):
            assert arrays[key].dtype == np.float32 and len(arrays[key]) == n, (quality, key)
        assert arrays["terminals"].dtype == bool and arrays["timeouts"].dtype == bool
        assert arrays["observations"].shape == (n, 11) and arrays["actions"].shape == (n, 3)
        assert attrs["quality"] == quality and attrs["env_id"] == "Hopper-v5" and "mujoco_version" in attrs
        assert not (arrays["terminals"] & arrays["timeouts"]).any()
        assert arrays["terminals"][-1] or arrays["timeouts"][-1]  # the dataset's end closes its last episode
        if quality != "random":
            assert attrs["behaviour_algo"] == "sac"
    _, attrs = read_all(paths["expert"])
    assert attrs["behaviour_training_steps"] == 400 and attrs["behaviour_policy"].startswith("sac snapshot at step")
    assert np.isfinite(read_all(paths["expert"])[0]["infos/action_log_probs"]).all()


def test_training_picks_expert_and_medium_by_return(factory):
    folder, _ = factory
    state = behaviour.read_state(folder / "behaviour" / "hopper-sac")
    assert [e["step"] for e in state["evaluations"]] == [100, 200, 300, 400] and state["finished"]
    picks = behaviour.pick_snapshots(state)
    assert picks["expert"]["return_mean"] == max(e["return_mean"] for e in state["evaluations"])
    earlier = [e for e in state["evaluations"] if e["step"] < picks["expert"]["step"]] or [picks["expert"]]
    assert picks["medium"] == min(earlier, key=lambda e: abs(e["return_mean"] - picks["expert"]["return_mean"] / 3))


@pytest.mark.parametrize("quality", ["random", "expert", "medium-replay"])
def test_transitions_and_episode_ends_match_the_environment(factory, quality):
    """Replay each row from its stored qpos/qvel: same next observation, terminal exactly when
    the env terminates, timeouts only at time limits or the data's end."""
    _, paths = factory
    a, _ = read_all(paths[quality])
    env = make_env("Hopper-v5")
    env.reset(seed=0)
    raw = env.unwrapped
    ends = 0
    for t in range(len(a["rewards"])):
        raw.set_state(a["infos/qpos"][t].astype(np.float64), a["infos/qvel"][t].astype(np.float64))
        next_obs, reward, terminated, _, _ = env.step(a["actions"][t])
        np.testing.assert_allclose(next_obs, a["next_observations"][t], rtol=1e-4, atol=1e-4)
        assert reward == pytest.approx(a["rewards"][t], rel=1e-4, abs=1e-4)
        assert bool(terminated) == bool(a["terminals"][t]), t
        if a["timeouts"][t]:
            assert t == len(a["rewards"]) - 1 or raw.data.time > 0  # only at the cut
        if not (a["terminals"][t] or a["timeouts"][t]) and t + 1 < len(a["rewards"]):
            np.testing.assert_array_equal(a["observations"][t + 1], a["next_observations"][t])
        ends += bool(a["terminals"][t] or a["timeouts"][t])
    assert ends >= 2  # several episodes were checked


def test_medium_replay_is_the_training_data_up_to_medium(factory):
    folder, paths = factory
    state = behaviour.read_state(folder / "behaviour" / "hopper-sac")
    medium_step = behaviour.pick_snapshots(state)["medium"]["step"]
    arrays, attrs = read_all(paths["medium-replay"])
    assert len(arrays["rewards"]) == medium_step and attrs["behaviour_policy_step"] == medium_step


def test_medium_expert_is_the_exact_concatenation(factory):
    _, paths = factory
    joined, _ = read_all(paths["medium-expert"])
    medium, _ = read_all(paths["medium"])
    expert, _ = read_all(paths["expert"])
    assert set(joined) == set(medium)
    for key in [k for k in medium if not k.startswith("metadata/")]:
        np.testing.assert_array_equal(joined[key], np.concatenate([medium[key], expert[key]]), err_msg=key)


def test_manifest_and_verify_detects_a_flipped_byte(factory, tmp_path):
    folder, paths = factory
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest) == {p.name for p in paths.values()}
    assert manifest["hopper-expert-v5.hdf5"]["transitions"] == 300
    assert verify(str(paths["expert"]))[-1].startswith("sha256: matches")

    copy = tmp_path / "hopper-expert-v5.hdf5"
    data = bytearray(paths["expert"].read_bytes())
    (tmp_path / MANIFEST).write_text(json.dumps({copy.name: manifest["hopper-expert-v5.hdf5"]}))
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(UserError, match="differs from the manifest|cannot read|not a readable"):
        verify(str(copy))
    copy.write_bytes(paths["expert"].read_bytes()[:5000])  # truncated
    with pytest.raises(UserError, match="not a readable HDF5 file|cannot read"):
        verify(str(copy))


def test_minari_import(tmp_path, monkeypatch):
    minari_storage = pytest.importorskip("minari.dataset.minari_storage")
    from minari.data_collector.episode_buffer import EpisodeBuffer

    env = make_env("Hopper-v5")
    data_path = tmp_path / "minari" / "hopper" / "tiny-v0" / "data"
    data_path.mkdir(parents=True)
    storage = minari_storage.MinariStorage.new(data_path, env.observation_space, env.action_space, env.spec)
    rng = np.random.default_rng(0)
    episodes = []
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        ep = dict(observations=[obs], actions=[], rewards=[], terminations=[], truncations=[])
        for t in range(30):
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            obs, reward, term, trunc, _ = env.step(action)
            trunc = trunc or t == 29
            for key, value in (("observations", obs), ("actions", action), ("rewards", reward),
                               ("terminations", term), ("truncations", trunc)):
                ep[key].append(value)
            if term or trunc:
                break
        episodes.append(ep)
    storage.update_episodes([EpisodeBuffer(id=i, seed=i, infos={}, **{k: (np.asarray(v) if k == "observations" else v)
                                                                          for k, v in ep.items()})
                             for i, ep in enumerate(episodes)])
    storage.update_metadata({"dataset_id": "hopper/tiny-v0", "algorithm_name": "random"})

    monkeypatch.setenv("OFFPRUNE_DATASETS", str(tmp_path / "ds"))
    from offprune.data.generate import import_minari

    path = import_minari(tmp_path / "minari" / "hopper" / "tiny-v0", tmp_path / "ds" / "hopper-tiny.hdf5")
    d = load_dataset(str(path))
    n = sum(len(ep["rewards"]) for ep in episodes)
    assert len(d) == n and d.env_id == "Hopper-v5"
    np.testing.assert_array_equal(d.observations[: len(episodes[0]["rewards"])],
                                  np.asarray(episodes[0]["observations"][:-1], np.float32))
    np.testing.assert_array_equal(d.next_observations[len(episodes[0]["rewards"]) - 1],
                                  np.float32(episodes[0]["observations"][-1]))
    ends = np.cumsum([len(ep["rewards"]) for ep in episodes]) - 1
    assert list(np.flatnonzero(d.terminals | d.timeouts)) == list(ends)
    assert [bool(d.terminals[e]) for e in ends] == [bool(ep["terminations"][-1]) for ep in episodes]
    assert verify(str(path))[-1].startswith("sha256: matches")


def test_bad_inputs_are_one_line_errors(capsys, tmp_path, monkeypatch, hopper_file):
    from offprune.data import policies

    monkeypatch.setenv("OFFPRUNE_DATASETS", str(tmp_path))
    monkeypatch.setattr(policies, "SHIPPED_DIR", tmp_path / "no-policies")
    cases = [
        (("datasets", "make", "pong"), "Invalid value for 'ENV'"),
        (("datasets", "make", "hopper", "--quality", "great"), "Invalid value for '--quality'"),
        (("datasets", "make", "hopper", "--quality", "expert"), "make one with 'offprune datasets train hopper'"),
        (("datasets", "make", "hopper", "--quality", "medium-replay"), "datasets train hopper --algo ppo"),
        (("datasets", "make", "hopper", "--quality", "expert", "--policy", tmp_path / "p.pt"), "no policy at"),
        (("datasets", "train", "hopper", "--resume"), "nothing to resume"),
        (("datasets", "verify", "nope"), "dataset 'nope' not found"),
        (("datasets", "import-minari", tmp_path / "none"), "Minari dataset folder not found"),
        (("datasets", "import-minari", tmp_path), "is not a Minari dataset folder"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    (tmp_path / "hopper-random-v5.hdf5").write_bytes(b"x")
    code, _, err = run_cli(capsys, "datasets", "make", "hopper", "--transitions", "20")
    assert code == 2 and "exists; pass --overwrite" in err
    assert (tmp_path / "hopper-random-v5.hdf5").read_bytes() == b"x"


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    from offprune.data.generate import generate_random

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_dataset", disk_full)
    with pytest.raises(UserError, match="cannot write .*hopper-random-v5.hdf5: No space left on device"):
        generate_random("hopper", 50, 0, tmp_path / "hopper-random-v5.hdf5", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_medium_replay_ends_an_episode_cut_by_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFPRUNE_DATASETS", str(tmp_path))
    replay = behaviour.behaviour_dir("hopper", "sac") / "replay"
    replay.mkdir(parents=True)

    def chunk(first_obs, n):
        obs = first_obs + np.arange(n + 1, dtype=np.float32)[:, None]
        return {"observations": obs[:-1], "next_observations": obs[1:], "terminals": np.zeros(n, bool),
                "timeouts": np.zeros(n, bool), "rewards": np.zeros(n, np.float32)}

    a = chunk(np.zeros((1, 2), np.float32), 3)
    b = chunk(a["next_observations"][-1:], 2)  # continues a's episode
    c = chunk(np.full((1, 2), 50, np.float32), 2)  # after a resume: a fresh episode
    for step, part in ((3, a), (5, b), (7, c)):
        np.savez(replay / f"upto_{step}.npz", **part)
    data = behaviour.replay_until("hopper", "sac", 7)
    assert data["timeouts"].tolist() == [False, False, False, False, True, False, False]
    assert not data["terminals"].any()


@pytest.mark.slow
def test_ppo_behaviour_uses_the_env_settings_and_records_its_log_probs(tmp_path, monkeypatch):
    import torch

    from offprune.data.generate import make_dataset

    monkeypatch.setenv("OFFPRUNE_DATASETS", str(tmp_path))
    folder = behaviour.train_behaviour("halfcheetah", "ppo", 1024, None, seed=0, eval_every=512, log=lambda m: None)
    state = behaviour.read_state(folder)
    assert state["steps_done"] == 1024 and [e["step"] for e in state["evaluations"]] == [512, 1024]
    policy = behaviour.load_policy("halfcheetah", "ppo", "expert")
    medium = behaviour.load_policy("halfcheetah", "ppo", "medium")
    if medium.step != policy.step:  # each snapshot keeps the observation statistics it was evaluated with
        x = np.ones((1, 17), np.float32)
        assert not np.allclose(policy.obs_normalizer(x), medium.obs_normalizer(x))
    net = policy.model.policy.mlp_extractor.policy_net
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [256, 256]  # tuned: ReLU 256-256
    assert any(isinstance(m, torch.nn.ReLU) for m in net)
    assert policy.model.n_steps == 512 and policy.model.gamma == 0.98 and policy.obs_stats is not None
    path = make_dataset("halfcheetah", "expert", 200, 0, tmp_path / "hc.hdf5", "ppo", progress=False)
    with h5py.File(path) as f:
        log_probs = f["infos/action_log_probs"][:]
        assert f.attrs["behaviour_algo"] == "ppo" and np.isfinite(log_probs).all()
    # the Gaussian PPO samples from: the log-prob of each stored action (rows where clipping to the
    # action box did not move it) under the policy at the stored observation
    data = load_dataset(str(path))
    rows = np.flatnonzero((np.abs(data.actions) < 1).all(1))[:5]
    assert len(rows) > 0
    dist = policy.model.policy.get_distribution(torch.as_tensor(policy.obs_normalizer(data.observations[rows])))
    np.testing.assert_allclose(dist.log_prob(torch.as_tensor(data.actions[rows])).detach().numpy(), log_probs[rows],
                               rtol=1e-4, atol=1e-4)
    assert behaviour.ppo_kwargs("hopper") == {}  # SB3 defaults (the PPO paper's MuJoCo settings)


@pytest.mark.slow
def test_shipped_policy_makes_byte_identical_data_without_a_local_training(tmp_path, monkeypatch):
    """ship-policies -> a fresh datasets folder (no training) -> the shipped policy acts: same seed,
    same bytes; the file names the policy; the converted actor is SB3's, mean for mean."""
    import hashlib

    import torch

    from offprune.data import policies
    from offprune.data.generate import make_dataset

    training = tmp_path / "trained"
    monkeypatch.setenv("OFFPRUNE_DATASETS", str(training))
    behaviour.train_behaviour("hopper", "ppo", 512, None, seed=0, eval_every=256, log=lambda m: None)
    shipped_dir = tmp_path / "shipped"
    written = behaviour.ship_policies("hopper", "ppo", shipped_dir, episodes=2, log=lambda m: None)
    assert sorted(p.name for p in written) == ["hopper-expert.pt", "hopper-medium.pt"]
    card = json.loads((shipped_dir / "hopper-expert.json").read_text())
    assert card["env_id"] == "Hopper-v5" and card["eval_episodes"] == 2 and card["training_steps"] == 512
    assert card["sha256"] == hashlib.sha256((shipped_dir / "hopper-expert.pt").read_bytes()).hexdigest()
    assert {"gymnasium_version", "mujoco_version", "stable_baselines3_version", "training_minutes"} <= set(card)

    snapshot = behaviour.load_policy("hopper", "ppo", "expert")
    converted = policies.load(shipped_dir / "hopper-expert.pt")
    obs = np.random.default_rng(0).normal(size=(4, 11)).astype(np.float32)
    sb3_mean = snapshot.model.policy.get_distribution(torch.as_tensor(snapshot.obs_normalizer(obs))).distribution.mean
    torch.testing.assert_close(converted.mean(obs), sb3_mean, rtol=1e-5, atol=1e-5)

    monkeypatch.setenv("OFFPRUNE_DATASETS", str(tmp_path / "fresh"))  # no local training here
    monkeypatch.setattr(policies, "SHIPPED_DIR", shipped_dir)
    first = make_dataset("hopper", "expert", 300, 0, tmp_path / "fresh" / "a.hdf5", "ppo", progress=False)
    second = make_dataset("hopper", "expert", 300, 0, tmp_path / "fresh" / "b.hdf5", "ppo", progress=False)
    other_seed = make_dataset("hopper", "expert", 300, 1, tmp_path / "fresh" / "c.hdf5", "ppo", progress=False)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other_seed.read_bytes()
    arrays, attrs = read_all(first)
    assert arrays["observations"].shape == (300, 11) and attrs["behaviour_policy_sha256"] == card["sha256"]
    assert attrs["behaviour_policy_file"] == "hopper-expert.pt" and attrs["behaviour_policy_step"] == card["step"]
    assert f"(policy sha256 {card['sha256'][:16]}...)" in "".join(verify(str(first)))

    with open(shipped_dir / "hopper-medium.pt", "r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match="does not match the sha256"):
        make_dataset("hopper", "medium", 300, 0, tmp_path / "fresh" / "d.hdf5", "ppo", progress=False)


def test_no_policy_anywhere_is_a_one_line_error(tmp_path, monkeypatch):
    from offprune.data import policies

    monkeypatch.setenv("OFFPRUNE_DATASETS", str(tmp_path))
    monkeypatch.setattr(policies, "SHIPPED_DIR", tmp_path / "none")
    from offprune.data.generate import make_dataset

    with pytest.raises(UserError, match="ships no expert policy for ant"):
        make_dataset("ant", "expert", 10, 0, tmp_path / "x.hdf5", "ppo", progress=False)
