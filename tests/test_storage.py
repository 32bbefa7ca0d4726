"""Storage formats, the packed export, Table 1, and sparse inference."""

import math
import struct
import numpy as np
import pytest
import torch
from torch import nn

from offprune import checkpoint, packed, sparse, speed
from offprune.nets import mlp
from offprune import storage as st
from offprune.errors import UserError

from conftest import run_cli



def known_layer(kept=6000, shape=(300, 400), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(shape)
    idx = torch.randperm(w.numel(), generator=g)[:kept]
    w.view(-1)[idx] = torch.randn(kept, generator=g) + 3.0  # no accidental zeros
    return w


def test_payload_bytes_of_a_400x300_layer_at_95_percent():
    b = st.tensor_payload_bytes(known_layer())
    h = -(0.05 * math.log2(0.05) + 0.95 * math.log2(0.95))
    assert b == {
        "dense": 480_000,
        "coo": 6000 * 20,
        "csr_int64": 6000 * 12 + 301 * 8,  # 74,408
        "csr_int32": 6000 * 8 + 301 * 4,  # 49,204
        "bitmap": 15_000 + 24_000,
        "entropy": math.ceil(120_000 * h / 8) + 24_000,  # ~28,300
    }
    assert b["entropy"] == 28_296


def test_biases_are_dense_in_every_format():
    assert set(st.tensor_payload_bytes(torch.ones(7)).values()) == {28}


def test_table1_reproduces_the_paper_dense_within_half_a_percent():
    t = st.table1().set_index("network")
    assert (t["dense_vs_paper_%"].abs() < 0.5).all(), t
    assert (t["coo_vs_paper_%"].abs() < 1.0).all(), t  # the paper's torch.sparse files at 95%
    total_dense = t.dense_MB.sum()
    assert total_dense / t.packed95_MB.sum() >= 12  # the target for the packed export


class Odd(nn.Module):
    def __init__(self, sparsity, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shapes = [(7, 13), (1, 1), (3, 5, 2), (0, 4), (750, 31), (5,)]
        for i, shape in enumerate(shapes):
            w = torch.randn(shape, generator=g)
            w[torch.rand(shape, generator=g) < sparsity] = 0.0
            self.register_parameter(f"p{i}", nn.Parameter(w))
        self.register_buffer("steps", torch.arange(5, dtype=torch.int64))
        special = torch.tensor([[-0.0, 0.0, float("nan"), -1.5], [float("inf"), 0.0, -0.0, 2.0]])
        self.register_buffer("special", special)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95, 0.99])
