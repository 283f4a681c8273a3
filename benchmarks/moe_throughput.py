"""Training tokens/s of the tiny MoE GPT vs the dense tiny GPT with the same active parameters per token.

configs/model/tiny-moe.yaml routes each token to 1 of 4 experts of the dense MLP's width in every 2nd block,
so a token meets the dense model's weights plus a 192 x 4 router. Both models train (forward, backward,
clipping, AdamW) on the same random token batches in one process; the two alternate `--rounds` times so
machine noise hits both; tokens/s is from the median step time after `--warmup` steps.

    .venv/bin/python benchmarks/moe_throughput.py [--steps 60] [--warmup 30] [--rounds 2] [--batch 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dstlm.models import GPT, load_preset  # noqa: E402
from dstlm.training.loop.module import param_groups  # noqa: E402


def step_times(model: GPT, batches: list[torch.Tensor], warmup: int) -> list[float]:
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, foreach=True)
    stamps = []
    for x in batches:
        loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    dense_cfg, moe_cfg = load_preset("tiny"), load_preset("tiny-moe")
    T = dense_cfg.block_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, dense_cfg.vocab_size, (args.batch, T + 1), generator=gen)
               for _ in range(args.warmup + args.steps + 1)]
    times: dict[str, list[float]] = {"dense": [], "moe": []}
    models = {}
    for name, cfg in (("dense", dense_cfg), ("moe", moe_cfg)):
        torch.manual_seed(0)
        models[name] = GPT(cfg)
    def active_params(m: GPT) -> int:  # experts a token does not visit do not count
        idle = sum((b.cfg.num_experts - b.cfg.top_k) * (b.w_in[0].numel() + b.w_out[0].numel()) for b in m.moe_layers())
        return m.num_params() - idle

    active = {n: active_params(m) for n, m in models.items()}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name] += step_times(model, batches, args.warmup)
    tps = {n: args.batch * T / statistics.median(t) for n, t in times.items()}
    print(f"tiny GPT vs tiny MoE (4 experts, top-1, every 2nd block), batch {args.batch} x {T} tokens, "
          f"median of {args.rounds} x {args.steps} steps after {args.warmup} warm-up")
    print(f"{'model':<8} {'params':>12} {'active/token':>13} {'tokens/s':>10}")
    for n, m in models.items():
        print(f"{n:<8} {m.num_params():>12,} {active[n]:>13,} {tps[n]:>10,.0f}")
    print(f"MoE / dense tokens/s: {tps['moe'] / tps['dense']:.3f}")


if __name__ == "__main__":
    main()
