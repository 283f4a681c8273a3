"""Time and memory of one DST mask update at a large-model shape, fast selection against the sort-based
reference (both with the same tie-breaks, so both give the same masks; checked here).

    .venv/bin/python benchmarks/update_scale.py [--preset gpt2-124m] [--n-layer 12] [--methods rigl,srigl]
        [--paths fast,reference] [--repeats 2] [--sparsity 0.9] [--worlds 1,2,4]

One process, the model in fp32 on the CPU, random gradients standing in for a backward pass. For each
(method, path), `repeats` updates at step delta_t (drop fraction 0.3), interleaved so machine noise falls on
both paths alike; reported: mean and min update seconds, the peak resident memory the update adds (sampled
every 2 ms from /proc/self/statm), and the bytes DST holds per sparse weight between updates. Run it under
another dstlm checkout (PYTHONPATH=<tree>) to time that tree's update with `--paths fast` (a tree without
dstlm.sparse.selection times its own rules).

--against TREE: the same update timed by another dstlm checkout (e.g. a worktree of the engine the speed-up
is claimed against), each (tree, method, repeat) in a fresh process, the trees interleaved, one table with the
ratio. The old tree's masks follow its own rules (other tie-breaks), so they are not compared.

--worlds 1,2,4: the fast path at each world size, ranks as gloo processes on this machine (each with
cores / world threads, or --threads) holding replicas, as under DDP: on more than one rank every rank
decides the masks of its 1/world of each weight through the collective selector and the masks are joined by a
byte all-reduce (dstlm/sparse/selectors.py). Reported per world: mean update seconds (slowest rank), the most any rank's
update added to its resident memory, the fp32 score bytes each rank held, the mask bytes each rank held
(mask and ever-active record), and whether the masks equal the one-process run's.

--partition (with --worlds): masks partitioned across the ranks (sparsity.partition_masks), every parameter split
evenly as ZeRO-3 partitions it; each rank holds and decides only its fragment of every mask, with no join.

--device cuda (one process): the model, masks, gradients and scores on the GPU, so the update runs where the
weights live (the GPU goal: the 124M RigL update in <= 100 ms). Times are taken after a device synchronise;
"peak added" is then the growth of torch's peak allocated GPU memory during the update.

--paths fast,sharded (one process, any device): whole masks against masks partitioned
(sparsity.partition_masks) at world 1, what ZeRO-3 runs on every rank (fragments and their per-row counts
instead of mask buffers); the masks must be identical.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import threading
import sys
import time
from pathlib import Path

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


class PeakDevice:
    """Peak GPU memory torch allocated while the block runs, above what was allocated when it began."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.added = torch.cuda.max_memory_allocated(self.device) - self.base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(preset: str, n_layer: int | None, method: str, sparsity: float, seed: int = 0, shard_by: str = "owner",
          partition: bool = False, device: str = "cpu"):
    from dstlm.models.gpt import GPT
    from dstlm.models.presets import load_preset
    from dstlm.sparse import SparseEngine, SparsityConfig, TorchBackend

    overrides = {"n_layer": n_layer} if n_layer else {}
    torch.manual_seed(seed)
    model = GPT(load_preset(preset, **overrides))
    if device != "cpu":  # the engine keeps its masks beside the weights
        model = model.to(device)
    cfg = SparsityConfig(method=method, sparsity=sparsity, delta_t=100, t_end=1000, drop_fraction=0.3,
                         **({"partition_masks": True} if partition else {}))
    engine = SparseEngine(model, cfg, seed=seed, max_steps=1000)
    # the default spelled out only when not the default: an older checkout (--against) has no shard_by
    return model, engine, (TorchBackend() if shard_by == "owner" else TorchBackend(shard_by=shard_by))


def one_update(model, engine, backend, reference: bool) -> tuple[float, int, dict]:
    """Fresh gradients, score capture and the update at step 100; returns (seconds, added bytes, masks)."""
    import contextlib

    gen = torch.Generator().manual_seed(1)
    device = engine.params[0].weight.device
    for sp in engine.params:  # drawn on the CPU: the same gradients on every device
        sp.weight.grad = torch.randn(sp.weight.shape, generator=gen).to(device)
    engine.before_optimizer_step(100, backend)
    ctx = contextlib.nullcontext()
    if reference:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers.reference_selection import reference_selection

        ctx = reference_selection(engine)
    _sync(device)
    with ctx, (PeakDevice(device) if device.type == "cuda" else PeakRSS()) as mem:
        start = time.perf_counter()
        engine.after_optimizer_step(100, backend)
        _sync(device)
        seconds = time.perf_counter() - start
    masks = engine.whole_masks() if hasattr(engine, "whole_masks") else {sp.name: sp.mask for sp in engine.params}
    return seconds, mem.added, {n: m.to("cpu", copy=True) for n, m in masks.items()}  # (an older tree: no joins)


