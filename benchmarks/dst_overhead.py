"""Throughput cost of dynamic sparse training: dense vs RigL vs SRigL, same model and data, one run.

Each variant trains `--warmup` steps, then `--steps` timed steps whose window contains mask updates
(ΔT = --delta-t). Two estimates of the overhead relative to dense (goal: <= 2 % at ΔT = 100):
- mean: mean step time over the window (includes the updates; sensitive to machine noise spikes);
- robust: median step time (the per-step gradient masking) + the measured mask-update time / ΔT.
Variants alternate over `--rounds`.

    .venv/bin/python benchmarks/dst_overhead.py [--steps 100] [--warmup 30] [--delta-t 100] [--rounds 1]
        [--preset tiny] [--methods rigl,srigl] [--strategy auto] [--accelerator cpu] [--precision 32-true]
        [--tokenizer bpe] [--block-size 256] [--batch-size 16]

The GPU goal: ZeRO-2 RigL at ΔT = 100 with a mean step time, updates included, <= 1.03x the dense
run's under the same strategy:

    python benchmarks/dst_overhead.py --accelerator gpu --precision bf16-mixed --strategy deepspeed_stage_2 \
        --preset gpt2-124m --tokenizer gpt2 --block-size 1024 --batch-size 16 --methods rigl \
        --warmup 60 --steps 200 --delta-t 100
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
    ap.add_argument("--methods", default="rigl,srigl", help="DST methods timed against dense")
    ap.add_argument("--strategy", default="auto", help="trainer.strategy of every variant (e.g. deepspeed_stage_2)")
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--precision", default="32-true", help="trainer.precision (bf16-mixed on a GPU)")
    ap.add_argument("--tokenizer", default="bpe", help="bpe (trained on the corpus) or gpt2")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    if args.warmup < 30:
        raise SystemExit(f"--warmup {args.warmup}: warm up at least 30 steps (allocator, caches, compilation)")
    total = args.warmup + args.steps + 1
    if args.methods and not any(t % args.delta_t == 0 for t in range(args.warmup + 1, total + 1)):
        raise SystemExit(f"no mask update falls in the timed steps {args.warmup + 1}..{total} at --delta-t "
                         f"{args.delta_t}: raise --steps or lower --delta-t")
    variants = {"dense": None}
    variants.update({m: SparsityConfig(method=m, sparsity=args.sparsity, delta_t=args.delta_t, t_end=1.0)
                     for m in args.methods.split(",") if m})
    times: dict[str, list[float]] = {k: [] for k in variants}
    update_ms: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, sp in variants.items():
            model = load_preset(args.preset, block_size=args.block_size)
            data = DataConfig(val_batches=1, tokenizer=args.tokenizer, block_size=args.block_size,
                              batch_size=args.batch_size)
            if args.tokenizer == "gpt2":
                data.vocab_size = model.vocab_size
            cfg = RunConfig(name=name, out_dir=tempfile.mkdtemp(prefix="dstlm-bench-"), model=model,
                            data=data, optim=OptimConfig(), sparsity=sp,
                            trainer=TrainerConfig(max_steps=total, val_every_n_steps=10**6, ckpt_every_n_steps=0,
                                                  progress_bar=False, accelerator=args.accelerator,
                                                  strategy=args.strategy, precision=args.precision))
            modules: list = []
            times[name] += intervals(run_lightning(cfg, total, modules), args.warmup)
            engine = modules[0].sparse_engine
            if engine is not None and engine.n_updates:
                update_ms[name].append(engine.last_stats["update_ms"])
    tokens = args.batch_size * args.block_size
    n_updates = len([t for t in range(args.warmup + 1, total + 1) if t % args.delta_t == 0])
    where = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"{torch.get_num_threads()} CPU threads"
    print(f"\nDST overhead, {args.preset} GPT at {args.sparsity:.0%} sparsity, ΔT={args.delta_t}, "
          f"{args.rounds} round(s) x {args.steps} steps after {args.warmup} warm-up "
          f"({n_updates} mask update(s) per window), strategy {args.strategy}, {args.precision}, {where}")
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
