"""Fused, chunked LM-head cross-entropy vs the plain full-logits loss: time and peak memory of forward +
backward, measured in the same invocation.

Each variant runs in its own child process (so peak memory is its own): `plain` is
`F.cross_entropy(F.linear(h, W)[..., :V].float(), y)`, `fused-<k>` is `dstlm.models.lm_loss` with chunks of
k tokens. Time is the median of `--steps` forward+backward passes after `--warmup`; peak memory is
torch.cuda.max_memory_allocated on a GPU, else the growth of the process's peak resident set over the
inputs. Defaults are GPT-2 124M's head on one 16 x 1024 micro-batch.

    .venv/bin/python benchmarks/lm_loss.py [--tokens 16384] [--vocab 50257] [--dim 768] [--chunks 2048,4096]
        [--steps 20] [--warmup 30] [--device cpu|cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dstlm.models.lm_loss import linear_cross_entropy  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def child(args) -> dict:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    vp = (args.vocab + 63) // 64 * 64
    h = torch.randn(args.tokens, args.dim, device=dev, requires_grad=True)
    w = (torch.randn(vp, args.dim, device=dev) * 0.02).requires_grad_()
    y = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    chunk = int(args.variant.split("-")[1]) if args.variant.startswith("fused") else 0

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            if chunk:
                loss = linear_cross_entropy(h, w, y, args.vocab, chunk)
            else:
                loss = F.cross_entropy(F.linear(h, w)[..., : args.vocab].float(), y)
        loss.backward()
        h.grad = w.grad = None
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    base = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _rss_mb()
    return {"ms": statistics.median(times) * 1e3, "peak_mb": peak - base, "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--chunks", default="2048,4096")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="under bf16 autocast (as training on a GPU)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    variants = ["plain"] + [f"fused-{c}" for c in args.chunks.split(",")]
    res = {}
    for v in variants:
        cmd = [sys.executable, __file__, "--variant", v] + [a for a in sys.argv[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{v} failed:\n{r.stderr[-3000:]}")
        res[v] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nLM head + cross-entropy, forward + backward: {args.tokens} tokens x {args.dim} -> vocab {args.vocab}, "
          f"{args.device}{' bf16 autocast' if args.bf16 else ' fp32'}, median of {args.steps} after {args.warmup}")
    print(f"{'variant':<12} {'ms':>9} {'vs plain':>9} {'peak MiB':>9} {'vs plain':>9} {'loss':>9}")
    p = res["plain"]
    for v, r in res.items():
        print(f"{v:<12} {r['ms']:>9.1f} {r['ms'] / p['ms']:>8.3f}x {r['peak_mb']:>9.0f} "
              f"{r['peak_mb'] / max(p['peak_mb'], 1e-9):>8.3f}x {r['loss']:>9.4f}")


if __name__ == "__main__":
    main()