def test_packed_round_trip_is_bit_exact(tmp_path, sparsity):
    module = Odd(sparsity)
    path = tmp_path / "odd.pack"
    path.write_bytes(packed.pack_networks({"odd": module}))
    header, states = packed.read_packed(path)
    for key, value in module.state_dict().items():
        got = states["odd"][key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        if value.dtype == torch.float32:
            assert torch.equal(got.view(torch.int32), value.view(torch.int32)), key  # bits, -0.0 and NaN too
        else:
            assert torch.equal(got, value), key
    encodings = {e["name"]: e["encoding"] for e in header["networks"]["odd"]}
    if sparsity >= 0.9:
        assert encodings["p4"] in ("bitmap", "gaps")
    assert encodings["steps"] == "raw"


def run_bcq(capsys, tmp_path, hopper_file, sparsity="0.95"):
    assert run_cli(capsys, "run", "--algo", "bcq", "--sparsity", sparsity, "--dataset", str(hopper_file), "--out",
                   str(tmp_path), "--steps", "3", "--eval-episodes", "1", "--no-progress")[0] == 0
    return tmp_path / f"bcq_hopper-random-v5_snip_s{sparsity}_seed0"


def test_export_and_load_give_identical_weights_and_actions(tmp_path, hopper_file, capsys):
    run_dir = run_bcq(capsys, tmp_path, hopper_file)
    code, out, _ = run_cli(capsys, "export", str(run_dir), "--out", str(tmp_path / "agent.pack"))
    assert code == 0 and "smaller than dense torch.save" in out

    original, _ = checkpoint.load_run(run_dir)
    loaded = packed.load_packed(tmp_path / "agent.pack")
    assert set(loaded) == {"actor", "critic", "vae"}
    for name, module in checkpoint.stored_networks(original).items():
        for key, value in module.state_dict().items():
            assert torch.equal(loaded[name].state_dict()[key].view(torch.int32), value.view(torch.int32))
    agent = packed.load_packed_agent(tmp_path / "agent.pack")
    for seed in range(5):
        obs = np.random.default_rng(seed).normal(size=11).astype(np.float32)
        torch.manual_seed(seed)
        a = original.act(obs)
        torch.manual_seed(seed)
        b = agent.act(obs)
        np.testing.assert_array_equal(a, b)


def test_storage_command_writes_table_and_parquet(tmp_path, hopper_file, capsys):
    run_dir = run_bcq(capsys, tmp_path, hopper_file)
    code, out, _ = run_cli(capsys, "storage", str(run_dir))
    assert code == 0
    assert "packed is" in out and "smaller than dense" in out
    import pandas as pd

    df = pd.read_parquet(run_dir / "storage.parquet")
    assert set(df.format) == set(st.FORMATS) and set(df.network) == {"actor", "critic", "vae", "total"}
    actor = df[(df.network == "actor")].set_index("format").bytes
    assert actor["coo"] < actor["dense"] / 3 and actor["packed"] < actor["csr_int32"]
    assert df[df.network == "actor"].nonzero_weights.iloc[0] == round(0.05 * (14 * 400 + 400 * 300 + 300 * 3))


def test_inference_copies_match_dense_outputs_and_leave_the_original_alone():
    torch.manual_seed(0)
    seq = mlp(20, (64, 64), 3, nn.ELU)
    with torch.no_grad():
        for m in seq:
            if isinstance(m, nn.Linear):
                m.weight[torch.rand(m.weight.shape) < 0.9] = 0.0
    x = torch.randn(10, 20)
    with torch.inference_mode():
        expected = seq(x)
        for kernels, chosen in (("dense", ["dense"] * 3), ("sparse", ["csr-addmm"] * 3), ("auto", None)):
            fast = sparse.inference_copy(seq, 10, kernels)
            # one fused loop where a layer is sparse; an all-dense stack stays torch's (faster at few rows)
            assert fast.sparse_chain == (kernels == "sparse")  # auto: these 64-wide layers are too small for csr
            assert chosen is None or sparse.layer_kernels_in(fast) == chosen
            torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-6)
    assert sparse.layer_kernels_in(seq) == ["dense"] * 3 and not seq.sparse_chain
    csr = sparse.SparseLinear(seq[2], seq[2].weight != 0, "csr").freeze()  # the embedding-bag kernel
    torch.testing.assert_close(csr(torch.ones(4, 64)), seq[2](torch.ones(4, 64)).detach())


def test_a_fused_inference_chain_with_dense_layers_matches_the_module_at_few_and_many_rows():
    # BCQ's shape: a dense first layer (few inputs) and head around a sparse 'csr' layer. At few
    # rows the first layer runs batch-major and hands on a transposed view; at many, W x^T.
    torch.manual_seed(0)
    seq = mlp(17, (300, 300), 3)
    with torch.no_grad():
        seq[2].weight.mul_((torch.rand(300, 300) < 0.05).float())
    for rows in (1, 10, 100):
        fast = sparse.inference_copy(seq, rows)
        assert fast.sparse_chain and sparse.layer_kernels_in(fast) == \
            ["dense", "csr-addmm" if rows < sparse.INFERENCE_CSR_MIN_ROWS else "csr", "dense"]
        x = torch.randn(rows, 17)
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), seq(x), rtol=1e-5, atol=1e-6)


