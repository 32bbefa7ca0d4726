"""Update steps/s of dense vs masked training (mask enforcement overhead), interleaved in one process.

    python benchmarks/bench_masked_update.py [--sparsity 0.95] [--threads 2] [--repeats 5] [--steps 50]

Masked = SNIP masks at --sparsity with offprune's MaskEnforcer hooks; the networks are still dense
matrices holding zeros, so this measures what freezing masks costs, not sparse speed-ups.
Target (issue 2): masked costs at most 10% more time per update than dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from offprune.algos import ALGOS
from offprune.data import Batch
from offprune.prune import MaskEnforcer, compute_masks


def batches(obs_dim: int, act_dim: int, size: int, count: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [
        Batch(torch.randn(size, obs_dim, generator=g), torch.rand(size, act_dim, generator=g) * 2 - 1,
              torch.randn(size, 1, generator=g), torch.randn(size, obs_dim, generator=g), torch.ones(size, 1))
        for _ in range(count)
    ]


def make(algo: str, obs_dim: int, act_dim: int, sparsity: float | None):
    torch.manual_seed(0)
    module = ALGOS[algo]
    agent = module.Agent(obs_dim, act_dim, 1.0, module.Config(), torch.device("cpu"))
    if sparsity is not None:
        nets = agent.prunable_networks()
        pruning = batches(obs_dim, act_dim, 100, 1)[0]
        masks = compute_masks(nets, "snip", sparsity, "global", lambda: pruning, torch.Generator().manual_seed(0))
        MaskEnforcer(nets, masks, agent.optimizers.values())
    return agent


def steps_per_s(agent, data: list[Batch]) -> float:
    start = time.perf_counter()
    for b in data:
        agent.update(b)
    return len(data) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", default="bcq,bc,bc-mlp")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--obs-dim", type=int, default=11, help="11/3: Hopper; 17/6: HalfCheetah, Walker2d")
    p.add_argument("--act-dim", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5, help="interleaved dense/masked rounds")
    p.add_argument("--steps", type=int, default=50, help="updates per round")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} thread(s), obs {args.obs_dim}, act {args.act_dim}, "
          f"sparsity {args.sparsity}, {args.repeats} x {args.steps} updates, median of rounds")
    print(f"{'algo':<8} {'dense steps/s':>14} {'masked steps/s':>15} {'masked time / dense':>20}")
    for algo in args.algos.split(","):
        size = ALGOS[algo].Config().batch_size
        data = batches(args.obs_dim, args.act_dim, size, args.steps)
        dense, masked = make(algo, args.obs_dim, args.act_dim, None), make(algo, args.obs_dim, args.act_dim, args.sparsity)
        for agent in (dense, masked):  # warm-up: allocator, Adam state
            steps_per_s(agent, data[:5])
        d, m = [], []
        for _ in range(args.repeats):
            d.append(steps_per_s(dense, data))
            m.append(steps_per_s(masked, data))
        ratios = [di / mi for di, mi in zip(d, m)]  # per round: masked time / dense time
        print(f"{algo:<8} {statistics.median(d):>14.1f} {statistics.median(m):>15.1f} "
              f"{statistics.median(ratios):>19.3f}x")


if __name__ == "__main__":
    main()
