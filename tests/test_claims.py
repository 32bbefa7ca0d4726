"""The paper-claim table, built from results with known values."""

import pandas as pd

from offprune.claims import claim_table


def finals_of(cases):
    rows = []
    for (algo, dataset, prune, sparsity, batch), scores in cases.items():
        for seed, score in enumerate(scores):
            rows.append(dict(run_id=f"{algo}_{dataset}_{prune}_{sparsity}_{batch}_{seed}", algo=algo, dataset=dataset,
                             prune=prune, target_sparsity=sparsity, seed=seed, step=10, normalized_score=score,
                             prune_batch=batch))
    return pd.DataFrame(rows)


def test_claim_rows_follow_the_known_values():
    finals = finals_of({
        ("bc", "hopper-expert-v5", "dense", 0.0, 0): [100, 100, 100],
        ("bc", "hopper-expert-v5", "snip", 0.95, 100): [95, 95, 95],  # 0.95 of dense: holds, as the paper says
        ("bc", "hopper-expert-v5", "random", 0.95, 0): [40, 40, 40],
        ("bcq", "hopper-expert-v5", "dense", 0.0, 0): [80, 80, 80],
        ("bcq", "hopper-expert-v5", "grasp", 0.95, 200): [40, 40, 40],  # fails, as the paper says for BCQ hopper
        ("bc", "walker2d-expert-v5", "dense", 0.0, 0): [90, 90, 90],
        ("bc", "walker2d-expert-v5", "snip", 0.95, 100): [45, 45, 45],  # fails where the paper says it holds
    })
    layers = pd.DataFrame([
        dict(run_id=f"r{prune}{seed}", algo="bc", network="vae", prune=prune, target_sparsity=0.95, layer=layer,
             density=density, seed=seed)
        for prune, last in (("snip", 0.3), ("grasp", 0.5)) for seed in range(2)
        for layer, density in (("encoder.0.weight", 0.05), ("decoder.4.weight", last))])
    t = claim_table(finals, finals, layers, reps=200).set_index("claim")
    assert t.loc["at 95% snip holds for bc on hopper-expert-v5", "agrees"] == "yes"
    assert t.loc["at 95% snip holds for bc on hopper-expert-v5", "measurement"].startswith("95.0 vs dense 100.0: 0.95")
    assert t.loc["at 95% grasp does not hold for bcq on hopper-expert-v5", "agrees"] == "yes"
    assert t.loc["at 95% snip holds for bc on walker2d-expert-v5", "agrees"] == "no"
    assert t.loc["at 95% random masks fall behind SNIP/GraSP for bc on hopper-expert-v5", "agrees"] == "yes"
    last = [c for c in t.index if c.startswith("bc vae: SNIP and GraSP keep more of the last layer (decoder.4.weight)")]
    assert len(last) == 1 and t.loc[last[0], "agrees"] == "yes"
    assert t.loc[last[0], "measurement"].startswith("last layer kept: SNIP 30.0%, GraSP 50.0%")


def test_prune_batch_claim_needs_overlapping_cis():
    finals = finals_of({
        ("bc", "h", "snip", 0.95, 10): [50, 51, 52], ("bc", "h", "snip", 0.95, 100): [50, 52, 51],
        ("bc", "h", "snip", 0.98, 10): [50, 51, 52], ("bc", "h", "snip", 0.98, 1000): [90, 91, 92]})
    t = claim_table(finals, finals, None, reps=200).set_index("claim")
    assert t.loc["bc snip 0.95 on h: the pruning batch size does not change the score", "agrees"].startswith("yes")
    assert t.loc["bc snip 0.98 on h: the pruning batch size does not change the score", "agrees"].startswith("no")
    assert "batch 10: 51.0 [" in t.loc["bc snip 0.98 on h: the pruning batch size does not change the score",
                                       "measurement"]


def test_claims_read_plain_criteria_not_their_variants():
    finals = finals_of({
        ("bc", "hopper-expert-v5", "dense", 0.0, 0): [100, 100, 100],
        ("bc", "hopper-expert-v5", "snip", 0.95, 100): [95, 95, 95],
    })
    shuffled = finals[finals.prune == "snip"].assign(run_id=lambda f: f.run_id + "_shuffle", normalized_score=10)
    batch10 = finals[finals.prune == "snip"].assign(run_id=lambda f: f.run_id + "_pb10", normalized_score=90,
                                                   prune_batch=10)
    finals = pd.concat([finals, shuffled, batch10], ignore_index=True)
    labels = pd.Series({r: ("snip+shuffle" if r.endswith("_shuffle") else "snip+pb10" if r.endswith("_pb10") else p)
                        for r, p in zip(finals.run_id, finals.prune)})
    t = claim_table(finals, finals, None, reps=200, labels=labels).set_index("claim")
    holds = t.loc["at 95% snip holds for bc on hopper-expert-v5"]
    assert holds.measurement.startswith("95.0 vs dense 100.0: 0.95") and holds.measurement.endswith("3 / 3 seeds")
    batch = t.loc["bc snip 0.95 on hopper-expert-v5: the pruning batch size does not change the score"]
    assert batch.measurement == "batch 10: 90.0 [90.0, 90.0]; batch 100: 95.0 [95.0, 95.0]"  # the shuffled runs left out
