"""Throughput cost of dynamic sparse training: dense vs RigL vs SRigL, same model and data, one run.

Each variant trains `--warmup` steps, then `--steps` timed steps whose window contains mask updates
(ΔT = --delta-t). Two estimates of the overhead relative to dense (goal: <= 2 % at ΔT = 100):
- mean: mean step time over the window (includes the updates; sensitive to machine noise spikes);
- robust: median step time (the per-step gradient masking) + the measured mask-update time / ΔT.
Variants alternate over `--rounds`.

    .venv/bin/python benchmarks/dst_overhead.py [--steps 100] [--warmup 30] [--delta-t 100] [--rounds 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import intervals, run_lightning  # noqa: E402

from dstlm.models import load_preset  # noqa: E402
from dstlm.sparse import SparsityConfig  # noqa: E402
from dstlm.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--delta-t", type=int, default=100)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    total = args.warmup + args.steps + 1
    variants = {
        "dense": None,
        "rigl": SparsityConfig(method="rigl", sparsity=args.sparsity, delta_t=args.delta_t, t_end=1.0),
        "srigl": SparsityConfig(method="srigl", sparsity=args.sparsity, delta_t=args.delta_t, t_end=1.0),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    update_ms: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, sp in variants.items():
            cfg = RunConfig(name=name, out_dir=tempfile.mkdtemp(prefix="dstlm-bench-"), model=load_preset(args.preset),
                            data=DataConfig(val_batches=1), optim=OptimConfig(), sparsity=sp,
                            trainer=TrainerConfig(max_steps=total, val_every_n_steps=10**6, ckpt_every_n_steps=0,
                                                  progress_bar=False, accelerator="cpu"))
            modules: list = []
            times[name] += intervals(run_lightning(cfg, total, modules), args.warmup)
            engine = modules[0].sparse_engine
            if engine is not None:
                update_ms[name].append(engine.last_stats["update_ms"])
    tokens = 16 * 256
    n_updates = len([t for t in range(args.warmup + 1, total + 1) if t % args.delta_t == 0])
    print(f"\nDST overhead, {args.preset} GPT at {args.sparsity:.0%} sparsity, ΔT={args.delta_t}, "
          f"{args.rounds} round(s) x {args.steps} steps after {args.warmup} warm-up "
          f"({n_updates} mask update(s) per window), {torch.get_num_threads()} threads")
    print(f"{'variant':<8} {'mean ms':>9} {'median ms':>10} {'max ms':>8} {'update ms':>10} {'tokens/s':>10} "
          f"{'overhead (mean)':>16} {'overhead (robust)':>18}")
    base_mean = statistics.mean(times["dense"])
    base_med = statistics.median(times["dense"])
    for name, xs in times.items():
        mean, med = statistics.mean(xs), statistics.median(xs)
        upd = statistics.mean(update_ms[name]) if update_ms[name] else 0.0
        robust = (med + upd / 1e3 / args.delta_t) / base_med - 1
        print(f"{name:<8} {mean * 1e3:>9.1f} {med * 1e3:>10.1f} {max(xs) * 1e3:>8.1f} {upd:>10.1f} "
              f"{tokens / mean:>10,.0f} {100 * (mean / base_mean - 1):>15.2f}% {100 * robust:>17.2f}%")


if __name__ == "__main__":
    main()
