"""Update steps/s of dense vs masked (vs sparse) training, interleaved in one process.

    python benchmarks/bench_masked_update.py [--sparsity 0.95] [--threads 2] [--repeats 5] [--steps 40]

Masked = SNIP masks at --sparsity with offprune's MaskEnforcer hooks (dense matrices holding
zeros): this measures what freezing masks costs. Issue 2's target: masked costs at most 10% more
time per update than dense. `offprune speed` prints the same figures for one algorithm.
"""

from __future__ import annotations

import argparse

import torch

from offprune.speed import default_variants, measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", default="bcq,bc,bc-mlp")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--obs-dim", type=int, default=11, help="11/3: Hopper; 17/6: HalfCheetah, Walker2d")
    p.add_argument("--act-dim", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=40, help="updates per round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} thread(s), obs {args.obs_dim}, act {args.act_dim}, "
          f"sparsity {args.sparsity}, {args.repeats} x {args.steps} updates, median of rounds")
    variants = default_variants()
    print(f"{'algo':<8} " + " ".join(f"{v + ' steps/s':>22}" for v in variants) + f" {'masked time / dense':>20}")
    for algo in args.algos.split(","):
        r = measure(algo, args.sparsity, args.obs_dim, args.act_dim, args.repeats, args.steps, variants)
        print(f"{algo:<8} " + " ".join(f"{r[v]:>22.1f}" for v in variants)
              + f" {r['dense_unmasked'] / r['dense_masked']:>19.3f}x")


if __name__ == "__main__":
    main()
