"""Real speed from constant fan-in: the condensed layer against dense, CSR and "structured only", and a whole
trained SRigL model condensed against itself dense. One process, variants side by side per cell.

Layer table: for each shape (out x in), density and batch, the median and mean time of
- dense:      nn.Linear on the masked weight (what masked DST runs),
- csr:        torch.sparse_csr_tensor @ x (the unstructured sparse baseline),
- structured: dense matmul on the active rows only (ablated units dropped; no sparsity inside rows),
- condensed:  dstlm's compiled kernel (dstlm/sparse/csrc/condensed.cpp),
forward only (inference) and, with --train, forward + backward (input and weight gradients; CSR is not
timed there: PyTorch has no CSR weight gradient). Ratios are against dense and CSR of the same cell.

Model section (--model): trains a GPT with SRigL at --sparsity for --model-steps on the shipped corpus
(`dstlm fit` in-process), exports it with `dstlm export --condensed`, then reports val loss (must be the
same digits) and tokens/s of scoring (batch 8 x block) and of greedy generation (with and without the KV
cache), condensed vs dense, with
where the condensed model's time goes.

    .venv/bin/python benchmarks/condensed.py                     # paper shape 3072->768, 80/90/95/99 %
    .venv/bin/python benchmarks/condensed.py --train --model     # + training step, + whole model
    .venv/bin/python benchmarks/condensed.py --shapes 768x3072 --densities 0.1 --batches 1,256 --iters 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dstlm.sparse.condensed import CondensedLinear  # noqa: E402
from dstlm.sparse.kernels import condensed_ops, isa  # noqa: E402


def timed(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(median, mean) seconds of fn() over `iters` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t)
    return statistics.median(xs), statistics.mean(xs)


def constant_fan_in_layer(out: int, inp: int, density: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = max(1, round(inp * density))
    cols = torch.rand(out, inp, generator=g).argsort(dim=1)[:, :k]
    mask = torch.zeros(out, inp, dtype=torch.bool).scatter_(1, cols, True)
    weight = torch.randn(out, inp, generator=g) * mask / k ** 0.5
    return weight, mask, torch.randn(out, generator=g) * 0.1


def layer_cell(out: int, inp: int, density: float, batch: int, args) -> dict:
    weight, mask, bias = constant_fan_in_layer(out, inp, density)
    dense = torch.nn.Linear(inp, out)
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    csr = weight.to_sparse_csr()
    cond = CondensedLinear.from_masked(weight, mask, bias, path="kernel")
    struct = CondensedLinear.from_masked(weight, mask, bias, path="structured")
    x = torch.randn(batch, inp)
    w, it = args.warmup, args.iters
    row = {}
    with torch.no_grad():
        row["dense"] = timed(lambda: dense(x), w, it)
        row["csr"] = timed(lambda: torch.addmm(bias[:, None], csr, x.t()).t(), w, it)
        row["structured"] = timed(lambda: struct(x), w, it)
        row["condensed"] = timed(lambda: cond(x), w, it)
        torch.testing.assert_close(cond(x), dense(x), rtol=1e-4, atol=1e-4)
    if args.train:
        xg = x.clone().requires_grad_()
        gy = torch.randn(batch, out)

        def step(layer):
            def run():
                layer.zero_grad(set_to_none=True)
                xg.grad = None
                layer(xg).backward(gy)
            return run
        row["dense_train"] = timed(step(dense), w, it)
        row["structured_train"] = timed(step(struct), w, it)
        row["condensed_train"] = timed(step(cond), w, it)
    return row


def print_layer_table(args) -> None:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    print(f"\nCondensed layer (fp32, {torch.get_num_threads()} threads, kernel ISA {isa()}; median µs per call "
          f"after {args.warmup} warm-up calls, {args.iters} timed; mean in brackets where it differs by > 10 %)")
    head = f"{'shape':>9} {'dens':>5} {'batch':>5} | {'dense':>14} {'csr':>14} {'struct':>14} {'condensed':>14} " \
           f"| {'x dense':>7} {'x csr':>6}"
    if args.train:
        head += f" | train: {'dense':>8} {'struct':>8} {'cond':>8} {'x dense':>7}"
    print(head)

    def us(t):
        med, mean = t
        extra = f"({mean * 1e6:.0f})" if abs(mean - med) > 0.1 * med else ""
        return f"{med * 1e6:.0f}{extra}"
    for out, inp in shapes:
        for d in densities:
            for b in batches:
                r = layer_cell(out, inp, d, b, args)
                line = (f"{out}x{inp:<4} {d:>5.2f} {b:>5} | {us(r['dense']):>14} {us(r['csr']):>14} "
                        f"{us(r['structured']):>14} {us(r['condensed']):>14} | "
                        f"{r['dense'][0] / r['condensed'][0]:>6.2f}x {r['csr'][0] / r['condensed'][0]:>5.2f}x")
                if args.train:
                    line += (f" | {r['dense_train'][0] * 1e3:>12.2f}ms {r['structured_train'][0] * 1e3:>6.2f}ms "
                             f"{r['condensed_train'][0] * 1e3:>6.2f}ms "
                             f"{r['dense_train'][0] / r['condensed_train'][0]:>6.2f}x")
                print(line, flush=True)


# -- whole model ----------------------------------------------------------------------------------------------
def model_section(args) -> None:
    from dstlm.checkpoint import export_condensed, load_checkpoint
    from dstlm.models import load_preset
    from dstlm.sparse import SparsityConfig
    from dstlm.training.assembly.build import build
    from dstlm.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig
    from dstlm.training.assembly.run import fit

    out_dir = tempfile.mkdtemp(prefix="dstlm-condensed-")
    model = load_preset(args.preset)
    cfg = RunConfig(name="srigl", out_dir=out_dir, model=model, data=DataConfig(val_batches=4),
                    optim=OptimConfig(), sparsity=SparsityConfig(method="srigl", sparsity=args.sparsity,
                                                                 delta_t=max(1, args.model_steps // 4), t_end=0.75),
                    trainer=TrainerConfig(max_steps=args.model_steps, val_every_n_steps=args.model_steps,
                                          ckpt_every_n_steps=0, progress_bar=False, accelerator="cpu"))
    t0 = time.perf_counter()
    fit(cfg)
    ckpt = Path(out_dir) / "srigl" / "checkpoints" / "last.ckpt"
    print(f"\nWhole model: {args.preset} preset GPT, SRigL {args.sparsity:.0%} trained {args.model_steps} steps "
          f"({time.perf_counter() - t0:.0f} s), {torch.get_num_threads()} threads")
    path, outcome = export_condensed(ckpt, Path(out_dir) / "inference")
    n_cond = sum(v.startswith("condensed") for v in outcome.values())
    print(f"export --condensed: {n_cond} of {len(outcome)} sparse layers condensed; file "
          f"{path.stat().st_size / 1e6:.1f} MB vs {ckpt.stat().st_size / 1e6:.1f} MB (the training checkpoint, "
          f"optimizer state included)")
    dense, cond = load_checkpoint(ckpt), load_checkpoint(path)
    _, _, data = build(cfg, logger=False)
    data.prepare_data()
    data.setup("validate")
    batches = list(data.val_dataloader())
    for name, m in (("dense", dense.model), ("condensed", cond.model)):
        with torch.no_grad():
            losses = [float(m(x, targets=y)) for x, y in batches]  # the model's own (training) loss
        print(f"  val loss {name:<9} {statistics.mean(losses):.6f}  ({len(batches)} batches)")
    block = model.block_size
    x = batches[0][0][:8, :block]
    with torch.no_grad():
        sd = timed(lambda: dense.model(x), args.warmup, args.iters)
        sc = timed(lambda: cond.model(x), args.warmup, args.iters)
    toks = x.numel()
    print(f"  scoring (batch {x.shape[0]} x {x.shape[1]}): dense {toks / sd[0]:,.0f} tokens/s, condensed "
          f"{toks / sc[0]:,.0f} tokens/s -> {sd[0] / sc[0]:.2f}x (means {toks / sd[1]:,.0f} / {toks / sc[1]:,.0f})")
    prompt = batches[0][0][:1, :32]
    new = args.gen_tokens
    for cached in (True, False):
        def gen(model, cached=cached):
            return model.generate(prompt, new, temperature=0, use_cache=cached)
        gd = timed(lambda: gen(dense.model), 3, 10)
        gc = timed(lambda: gen(cond.model), 3, 10)
        greedy = [gen(m) for m in (dense.model, cond.model)]
        how = "KV cache: one row per token" if cached else "no KV cache: the whole context per token"
        print(f"  greedy generation (1 x 32 prompt + {new}; {how}): dense {new / gd[0]:.0f} tokens/s, condensed "
              f"{new / gc[0]:.0f} tokens/s -> {gd[0] / gc[0]:.2f}x "
              f"({'same' if torch.equal(*greedy) else 'DIFFERENT'} tokens)")
    where_time_goes(cond.model, x, args)


def training_section(args) -> None:
    """Training tokens/s of an FFN-heavy GPT: dense, SRigL masked, SRigL condensed (sparsity.condensed), same
    data and steps; step times after --warmup steps, the window holding mask updates."""
    from step_time import intervals, run_lightning

    from dstlm.models import load_preset
    from dstlm.sparse import SparsityConfig
    from dstlm.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig

    total = args.warmup + args.train_steps + 1
    delta_t = max(1, args.train_steps // 2)
    model = load_preset(args.preset)
    model.mlp_ratio = args.mlp_ratio
    variants = {"dense": None,
                "srigl masked": SparsityConfig(method="srigl", sparsity=args.sparsity, delta_t=delta_t, t_end=1.0),
                "srigl condensed": SparsityConfig(method="srigl", sparsity=args.sparsity, delta_t=delta_t, t_end=1.0,
                                                  condensed=True)}
    rows = {}
    for name, sp in variants.items():
        cfg = RunConfig(name=name.replace(" ", "-"), out_dir=tempfile.mkdtemp(prefix="dstlm-bench-"), model=model,
                        data=DataConfig(val_batches=1, batch_size=args.train_batch), optim=OptimConfig(), sparsity=sp,
                        trainer=TrainerConfig(max_steps=total, val_every_n_steps=10**6, ckpt_every_n_steps=0,
                                              progress_bar=False, accelerator="cpu"))
        xs = intervals(run_lightning(cfg, total), args.warmup)
        rows[name] = (statistics.median(xs), statistics.mean(xs))
    tokens = args.train_batch * model.block_size
    print(f"\nTraining: {args.preset} preset with mlp_ratio {args.mlp_ratio} ({model.n_layer} x {model.n_embd}, FFN "
          f"{int(model.n_embd * args.mlp_ratio)}), batch {args.train_batch} x {model.block_size}, SRigL "
          f"{args.sparsity:.0%} ΔT={delta_t}; {args.train_steps} timed steps after {args.warmup} (mask updates in "
          f"the window), {torch.get_num_threads()} threads")
    base = rows["dense"][1]
    masked = rows["srigl masked"][1]
    for name, (med, mean) in rows.items():
        print(f"  {name:<16} median {med * 1e3:8.1f} ms  mean {mean * 1e3:8.1f} ms  {tokens / mean:9,.0f} tokens/s "
              f"(mean)  x dense {base / mean:5.2f}  x masked {masked / mean:5.2f}")


def where_time_goes(model, x, args) -> None:
    """Self time of the condensed model's forward by op (the condensed kernel is a Python-level call: its
    time is what no aten op accounts for)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(5):
            model(x)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                model(x)
        wall = time.perf_counter() - t0
    rows = sorted(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), key=lambda r: -r[1])
    aten = sum(t for _, t in rows) / 1e6
    print(f"  where the condensed model's scoring time goes (10 forwards, {wall * 1e3:.0f} ms with profiler):")
    print(f"    {'condensed kernel (outside aten ops)':<36} {100 * max(0.0, wall - aten) / wall:5.1f} %")
    for key, t in rows[:6]:
        print(f"    {key:<36} {100 * t / 1e6 / wall:5.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="768x3072", help="out x in, comma-separated (the paper's layer: 768x3072)")
    ap.add_argument("--densities", default="0.2,0.1,0.05,0.01")
    ap.add_argument("--batches", default="1,2,4,16,64,256,1024,2048")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--train", action="store_true", help="also time forward + backward")
    ap.add_argument("--model", action="store_true", help="also the whole-model section")
    ap.add_argument("--no-layers", action="store_true", help="skip the layer table")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--model-steps", type=int, default=40)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--training", action="store_true", help="also whole-model training tokens/s")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--mlp-ratio", type=float, default=8.0)
    args = ap.parse_args()
    if condensed_ops() is None:
        sys.exit("the condensed kernel did not build here: nothing to benchmark (see the warning above)")
    if not args.no_layers:
        print_layer_table(args)
    if args.model:
        model_section(args)
    if args.training:
        training_section(args)


if __name__ == "__main__":
    main()
