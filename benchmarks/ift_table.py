"""Validation perplexity of the dense tiny GPT vs each Sparse-IFT family at equal forward FLOPs and equal
tokens (same seed, data, schedule), trained by RigL. Runs the shipped recipes one after another and prints a
markdown table (val loss, perplexity, parameters, forward-FLOP ratio from the run's flops.json).

    .venv/bin/python benchmarks/ift_table.py [--steps 600] [--families wide,parallel,factorized,doped] [--moe]

--moe: the same on the tiny MoE GPT (recipes/tiny-moe-dense.yaml vs recipes/ift-tiny-moe-*.yaml; every
expert projection transformed).

On 2 CPU cores the dense recipe takes ~7 min for 600 steps; the transformed models are trained with masked
dense kernels (the FLOP match is of non-zero weights, not of CPU time), so Sparse Wide 75 % and Sparse
Parallel 75 % take ~4x longer. Use --steps to shorten (delta_t is scaled to keep 6 mask updates).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(recipe: str, name: str, out: Path, steps: int, sparse: bool) -> dict:
    cmd = [sys.executable, "-m", "dstlm.cli", "fit", "--config", recipe, f"--name={name}", f"--out_dir={out}",
           f"--trainer.max_steps={steps}", f"--trainer.val_every_n_steps={steps}", "--trainer.ckpt_every_n_steps=0",
           "--trainer.progress_bar=false", f"--optim.warmup_steps={max(1, steps // 12)}"]
    if sparse:
        cmd.append(f"--sparsity.delta_t={max(1, steps // 8)}")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    summary = json.loads((out / name / "summary.json").read_text())
    flops = out / name / "flops.json"
    summary["flops"] = json.loads(flops.read_text()) if flops.exists() else None
    print(f"  {name}: val loss {summary['val_loss']:.4f}", flush=True)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--families", default="wide,parallel,factorized,doped")
    ap.add_argument("--sparsities", default="50,75")
    ap.add_argument("--moe", action="store_true", help="the tiny MoE GPT instead of the tiny GPT")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="dstlm-ift-"))
    tiny = "tiny-moe" if args.moe else "tiny"
    rows = [("dense", run(f"recipes/{tiny}-dense.yaml", "dense", out, args.steps, sparse=False))]
    for fam in args.families.split(","):
        for s in args.sparsities.split(","):
            name = f"{fam}-{s}"
            rows.append((name, run(f"recipes/ift-{tiny}-{name}.yaml", name, out, args.steps, sparse=True)))
    tokens = rows[0][1]["train_tokens_seen"]
    print(f"\n{'tiny MoE GPT' if args.moe else 'tiny GPT'}, {args.steps} steps, {tokens:,} tokens each, seed 1337, "
          f"RigL for the sparse families")
    print("| model | val loss | val ppl | params | forward FLOPs vs dense | wall s |")
    print("|---|---|---|---|---|---|")
    for name, s in rows:
        ratio = s["flops"]["forward_ratio"] if s.get("flops") else 1.0
        print(f"| {name} | {s['val_loss']:.4f} | {math.exp(s['val_loss']):.2f} | {s['params']:,} | {ratio:.3f} | "
              f"{s['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
