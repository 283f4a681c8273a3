"""Tokens/s at 2 ranks on the CPU: DDP vs DeepSpeed ZeRO-1/2/3, dense and with RigL, in one invocation.

Each variant is a real `launch/torchrun.sh 2` run of the same recipe (same seed, data and steps); the
figure is the median of the logged tokens/s windows after `--warmup` steps. Prints the table and each
variant's ratio to dense DDP.

    .venv/bin/python benchmarks/zero_throughput.py [--recipe recipes/tiny-dense.yaml] [--steps 80] [--warmup 30]

Each variant is a separate 2-process launch (about 2 minutes on 2 cores for 80 steps; 8 variants;
`--strategies` picks a subset).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_tokens_per_s(run_dir: Path, warmup: int) -> float:
    values = []
    for path in run_dir.glob("logs/version_*/metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("tok/s") and row.get("step") and int(row["step"]) >= warmup and float(row["tok/s"]) > 0:
                    values.append(float(row["tok/s"]))
    if not values:
        raise RuntimeError(f"no tokens/s logged after step {warmup} in {run_dir}")
    return statistics.median(values)


def timing_overrides(name: str, out: Path, steps: int) -> list[str]:
    """`dstlm fit` options of a timing run: its own name under out, `steps` steps, no progress bar, no
    validation or periodic checkpoint in the way, tokens/s logged every 5 steps."""
    return [f"--name={name}", f"--out_dir={out}", f"--trainer.max_steps={steps}", "--trainer.progress_bar=false",
            f"--trainer.val_every_n_steps={max(1000, 10 * steps)}", "--trainer.ckpt_every_n_steps=0",
            "--trainer.log_every_n_steps=5"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/tiny-dense.yaml")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8, help="per rank (2 ranks)")
    ap.add_argument("--strategies", default="ddp,deepspeed_stage_1,deepspeed_stage_2,deepspeed_stage_3",
                    help="comma-separated; ddp is always run (the baseline)")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="dstlm-zero-bench-"))
    strategies = ["ddp"] + [s for s in args.strategies.split(",") if s and s != "ddp"]
    variants = [(s, sp) for s in strategies for sp in (None, "rigl")]
    results = {}
    for strategy, sparsity in variants:
        name = f"{strategy}-{sparsity or 'dense'}"
        cmd = ["bash", "launch/torchrun.sh", "2", args.recipe, *timing_overrides(name, out, args.steps),
               f"--data.batch_size={args.batch_size}", "--trainer.accelerator=cpu"]
        if sparsity:
            cmd += ["--sparsity", str(REPO / "configs" / "sparsity" / f"{sparsity}.yaml"), "--sparsity.delta_t=25"]
        env = {**os.environ, "STRATEGY": strategy, "PYTHON": sys.executable}
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results[name] = median_tokens_per_s(out / name, args.warmup)
        print(f"  {name}: {results[name]:,.0f} tokens/s", flush=True)
    base = results["ddp-dense"]
    print(f"\n2 ranks on the CPU, {args.recipe}, {args.steps} steps, median tokens/s after step {args.warmup}")
    print(f"{'variant':<28} {'tokens/s':>10} {'vs ddp-dense':>13}")
    for name, tps in results.items():
        print(f"{name:<28} {tps:>10,.0f} {tps / base:>12.3f}x")


if __name__ == "__main__":
    main()
