"""Tokens/s and MFU of GPT-2 124M on one GPU in bf16: dense vs RigL 90 % under DeepSpeed ZeRO-2, and dense
under Lightning's plain single-device strategy as the baseline, in one invocation.

Each variant is a real `dstlm fit` of the same recipe (same seed, data and steps); tokens/s is the median
of the logged windows after `--warmup` steps. MFU = model FLOPs per token x tokens/s / peak, with the
nanoGPT/PaLM convention 6 N + 12 L H Q T (N = non-embedding matmul parameters plus the LM head, T the
context; no discount for the causal mask) and the dense model's FLOPs for the sparse run too (its masked
weights are multiplied as dense matrices on the GPU), against the bf16 dense peak (`--peak-tflops`, 989
for an H100 SXM).

    python benchmarks/gpu_throughput.py [--recipe recipes/gpt2-124m-zero2-rigl-gpu.yaml] [--steps 300]
        [--warmup 60] [--peak-tflops 989] [--variants auto-dense,zero2-dense,zero2-rigl]
    (variants: auto-dense, zero2-dense, zero2-rigl, each optionally followed by -compile (torch.compile),
     -fused (fused AdamW), -unchunked (plain full-logits loss), -b<N> (micro-batch of N sequences), e.g.
     auto-dense-compile-fused-b32)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from zero_throughput import median_tokens_per_s, timing_overrides  # noqa: E402

BASES = {  # name -> (strategy, sparse)
    "auto-dense": ("auto", False),
    "zero2-dense": ("deepspeed_stage_2", False),
    "zero2-rigl": ("deepspeed_stage_2", True),
}
SUFFIXES = {  # -suffix -> `dstlm fit` override (b<N>: micro-batch of N sequences)
    "compile": "--trainer.compile=true",
    "fused": "--optim.fused=true",
    "unchunked": "--trainer.loss_chunk_tokens=0",
}


def variant_args(name: str) -> tuple[list[str], bool]:
    """`auto-dense-compile-fused-b32` -> its `dstlm fit` overrides, and whether it is sparse."""
    base = next((b for b in BASES if name == b or name.startswith(b + "-")), None)
    if base is None:
        raise SystemExit(f"unknown variant {name!r}: a base in {sorted(BASES)} plus -suffixes from "
                         f"{sorted(SUFFIXES)} or -b<N>")
    strategy, sparse = BASES[base]
    args = [f"--trainer.strategy={strategy}"]
    for suffix in filter(None, name[len(base):].split("-")):
        if suffix in SUFFIXES:
            args.append(SUFFIXES[suffix])
        elif suffix[0] == "b" and suffix[1:].isdigit():
            args.append(f"--data.batch_size={suffix[1:]}")
        else:
            raise SystemExit(f"unknown suffix -{suffix} in variant {name!r}; known: {sorted(SUFFIXES)}, b<N>")
    return args, sparse


def flops_per_token(recipe: str) -> int:
    """Of the recipe's model (its `model:` is a preset file relative to the recipe, or inline keys)."""
    import yaml

    from dstlm.models.gpt import GPT, GPTConfig

    model = yaml.safe_load(Path(recipe).read_text())["model"]
    if isinstance(model, str):
        model = yaml.safe_load((Path(recipe).parent / model).read_text())
    with torch.device("meta"):  # shapes only, no memory
        return GPT(GPTConfig(**model)).flops_per_token()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/gpt2-124m-zero2-rigl-gpu.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU")
    ap.add_argument("--variants", default="auto-dense,zero2-dense,zero2-rigl")
    ap.add_argument("--extra", default="", help="more `dstlm fit` overrides, space-separated")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    fpt = flops_per_token(args.recipe)
    out = Path(tempfile.mkdtemp(prefix="dstlm-gpu-bench-"))
    results = {}
    for name in args.variants.split(","):
        overrides, sparse = variant_args(name)
        cmd = [sys.executable, "-m", "dstlm.cli", "fit", "--config", args.recipe,
               *timing_overrides(name, out, args.steps), *overrides, *args.extra.split()]
        if not sparse:
            cmd.append("--sparsity=null")
        print("$", " ".join(cmd), flush=True)
        r = subprocess.run(cmd, cwd=REPO, env=os.environ, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-6000:], sep="\n", flush=True)
            raise SystemExit(f"{name} failed (exit {r.returncode})")
        tps = median_tokens_per_s(out / name, args.warmup)
        summary = json.loads((out / name / "summary.json").read_text())
        results[name] = {"tokens_per_s": tps, "mfu": fpt * tps / (args.peak_tflops * 1e12),
                         "val_loss": summary.get("val_loss") or float("nan"),
                         "sparsity": summary.get("sparsity") or 0.0,
                         "peak_gib": summary.get("peak_memory_gib") or float("nan")}
        print(f"  {name}: {tps:,.0f} tokens/s, MFU {results[name]['mfu']:.1%}", flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    base = next(iter(results.values()))["tokens_per_s"]
    print(f"\n{gpu}, {args.recipe}, {args.steps} steps, median tokens/s after step {args.warmup}, "
          f"{fpt / 1e9:.3f} GFLOP/token, peak {args.peak_tflops:g} TFLOP/s")
    print(f"{'variant':<30} {'tokens/s':>10} {'MFU':>7} {'vs first':>9} {'sparsity':>9} {'val loss':>9} "
          f"{'peak GiB':>9}")
    for name, r in results.items():
        print(f"{name:<30} {r['tokens_per_s']:>10,.0f} {r['mfu']:>7.1%} {r['tokens_per_s'] / base:>8.3f}x "
              f"{r['sparsity']:>9.3f} {r['val_loss']:>9.4f} {r['peak_gib']:>9.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": gpu, "flops_per_token": fpt, "results": results}, indent=1))


if __name__ == "__main__":
    main()
