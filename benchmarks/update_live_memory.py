"""Peak of the tensors alive during one DST mask update with masks partitioned (the rules ZeRO-3 runs), counted
exactly op by op rather than sampled from the process's resident memory.

    .venv/bin/python benchmarks/update_live_memory.py [--preset gpt-1b] [--n-layer 2] [--methods rigl,srigl,set]

One process on the CPU, partitioned masks at world 1 (each fragment is a whole parameter, decided through the
collective selector of dstlm/sparse/selectors.py, which reads it a block at a time). Every tensor an op makes during the
update (views and in-place results excepted) is counted from its creation until it is freed; reported: the
peak of their sum, per sparse weight, and the largest tensors alive at that peak. The model: one byte per entry
of the parameter being decided (its new mask, L bytes for the largest) plus a block's working set of fixed
size. Resident memory (update_scale.py's "peak added") also counts what the C allocator keeps after frees.
"""

from __future__ import annotations

import argparse
import os
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))
import update_scale  # noqa: E402  (the same model, engine and gradients as the timing benchmark)


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensors ops create inside the block, alive at once: now, at the peak, and what they were."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}
        self.what: dict[int, tuple] = {}
        self.at_peak: list[tuple[int, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor):
                continue
            key, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if n == 0 or key in self.sizes:
                continue
            self.sizes[key], self.what[key] = n, (str(func), str(t.dtype).replace("torch.", ""), tuple(t.shape))
            self.live += n
            if self.live > self.peak:
                self.peak = self.live
                self.at_peak = sorted(((v, self.what[k]) for k, v in self.sizes.items()), key=lambda x: -x[0])[:4]
            weakref.finalize(t, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)
        self.what.pop(key, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-1b")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--methods", default="rigl,srigl,set")
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| method | sparse weights | largest parameter (entries) | peak live, MiB | B / sparse weight | "
          "largest tensors alive at the peak |\n|---|---:|---:|---:|---:|---|")
    for method in args.methods.split(","):
        model, engine, backend = update_scale.build(args.preset, args.n_layer, method, args.sparsity,
                                                    partition=True, shard_by="entries")
        engine.partition(backend)
        gen = torch.Generator().manual_seed(1)
        for sp in engine.params:
            sp.weight.grad = torch.randn(sp.weight.shape, generator=gen)
        engine.before_optimizer_step(100, backend)
        n_sparse = sum(f.length for f in engine.fragments.values())
        largest = max(f.length for f in engine.fragments.values())
        with LiveTensors() as live:
            engine.after_optimizer_step(100, backend)
        top = "; ".join(f"{v / 2**20:.1f} MiB {w[1]}{list(w[2])}" for v, w in live.at_peak)
        print(f"| {method} | {n_sparse:,} | {largest:,} | {live.peak / 2**20:.1f} | {live.peak / n_sparse:.3f} | "
              f"{top} |", flush=True)
        del model, engine


if __name__ == "__main__":
    main()