def _rank(rank: int, world: int, rdzv: str, args: argparse.Namespace, out: torch.Tensor) -> None:
    """One rank of a --worlds run: out[rank, method] = (mean seconds, max added bytes, score bytes, digest,
    mask bytes held)."""
    import torch.distributed as dist

    from dstlm.sparse.masks import mask_checksum

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    for i, method in enumerate(args.methods.split(",")):
        seconds, added = [], []
        for _ in range(args.repeats):
            model, engine, backend = build(args.preset, args.n_layer, method, args.sparsity,
                                           shard_by="entries" if args.partition else args.shard_by,
                                           partition=args.partition)
            if args.partition:
                engine.partition(backend)
            gen = torch.Generator().manual_seed(1)
            for sp in engine.params:
                sp.weight.grad = torch.randn(sp.weight.shape, generator=gen)
            engine.before_optimizer_step(100, backend)
            score_bytes = engine.scores.nbytes
            if world > 1:
                dist.barrier()
            with PeakRSS() as mem:
                start = time.perf_counter()
                engine.after_optimizer_step(100, backend)
                seconds.append(time.perf_counter() - start)
            added.append(mem.added)
            held = _mask_bytes(model, engine)
            digest = mask_checksum(engine.whole_masks().values())  # joined (a collective) when partitioned
            del model, engine
        out[rank, i] = torch.tensor([statistics.mean(seconds), max(added), score_bytes,
                                     float(digest[:, 1].sum() % (2**40)), held], dtype=torch.float64)
    if world > 1:
        dist.destroy_process_group()


def _mask_bytes(model, engine) -> int:
    """Bytes of mask state this rank holds: mask buffers, ever-active records, partitioned fragments."""
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("_mask"))
    ever = sum(e.numel() for e in engine.ever_active.values())
    frags = sum(f.mask.numel() + f.ever.numel() for f in (engine.fragments or {}).values())
    return buffers + ever + frags