def test_inference_kernels_follow_a_fixed_rule_of_shape_density_and_rows():
    g = torch.Generator().manual_seed(0)
    big_sparse = torch.rand(750, 750, generator=g) < 0.05  # a 'csr' layer in training
    head = torch.rand(3, 750, generator=g) < 0.05  # too small for csr: dense
    dense_ish = torch.rand(750, 750, generator=g) < 0.5  # too dense for csr: dense
    assert [sparse.inference_kernel_for(big_sparse, rows) for rows in (1, 10, 31, 32, 100)] == \
        ["csr-addmm"] * 3 + ["csr"] * 2
    assert sparse.inference_kernel_for(head, 10) == sparse.inference_kernel_for(dense_ish, 10) == "dense"
    seq = mlp(750, (750,), 3)
    with torch.no_grad():
        seq[0].weight.mul_((torch.rand(750, 750, generator=g) < 0.5).float())
        seq[2].weight.mul_((torch.rand(3, 750, generator=g) < 0.05).float())
    seq.insert(0, nn.Linear(750, 750))  # not an MLP any more: layers only
    with torch.no_grad():
        seq[0].weight.mul_(big_sparse.float())
    kernels = [sparse.layer_kernels_in(sparse.inference_copy(seq, rows)) for rows in (10, 10, 100)]
    assert kernels[0] == kernels[1] == ["csr-addmm", "dense", "dense"]  # the same choice on every call
    assert kernels[2] == ["csr", "dense", "dense"]


def test_inference_agent_acts_as_the_trained_agent(tmp_path, hopper_file, capsys):
    agent, ckpt = checkpoint.load_run(run_bcq(capsys, tmp_path, hopper_file))
    fast = speed.inference_agent(agent, agent.act_batch, "sparse")
    assert all(k == "csr-addmm" for m in checkpoint.stored_networks(fast).values() for k in sparse.layer_kernels_in(m))
    assert all(k == "dense" for m in checkpoint.stored_networks(agent).values() for k in sparse.layer_kernels_in(m))
    obs = np.linspace(-1, 1, ckpt["agent"]["obs_dim"], dtype=np.float32)
    torch.manual_seed(3)
    expected = agent.act(obs)
    torch.manual_seed(3)
    np.testing.assert_allclose(fast.act(obs), expected, rtol=1e-5, atol=1e-6)


def corrupt_variants(data: bytes):
    fixed = len(packed.MAGIC) + 12
    flipped = bytearray(data)
    flipped[fixed + 40] ^= 0x01
    newer = bytearray(data)
    newer[len(packed.MAGIC) : len(packed.MAGIC) + 4] = struct.pack("<I", packed.FORMAT_VERSION + 1)
    return [
        (data[: len(data) - 100], "truncated"),
        (data[:20], "truncated"),
        (bytes(flipped), "checksum mismatch"),
        (bytes(newer), "newer than this offprune reads"),
        (b"PK\x03\x04 a zip file", "not an offprune packed file"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_bad_packed_files_raise_clear_errors(tmp_path, case):
    data = packed.pack_networks({"odd": Odd(0.9)})
    blob, message = corrupt_variants(data)[case]
    path = tmp_path / "bad.pack"
    path.write_bytes(blob)
    with pytest.raises(UserError, match=message):
        packed.read_packed(path)


def test_run_dir_without_checkpoint_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    code, _, err = run_cli(capsys, "storage", str(tmp_path / "empty_run"))
    assert code == 2 and "no checkpoint at" in err and err.count("\n") == 1
    assert run_cli(capsys, "export", str(tmp_path / "empty_run"), "--out", str(tmp_path / "x.pack"))[0] == 2
    assert not (tmp_path / "x.pack").exists()


def test_storage_latency_times_every_network_and_batch_and_act(tmp_path, hopper_file, capsys):
    run_dir = run_bcq(capsys, tmp_path, hopper_file)
    code, out, err = run_cli(capsys, "storage", str(run_dir), "--latency", "--repeats", "1")
    assert code == 0, err
    table = out[out.index("network  batch"):out.index("act()")].strip().splitlines()
    assert table[0].split() == ["network", "batch", "dense_ms", "csr_addmm_ms", "csr_ms", "auto_ms", "best_ms",
                                "speedup_auto"]
    assert sorted((r.split()[0], int(r.split()[1])) for r in table[1:]) == sorted(
        (n, b) for n in ("actor", "critic", "vae") for b in (1, 10, 100))
    assert "act() with 10 row(s) per call" in out and "kernels by rule" in out
