"""Sequence sampler (offline Dreamer's data): chunks stay inside episodes, short episodes are
padded and masked, never dropped."""

import numpy as np
import pytest

from offprune.data import OfflineDataset, SequenceSampler, episode_ends
from offprune.errors import UserError


def episodes_dataset(lengths, ends_by=None, flag_last=True, obs_dim=2, act_dim=1):
    """obs = (episode id, step, 0, ...); ends_by[i] in 'terminal' / 'timeout' / 'none' (no flag:
    only the jump in observations shows the cut, as in older D4RL files)."""
    ends_by = ends_by or ["timeout"] * len(lengths)
    obs, nxt, term, tout = [], [], [], []
    for e, (n, how) in enumerate(zip(lengths, ends_by)):
        for t in range(n):
            obs.append([e, t])
            nxt.append([e, t + 1])
            last = t == n - 1 and (flag_last or e < len(lengths) - 1)
            term.append(last and how == "terminal")
            tout.append(last and how == "timeout")
    obs, nxt = np.array(obs, np.float32), np.array(nxt, np.float32)
    pad = np.zeros((len(obs), obs_dim - 2), np.float32)
    obs, nxt = np.concatenate([obs, pad], 1), np.concatenate([nxt, pad], 1)
    return OfflineDataset(observations=obs, actions=np.repeat(obs[:, :1] * 0.1, act_dim, 1), rewards=obs[:, 1].copy(), next_observations=nxt,
                          terminals=np.array(term), timeouts=np.array(tout), env_id="Hopper-v5", name="toy",
                          path="toy")


def test_chunks_never_cross_episodes_and_short_episodes_are_masked():
    data = episodes_dataset([5, 2, 8], ["timeout", "terminal", "none"], flag_last=False)
    sampler = SequenceSampler(data, seq_len=4, device="cpu", seed=0)
    assert sampler.starts.tolist() == [0, 1, 5, 7, 8, 9, 10, 11]  # 2 + 1 (short, padded) + 5 chunk starts
    batch = sampler.sample(400)
    obs, mask = batch.observations.numpy(), batch.mask.numpy()
    seen_short = 0
    for row_obs, row_mask, row_term in zip(obs, mask, batch.terminals.numpy()):
        n = int(row_mask.sum())
        assert row_mask[:n].all() and not row_mask[n:].any()  # real steps first, then padding
        assert (row_obs[:n, 0] == row_obs[0, 0]).all()  # one episode
        assert (np.diff(row_obs[:n, 1]) == 1).all()  # consecutive steps
        assert (row_obs[n:] == 0).all() and (row_term[n:] == 0).all()  # padding is zero
        if row_obs[0, 0] == 1:
            seen_short += 1
            assert n == 2 and row_term.tolist() == [0, 1, 0, 0]  # the short episode ends by termination
        else:
            assert n == 4
    assert 20 < seen_short < 90  # 1 start in 8: ~50 of 400
    np.testing.assert_array_equal(batch.rewards.numpy(), obs[:, :, 1])  # rewards aligned with their steps


def test_episode_ends_find_unflagged_cuts_from_the_observations():
    data = episodes_dataset([3, 4], ["none", "none"])
    assert episode_ends(data).tolist() == [2, 6]


def test_all_episodes_shorter_than_the_sequence_is_a_clear_error():
    data = episodes_dataset([3, 5, 4])
    with pytest.raises(UserError, match=r"shorter than the sequence length 50 \(longest: 5 steps\).*--seq-len"):
        SequenceSampler(data, seq_len=50, device="cpu", seed=0)


def test_sampler_state_round_trips():
    data = episodes_dataset([6, 7])
    a = SequenceSampler(data, seq_len=3, device="cpu", seed=1)
    a.sample(5)
    state = a.state_dict()
    b = SequenceSampler(data, seq_len=3, device="cpu", seed=99)
    b.load_state_dict(state)
    assert np.array_equal(a.sample(8).observations.numpy(), b.sample(8).observations.numpy())
