"""Time and memory of one DST mask update at a large-model shape, fast selection against the sort-based
reference (both with the same tie-breaks, so both give the same masks; checked here).

    .venv/bin/python benchmarks/update_scale.py [--preset gpt2-124m] [--n-layer 12] [--methods rigl,srigl]
        [--paths fast,reference] [--repeats 2] [--sparsity 0.9]

One process, the model in fp32 on the CPU, random gradients standing in for a backward pass. For each
(method, path), `repeats` updates at step delta_t (drop fraction 0.3), interleaved so machine noise falls on
both paths alike; reported: mean and min update seconds, the peak resident memory the update adds (sampled
every 2 ms from /proc/self/statm), and the bytes DST holds per sparse weight between updates. Run it under
another dstlm checkout (PYTHONPATH=<tree>) to time that tree's update with `--paths fast` (a tree without
dstlm.sparse.selection times its own rules).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch


class PeakRSS:
    """Peak resident set size while the block runs, sampled from /proc/self/statm."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every, self.page = every_s, os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def added(self) -> int:
        return self.peak - self.base


def build(preset: str, n_layer: int | None, method: str, sparsity: float, seed: int = 0):
    from dstlm.models.gpt import GPT
    from dstlm.models.presets import load_preset
    from dstlm.sparse import SparseEngine, SparsityConfig, TorchBackend

    overrides = {"n_layer": n_layer} if n_layer else {}
    torch.manual_seed(seed)
    model = GPT(load_preset(preset, **overrides))
    cfg = SparsityConfig(method=method, sparsity=sparsity, delta_t=100, t_end=1000, drop_fraction=0.3)
    engine = SparseEngine(model, cfg, seed=seed, max_steps=1000)
    return model, engine, TorchBackend()


def one_update(model, engine, backend, reference: bool) -> tuple[float, int, dict]:
    """Fresh gradients, score capture and the update at step 100; returns (seconds, added bytes, masks)."""
    import contextlib

    gen = torch.Generator().manual_seed(1)
    for sp in engine.params:
        sp.weight.grad = torch.randn(sp.weight.shape, generator=gen)
    engine.before_optimizer_step(100, backend)
    ctx = contextlib.nullcontext()
    if reference:
        from dstlm.sparse.selection import reference_selection

        ctx = reference_selection()
    with ctx, PeakRSS() as mem:
        start = time.perf_counter()
        engine.after_optimizer_step(100, backend)
        seconds = time.perf_counter() - start
    return seconds, mem.added, {sp.name: sp.mask.clone() for sp in engine.params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--n-layer", type=int, default=None)
    ap.add_argument("--methods", default="rigl,srigl")
    ap.add_argument("--paths", default="fast,reference")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    paths = args.paths.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}"
          + (f" with {args.n_layer} layers" if args.n_layer else ""))
    rows = []
    for method in args.methods.split(","):
        times: dict[str, list[float]] = {p: [] for p in paths}
        added: dict[str, list[int]] = {p: [] for p in paths}
        masks: dict[str, dict] = {}
        for _ in range(args.repeats):
            for path in paths:  # each path from the same initial state, interleaved
                model, engine, backend = build(args.preset, args.n_layer, method, args.sparsity)
                n_sparse = sum(sp.mask.numel() for sp in engine.params)
                s, b, m = one_update(model, engine, backend, path == "reference")
                times[path].append(s)
                added[path].append(b)
                masks[path] = m
                del model, engine
        same = None
        if len(paths) > 1:
            a, b = masks[paths[0]], masks[paths[1]]
            same = all(torch.equal(a[n], b[n]) for n in a)
        held = 1 + 1  # bool mask + bool ever-active per sparse weight, between score capture and update +4
        for path in paths:
            rows.append((method, path, statistics.mean(times[path]), min(times[path]),
                         max(added[path]) / n_sparse, same))
        print(f"{method}: {n_sparse:,} sparse weights; masks of {' and '.join(paths)} identical: {same}", flush=True)
    print("\n| method | path | mean update s | min update s | peak added by the update (B / sparse weight) |")
    print("|---|---|---:|---:|---:|")
    for method, path, mean, low, per_w, _ in rows:
        print(f"| {method} | {path} | {mean:.3f} | {low:.3f} | {per_w:.2f} |")
    for method in args.methods.split(","):
        r = {path: mean for m, path, mean, *_ in rows if m == method}
        if "fast" in r and "reference" in r:
            print(f"{method}: reference / fast = {r['reference'] / r['fast']:.1f}x")
    print(f"DST state between updates: {held} B per sparse weight (mask, ever-active), plus 4 B of fp32 score "
          "from the first captured gradient to the update (RigL-like rules)")


if __name__ == "__main__":
    main()
