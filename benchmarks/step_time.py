"""dstlm's Lightning training step vs a plain-torch loop on the same model, data and optimizer.

Both loops do the same work per step: forward, backward, gradient clipping, AdamW, LR schedule, on the
same batches of the shipped corpus. Timing is the wall time between consecutive steps after a warm-up,
median over the measured steps; the two loops alternate `--rounds` times in one process so machine
noise hits both. Prints a table and the ratio (goal: Lightning / plain <= 1.05).

    .venv/bin/python benchmarks/step_time.py [--steps 60] [--warmup 30] [--rounds 2] [--preset tiny]
    python benchmarks/step_time.py --accelerator gpu --preset gpt2-124m --tokenizer gpt2 --block-size 1024
        (on a GPU: bf16 autocast in the plain loop, bf16-mixed in Lightning; also prints MFU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dstlm.models import GPT, load_preset  # noqa: E402
from dstlm.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig  # noqa: E402
from dstlm.training.loop.module import build_optimizer, lr_lambda  # noqa: E402
from dstlm.training.assembly.build import build  # noqa: E402


class StepTimer(L.Callback):
    def __init__(self):
        self.stamps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stamps.append(time.perf_counter())


def intervals(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def run_lightning(cfg: RunConfig, total: int, modules: list | None = None) -> list[float]:
    """Step end times of a Lightning run; the trained module is appended to `modules` if given."""
    cfg.trainer.max_steps = total
    timer = StepTimer()
    trainer, module, data = build(cfg, [timer])
    trainer.fit(module, datamodule=data)
    if modules is not None:
        modules.append(module)
    return timer.stamps


def run_plain(cfg: RunConfig, total: int) -> list[float]:
    """The loop a careful user would write by hand, on the same batches Lightning sees."""
    L.seed_everything(cfg.seed, verbose=False)
    _, _, data = build(cfg, logger=False)
    data.prepare_data()
    data.setup("fit")
    device = torch.device("cuda" if cfg.trainer.accelerator == "gpu" else "cpu")
    model = GPT(cfg.model).to(device)
    model.lm_head.chunk_tokens = cfg.trainer.loss_chunk_tokens
    opt = build_optimizer(model, cfg.optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, total))
    stamps = []
    model.train()
    for step, (x, y) in enumerate(data.train_dataloader()):
        if step >= total:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # Lightning logs the loss every step, which synchronises; do the same here
        stamps.append(time.perf_counter())
    return stamps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=60, help="measured steps per round")
    ap.add_argument("--warmup", type=int, default=30, help="steps discarded per round (>= 30)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--tokenizer", default="bpe", help="bpe (trained on the corpus) or gpt2")
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU on a GPU (H100 SXM bf16)")
    ap.add_argument("--loss-chunk-tokens", type=int, default=4096, help="fused loss chunk (0 = full logits)")
    ap.add_argument("--fused-optimizer", action="store_true", help="AdamW fused=True in both loops")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    out = tempfile.mkdtemp(prefix="dstlm-bench-")
    cfg = RunConfig(name="bench", out_dir=out, model=load_preset(args.preset),
                    data=DataConfig(batch_size=args.batch_size, val_batches=1, block_size=args.block_size,
                                    tokenizer=args.tokenizer), optim=OptimConfig(fused=args.fused_optimizer),
                    trainer=TrainerConfig(max_steps=1, val_every_n_steps=10**6, ckpt_every_n_steps=0,
                                          progress_bar=False, accelerator=args.accelerator,
                                          precision="bf16-mixed" if args.accelerator == "gpu" else "32-true",
                                          deterministic=args.accelerator == "cpu",
                                          loss_chunk_tokens=args.loss_chunk_tokens))
    total = args.warmup + args.steps + 1
    tokens = args.batch_size * cfg.data.block_size
    results = {"plain torch": [], "dstlm (Lightning)": []}
    for _ in range(args.rounds):
        results["plain torch"] += intervals(run_plain(cfg, total), args.warmup)
        results["dstlm (Lightning)"] += intervals(run_lightning(cfg, total), args.warmup)
    print(f"\nstep time, {args.preset} GPT, batch {args.batch_size} x {cfg.data.block_size} tokens, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up")
    print(f"{'loop':<20} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'tokens/s':>10}")
    med = {}
    for name, xs in results.items():
        xs = sorted(xs)
        med[name] = statistics.median(xs)
        print(f"{name:<20} {med[name] * 1e3:>10.1f} {xs[len(xs) // 10] * 1e3:>8.1f} "
              f"{xs[9 * len(xs) // 10] * 1e3:>8.1f} {tokens / med[name]:>10,.0f}")
    ratio = med["dstlm (Lightning)"] / med["plain torch"]
    print(f"ratio Lightning / plain = {ratio:.3f}  (goal <= 1.05)")
    if args.accelerator == "gpu":
        with torch.device("meta"):
            fpt = GPT(cfg.model).flops_per_token()
        for name, m in med.items():
            print(f"MFU {name}: {fpt * tokens / m / (args.peak_tflops * 1e12):.1%}")


if __name__ == "__main__":
    main()
