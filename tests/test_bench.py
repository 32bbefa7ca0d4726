"""offprune bench: passes against its own baseline, fails when a baseline is tightened past today's value."""

import json

import torch

from offprune.bench import compare, mask_hash

from conftest import run_cli


def test_mask_hash_changes_with_one_bit_and_with_names():
    masks = {"actor": {"l0.weight": torch.ones(3, 4, dtype=torch.bool)}}
    flipped = {"actor": {"l0.weight": masks["actor"]["l0.weight"].clone()}}
    flipped["actor"]["l0.weight"][2, 3] = False
    renamed = {"critic": {"l0.weight": masks["actor"]["l0.weight"]}}
    assert mask_hash(masks) == mask_hash({"actor": {"l0.weight": torch.ones(3, 4, dtype=torch.bool)}})
    assert len({mask_hash(masks), mask_hash(flipped), mask_hash(renamed)}) == 3


def test_bench_passes_then_fails_on_tightened_baselines(capsys, tmp_path):
    baseline = tmp_path / "baseline.json"
    args = ("bench", "--algo", "bc-mlp", "--steps", "6", "--baseline", baseline)
    code, out, err = run_cli(capsys, *args, "--update-baseline")
    assert code == 0, err
    stored = json.loads(baseline.read_text())
    assert set(stored["cases"]) == {"bc-mlp/dense/0", "bc-mlp/snip/0.9", "bc-mlp/snip/0.95", "bc-mlp/grasp/0.9",
                                    "bc-mlp/grasp/0.95", "bc-mlp/time/0.9", "bc-mlp/time/0.95"}
    case = stored["cases"]["bc-mlp/snip/0.95"]
    prunable = 11 * 256 + 256 * 256 + 256 * 3
    assert case["kept"] == {"policy": round(prunable * 0.05)}

    stored["tolerances"]["time_ratio_rtol"] = 100.0  # timings on a busy test machine are noise; this tests the logic
    baseline.write_text(json.dumps(stored))
    code, out, err = run_cli(capsys, *args)
    assert code == 0, out + err
    assert out.strip().endswith("checks passed") and "REGRESSION" not in out

    for mutate, metric in (
        (lambda b: b["cases"]["bc-mlp/time/0.9"].update(time_ratio=1e-6), "time masked/dense"),
        (lambda b: b["cases"]["bc-mlp/grasp/0.95"]["kept"].update(policy=1), "kept"),
        (lambda b: b["cases"]["bc-mlp/dense/0"].update(normalized_score=b["cases"]["bc-mlp/dense/0"]["normalized_score"] + 5), "normalized_score"),
    ):
        tightened = json.loads(json.dumps(stored))
        mutate(tightened)
        baseline.write_text(json.dumps(tightened))
        code, out, err = run_cli(capsys, *args)
        assert code == 1, out
        bad = [line for line in out.splitlines() if "REGRESSION" in line]
        assert len(bad) == 1 and metric in bad[0], out
        assert "1 regression(s)" in err


def test_compare_flags_a_missing_case_and_loss_drift():
    base = {"tolerances": {"loss_rtol": 0.1}, "cases": {
        "a/dense/0": {"kept": {"n": 4}, "realised_sparsity": 0.0, "mask_sha256": "x", "losses": {"l": 1.0},
                      "normalized_score": 1.0},
        "a/snip/0.9": {"kept": {"n": 1}, "realised_sparsity": 0.75, "mask_sha256": "y", "losses": {"l": 1.0},
                       "normalized_score": 1.0}}}
    current = {"a/dense/0": {**base["cases"]["a/dense/0"], "losses": {"l": 1.15}}}
    bad = {(c.case, c.metric) for c in compare(current, base) if not c.ok}
    assert bad == {("a/dense/0", "loss l"), ("a/snip/0.9", "present")}
    current["a/dense/0"]["losses"]["l"] = 1.09  # within the baseline's 10 %
    assert {(c.case, c.metric) for c in compare(current, base) if not c.ok} == {("a/snip/0.9", "present")}