def sweep_worlds(args: argparse.Namespace) -> None:
    import tempfile

    import torch.multiprocessing as mp

    methods = args.methods.split(",")
    _, engine, _ = build(args.preset, args.n_layer, methods[0], args.sparsity)
    n_sparse = sum(sp.mask.numel() for sp in engine.params)
    del engine
    rows, digests = [], {}
    for world in (int(w) for w in args.worlds.split(",")):
        out = torch.zeros(world, len(methods), 5, dtype=torch.float64).share_memory_()
        with tempfile.TemporaryDirectory() as tmp:
            if world == 1:
                _rank(0, 1, "", args, out)
            else:
                mp.spawn(_rank, args=(world, f"{tmp}/rdzv", args, out), nprocs=world, join=True)
        for i, method in enumerate(methods):
            digests.setdefault(method, float(out[0, i, 3]))
            same = all(float(out[r, i, 3]) == digests[method] for r in range(world))
            rows.append((method, world, float(out[:, i, 0].max()), float(out[:, i, 1].max()) / n_sparse,
                         float(out[:, i, 2].max()) / n_sparse, same, float(out[:, i, 4].max()) / n_sparse))
            print(f"{method} world {world}: {rows[-1][2]:.3f} s", flush=True)
    threads = args.threads or "cores / world"
    print(f"\n{n_sparse:,} sparse weights, {os.cpu_count()} cores shared by the ranks, {threads} thread(s) per rank, "
          + ("masks partitioned across the ranks (sparsity.partition_masks)" if args.partition else
             f"decisions on shards by {args.shard_by}"))
    print("| method | world | update s (slowest rank) | peak added by the update (B / sparse weight, worst rank) "
          "| fp32 score held per rank (B / sparse weight) | mask state held per rank (B / sparse weight) "
          "| masks equal world 1 |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for method, world, sec, per_w, score, same, held in rows:
        print(f"| {method} | {world} | {sec:.3f} | {per_w:.2f} | {score:.2f} | {held:.3f} | {same} |")


def against(args: argparse.Namespace) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parents[1])
    trees = {"this tree": here, "other tree": str(Path(args.against).resolve())}
    results: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for method in args.methods.split(","):
            for label, tree in trees.items():  # interleaved: machine noise falls on both alike
                env = dict(os.environ, PYTHONPATH=tree)
                cmd = [sys.executable, __file__, "--preset", args.preset, "--methods", method, "--paths", "fast",
                       "--repeats", "1", "--sparsity", str(args.sparsity), "--emit-json"]
                if args.n_layer:
                    cmd += ["--n-layer", str(args.n_layer)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"the update on {tree} failed:\n{proc.stderr[-3000:]}")
                out = proc.stdout
                row = json.loads(out.strip().splitlines()[-1])
                results.setdefault((method, label), []).append(row)
                print(f"repeat {rep + 1}: {method} on {label} ({tree}): {row['seconds']:.3f} s", flush=True)
    print(f"\n{args.preset}{f' with {args.n_layer} layers' if args.n_layer else ''}, {torch.get_num_threads()} "
          f"threads, {args.repeats} repeat(s) per tree, each update in a fresh process")
    print("| method | other tree: mean (min) s | this tree: mean (min) s | speed-up (means) | peak added, B / sparse "
          "weight (other -> this) |")
    print("|---|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        old, new = results[(method, "other tree")], results[(method, "this tree")]
        mo, mn = (statistics.mean(r["seconds"] for r in x) for x in (old, new))
        lo, ln = (min(r["seconds"] for r in x) for x in (old, new))
        bo, bn = (max(r["added_per_weight"] for r in x) for x in (old, new))
        print(f"| {method} | {mo:.2f} ({lo:.2f}) | {mn:.2f} ({ln:.2f}) | {mo / mn:.1f}x | {bo:.2f} -> {bn:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--n-layer", type=int, default=None)
    ap.add_argument("--methods", default="rigl,srigl")
    ap.add_argument("--paths", default="fast,reference")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--worlds", default=None, help="comma-separated world sizes: sweep the fast path over them")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads per rank in --worlds runs (default: cores / world); 1 compares equal work per "
                         "core across world sizes on a machine with fewer cores than ranks x threads")
    ap.add_argument("--shard-by", default="owner", choices=["owner", "entries"],
                    help="--worlds runs: replicas decide whole parameters by owner (DDP's default) or split every "
                         "parameter evenly and decide with the collective rules (what ZeRO runs)")
    ap.add_argument("--partition", action="store_true",
                    help="--worlds runs: masks partitioned across the ranks (sparsity.partition_masks, as ZeRO-3)")
    ap.add_argument("--against", default=None, help="another dstlm checkout to time in the same run (see above)")
    ap.add_argument("--device", default="cpu", help="one-process runs: where the model and masks live (cuda: a GPU)")
    ap.add_argument("--emit-json", action="store_true", help=argparse.SUPPRESS)  # one update, one JSON line
    args = ap.parse_args()
    if args.device != "cpu" and (args.worlds or args.against):
        raise SystemExit(f"--device {args.device} times one process; drop --worlds / --against")
    if args.against:
        against(args)
        return
    if args.emit_json:
        import json

        method = args.methods.split(",")[0]
        model, engine, backend = build(args.preset, args.n_layer, method, args.sparsity)
        n_sparse = sum(sp.mask.numel() for sp in engine.params)
        seconds, added, _ = one_update(model, engine, backend, reference=False)
        print(json.dumps({"seconds": seconds, "added_per_weight": added / n_sparse}))
        return
    if args.worlds:
        sweep_worlds(args)
        return
    paths = args.paths.split(",")
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}, preset {args.preset}"
          + (f" with {args.n_layer} layers" if args.n_layer else ""))
    if args.device.startswith("cuda"):  # the first update pays for kernel loading and the allocator's growth
        model, engine, backend = build(args.preset, args.n_layer, "rigl", args.sparsity, device=args.device)
        one_update(model, engine, backend, False)
        del model, engine
    rows = []
    for method in args.methods.split(","):
        times: dict[str, list[float]] = {p: [] for p in paths}
        added: dict[str, list[int]] = {p: [] for p in paths}
        masks: dict[str, dict] = {}
        for _ in range(args.repeats):
            for path in paths:  # each path from the same initial state, interleaved
                sharded = path == "sharded"
                model, engine, backend = build(args.preset, args.n_layer, method, args.sparsity, device=args.device,
                                               partition=sharded, shard_by="entries" if sharded else "owner")
                n_sparse = sum(math.prod(engine.layers[sp.name].shape) for sp in engine.params)
                if sharded:
                    engine.partition(backend)
                s, b, m = one_update(model, engine, backend, path == "reference")
                times[path].append(s)
                added[path].append(b)
                masks[path] = m
                del model, engine
        same = None
        if len(paths) > 1:
            a, b = masks[paths[0]], masks[paths[1]]
            same = all(torch.equal(a[n], b[n]) for n in a)
        held = 1 + 1 / 8  # bool mask + bit-packed ever-active per sparse weight; +4 from score capture to update
        for path in paths:
            rows.append((method, path, statistics.mean(times[path]), min(times[path]),
                         max(added[path]) / n_sparse, same))
        print(f"{method}: {n_sparse:,} sparse weights; masks of {' and '.join(paths)} identical: {same}", flush=True)
    memory = "GPU memory allocated" if args.device.startswith("cuda") else "resident memory"
    print(f"\n| method | path | mean update s | min update s | peak {memory} added by the update (B / sparse weight) |")
    print("|---|---|---:|---:|---:|")
    for method, path, mean, low, per_w, _ in rows:
        print(f"| {method} | {path} | {mean:.3f} | {low:.3f} | {per_w:.2f} |")
    for method in args.methods.split(","):
        r = {path: mean for m, path, mean, *_ in rows if m == method}
        if "fast" in r and "reference" in r:
            print(f"{method}: reference / fast = {r['reference'] / r['fast']:.1f}x")
    print(f"DST state between updates: {held:.3f} B per sparse weight (mask, ever-active), plus 4 B of fp32 score "
          "from the first captured gradient to the update (RigL-like rules)")


if __name__ == "__main__":
    main()
