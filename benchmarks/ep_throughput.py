"""Tokens/s of the tiny MoE GPT at 2 ranks on the CPU, experts computed by every rank (expert_parallel_size 1)
vs split over the 2 ranks with all-to-all dispatch (expert_parallel_size 2), under DDP and ZeRO-2, in one
invocation.

Each variant is a real `launch/torchrun.sh 2` run of the same recipe (same seed, data and steps); the figure
is the median of the logged tokens/s windows after `--warmup` steps. Prints each variant's ratio to its
strategy's expert_parallel_size=1 run.

    .venv/bin/python benchmarks/ep_throughput.py [--recipe recipes/tiny-moe-dense.yaml] [--steps 80] [--warmup 30]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from zero_throughput import median_tokens_per_s, timing_overrides  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/tiny-moe-dense.yaml")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8, help="per rank (2 ranks)")
    ap.add_argument("--strategies", default="ddp,deepspeed_stage_2", help="comma-separated")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="dstlm-ep-bench-"))
    results = {}
    for strategy in args.strategies.split(","):
        for ep in (1, 2):
            name = f"{strategy}-ep{ep}"
            cmd = ["bash", "launch/torchrun.sh", "2", args.recipe, *timing_overrides(name, out, args.steps),
                   f"--data.batch_size={args.batch_size}", "--trainer.accelerator=cpu",
                   f"--model.moe.expert_parallel_size={ep}"]
            env = {**os.environ, "STRATEGY": strategy, "PYTHON": sys.executable}
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[name] = median_tokens_per_s(out / name, args.warmup)
            print(f"  {name}: {results[name]:,.0f} tokens/s", flush=True)
    print(f"\n2 ranks on the CPU, {args.recipe}, {args.steps} steps, median tokens/s after step {args.warmup}")
    print(f"{'variant':<28} {'tokens/s':>10} {'vs ep1':>8}")
    for name, tps in results.items():
        base = results[name.rsplit("-", 1)[0] + "-ep1"]
        print(f"{name:<28} {tps:>10,.0f} {tps / base:>7.3f}x")


if __name__ == "__main__":
    main()
