"""CI regression benchmark: a small fixed suite of real runs compared with a stored baseline.

The suite: each algo (BC, BCQ) dense and pruned by SNIP and GraSP at 0.9 and 0.95, seed 0, on a
tiny Hopper dataset generated on the spot (fixed seed), a few hundred updates, one evaluation at
the end, one torch thread, masked dense kernels. Checked against the baseline:
  - kept weights per network and realised sparsity: exactly
  - mask identity: sha256 of every mask (names and bits): exactly
  - final losses: within `loss_rtol` (relative); final normalised score: within `score_atol`
  - time per update with masks / without (offprune.speed: interleaved rounds, median), per algo
    and sparsity: at most baseline x (1 + `time_ratio_rtol`)
The tolerances live in the baseline file, so tightening one is an edit there.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from offprune import atomic
from offprune.config import RunConfig
from offprune.errors import UserError

DEFAULT_BASELINE = "benchmarks/bench_baseline.json"
CASES = (("dense", 0.0), ("snip", 0.9), ("snip", 0.95), ("grasp", 0.9), ("grasp", 0.95))
TOLERANCES = {"loss_rtol": 0.05, "score_atol": 1.0, "time_ratio_rtol": 0.5}
DATA = {"env": "hopper", "transitions": 2000, "seed": 0}
TIMING = {"repeats": 5, "steps": 20}  # interleaved rounds x updates per round


@dataclass(frozen=True)
class Check:
    case: str
    metric: str
    baseline: object
    current: object
    rule: str
    ok: bool


def mask_hash(masks: dict[str, dict[str, torch.Tensor]]) -> str:
    """sha256 over every mask's network/layer name and its bits, in sorted name order."""
    h = hashlib.sha256()
    for net in sorted(masks):
        for layer in sorted(masks[net]):
            h.update(f"{net}/{layer}:".encode())
            h.update(masks[net][layer].detach().cpu().to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def suite_spec(algos: list[str], steps: int) -> dict:
    return {"algos": list(algos), "steps": steps, "cases": [list(c) for c in CASES], "data": DATA, "seed": 0,
            "timing": TIMING}


def run_suite(algos: list[str], steps: int, work_dir: Path, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every case; {case name: metrics}."""
    from offprune.data.generate import generate_random
    from offprune.speed import measure
    from offprune.train import MASKS_FILE, run

    torch.set_num_threads(1)
    dataset = work_dir / "hopper-bench.hdf5"
    if not dataset.exists():
        generate_random(DATA["env"], DATA["transitions"], DATA["seed"], dataset, progress=False)
    results: dict[str, dict] = {}
    for algo in algos:
        for prune, sparsity in CASES:
            cfg = RunConfig(algo=algo, dataset=str(dataset), prune=prune, sparsity=sparsity, seed=0, steps=steps,
                            eval_every=steps, eval_episodes=2, kernels="dense", threads=1,
                            out=str(work_dir / "runs"), progress=False).validate()
            log(f"bench: {cfg.name}")
            result = run(cfg, log=lambda m: None)
            row = result.rows.iloc[-1]
            masks = torch.load(result.run_dir / MASKS_FILE, weights_only=False)
            results[f"{algo}/{prune}/{sparsity:g}"] = {
                "kept": {net: int(sum(int(m.sum()) for m in layer.values())) for net, layer in masks.items()},
                "realised_sparsity": round(float(row["realised_sparsity"]), 10),
                "mask_sha256": mask_hash(masks),
                "losses": {c.removeprefix("loss_"): float(row[c]) for c in result.rows.columns if c.startswith("loss_")},
                "normalized_score": float(row["normalized_score"]),
            }
    for algo in algos:
        for sparsity in sorted({s for _, s in CASES if s > 0}):
            log(f"bench: {algo} masked vs dense update time at {sparsity:g}")
            r = measure(algo, sparsity, repeats=TIMING["repeats"], steps=TIMING["steps"],
                        variants=("dense_unmasked", "dense_masked"))
            results[f"{algo}/time/{sparsity:g}"] = {"time_ratio": r["dense_unmasked"] / r["dense_masked"]}
    return results


def compare(current: dict[str, dict], baseline: dict) -> list[Check]:
    """Every check of `current` against a baseline file's content."""
    tol = {**TOLERANCES, **baseline.get("tolerances", {})}
    checks: list[Check] = []
    for case, base in baseline["cases"].items():
        cur = current.get(case)
        if cur is None:
            checks.append(Check(case, "present", "yes", "missing", "exact", False))
            continue
        if "time_ratio" in base:
            limit = base["time_ratio"] * (1 + tol["time_ratio_rtol"])
            checks.append(Check(case, "time masked/dense", round(base["time_ratio"], 3), round(cur["time_ratio"], 3),
                                f"<= {limit:.3f}", cur["time_ratio"] <= limit))
            continue
        checks.append(Check(case, "kept", base["kept"], cur["kept"], "exact", base["kept"] == cur["kept"]))
        checks.append(Check(case, "realised_sparsity", base["realised_sparsity"], cur["realised_sparsity"], "exact",
                            base["realised_sparsity"] == cur["realised_sparsity"]))
        checks.append(Check(case, "mask_sha256", base["mask_sha256"][:12], cur["mask_sha256"][:12], "exact",
                            base["mask_sha256"] == cur["mask_sha256"]))
        for loss, value in base["losses"].items():
            now = cur["losses"].get(loss, math.nan)
            ok = math.isclose(now, value, rel_tol=tol["loss_rtol"], abs_tol=1e-8)
            checks.append(Check(case, f"loss {loss}", round(value, 6), round(now, 6), f"rel {tol['loss_rtol']:g}", ok))
        ok = abs(cur["normalized_score"] - base["normalized_score"]) <= tol["score_atol"]
        checks.append(Check(case, "normalized_score", round(base["normalized_score"], 3),
                            round(cur["normalized_score"], 3), f"abs {tol['score_atol']:g}", ok))
    return checks


def read_baseline(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no baseline at {path}; make one with 'offprune bench --update-baseline'") from None
    except ValueError as e:
        raise UserError(f"baseline {path} is not valid JSON: {e}") from None


def write_baseline(path: Path, spec: dict, current: dict[str, dict], tolerances: dict) -> None:
    atomic.write_json(path, {"suite": spec, "tolerances": tolerances, "cases": current})


def bench(algos: list[str], steps: int, baseline_path: str | Path, update: bool,
          log: Callable[[str], None] = print) -> tuple[list[Check], dict[str, dict]]:
    """Run the suite; rewrite the baseline (update) or compare with it. Returns (checks, current)."""
    baseline_path = Path(baseline_path)
    spec = suite_spec(algos, steps)
    baseline = None
    if not update:
        baseline = read_baseline(baseline_path)
        if baseline.get("suite") != spec:
            raise UserError(f"the baseline {baseline_path} was made for another suite ({baseline.get('suite')}); "
                            "run the same suite or rewrite it with --update-baseline")
    with tempfile.TemporaryDirectory(prefix="offprune-bench-") as tmp:
        current = run_suite(algos, steps, Path(tmp), log)
    if update:
        old = read_baseline(baseline_path).get("tolerances", TOLERANCES) if baseline_path.exists() else TOLERANCES
        write_baseline(baseline_path, spec, current, old)
        return [], current
    return compare(current, baseline), current
