"""Start-up memory of ZeRO-3: the model built whole on every rank vs built partitioned (trainer.zero_init).

    .venv/bin/python benchmarks/zero_init_memory.py [--preset gpt-1b] [--n-layer 2] [--worlds 2,4]
        [--method srigl] [--sparsity 0.9] [--steps 1] [--budget-gb G | --budget-fraction F] [--no-os-cap]

For each world size, two real `dstlm` ZeRO-3 runs on the CPU (gloo, ranks under torchrun, 1 thread each) of
the same model, data and seed: one built whole, one built partitioned. Each rank reports the peak resident
memory the model build added (model init + the sparse engine's first masks; /proc/self/status VmHWM after
clear_refs) and the peak of the whole start-up plus `--steps` training steps. Then the table, with the
model's fp32 weight bytes for scale, and whether the two runs' final weights and masks are equal.

--budget-gb G: the per-rank host-memory budget of the build. Default: 0.9x the fp32 weight bytes
(`--budget-fraction`), a rank that cannot hold the model whole. Where this machine lets a process create
cgroup-v1 memory groups (/sys/fs/cgroup/memory writable, e.g. as root in a container) the budget is enforced by
the OS: each rank moves itself into its own memory cgroup with `memory.limit_in_bytes` = G for the duration of
the build (model init, first masks, conversion to ZeRO-3 parameters); memory the process held before counts
against its old group, so the cap bounds exactly what the build adds, and a rank that needs more is OOM-killed
(no swap is used: the cap also limits memory+swap where the kernel accounts it). The cgroup's own peak
(`memory.max_usage_in_bytes`) is reported next to the VmHWM measurement. Without cgroups (`--no-os-cap`, or not
permitted) the build "fits" when its measured peak stays under G. After the build the cap is lifted: on a GPU
machine the build is what runs in host memory, and the training states then live on the device. The start-up +
steps column is reported for scale: on the CPU it holds DeepSpeed's own buffers too (gather/reduce buckets,
sized by the DeepSpeed config), whichever build ran.

Worker mode (set by the launcher): `--worker OUT` runs one rank and writes OUT/rank<r>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CGROUPS = Path("/sys/fs/cgroup/memory")


def cgroup_caps_available() -> bool:
    """Whether this process may create memory cgroups (cgroup v1) to cap its ranks."""
    probe = CGROUPS / f"dstlm-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


class BuildCap:
    """Rank `rank`'s OS memory cap for the build: its own memory cgroup (named by the launch), limited to `budget`
    bytes while the build runs; the launcher reads the group's peak and OOM kills afterwards and removes it."""

    def __init__(self, launch_id: str, rank: int, budget: int) -> None:
        self.group = CGROUPS / f"{launch_id}-rank{rank}"
        self.parent = Path("/sys/fs/cgroup/memory" + _own_memory_cgroup())
        self.budget = budget

    def _write(self, name: str, value) -> None:
        (self.group / name).write_text(str(value))

    @contextmanager
    def capped(self):
        self.group.mkdir(exist_ok=True)
        self._write("memory.limit_in_bytes", self.budget)
        if (self.group / "memory.memsw.limit_in_bytes").exists():
            self._write("memory.memsw.limit_in_bytes", self.budget)  # no escape into swap
        (self.group / "cgroup.procs").write_text(str(os.getpid()))  # what it allocates from now on counts here
        try:
            yield
        finally:
            (self.parent / "cgroup.procs").write_text(str(os.getpid()))  # the cap is lifted for training


def _own_memory_cgroup() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path if path != "/" else ""
    return ""


def read_caps(launch_id: str, world: int) -> list[dict]:
    """Per rank: the cgroup's peak charge (bytes) and its OOM kills; the groups are removed."""
    out = []
    for rank in range(world):
        group = CGROUPS / f"{launch_id}-rank{rank}"
        if not group.is_dir():
            out.append({"cap_peak": None, "oom_kills": 0})
            continue
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        control = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        failcnt = int((group / "memory.failcnt").read_text())
        out.append({"cap_peak": peak, "oom_kills": int(control.get("oom_kill", 0)), "failcnt": failcnt})
        for _ in range(50):  # a killed rank's group empties once the process is reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return out


def worker(args) -> None:
    import lightning as L
    import torch

    from dstlm.models.presets import load_preset
    from dstlm.sparse import SparsityConfig
    from dstlm.training.assembly.build import build
    from dstlm.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig
    from dstlm.training.zero.strategies import peak_rss, reset_peak_rss

    out = Path(args.worker)
    world = int(os.environ["WORLD_SIZE"])
    model = load_preset(args.preset, n_layer=args.n_layer, block_size=args.block)
    cfg = RunConfig(
        name="run", out_dir=str(out), seed=11, model=model,
        data=DataConfig(files=[str(REPO / "dstlm" / "assets" / "corpus" / "tinyshakespeare.txt")],
                        tokenizer="gpt2", vocab_size=model.vocab_size, block_size=args.block, batch_size=1,
                        val_batches=1),
        optim=OptimConfig(lr=1e-4, warmup_steps=0),
        trainer=TrainerConfig(max_steps=args.steps, devices=world, strategy="deepspeed_stage_3", accelerator="cpu",
                              val_every_n_steps=10**6, ckpt_every_n_steps=0, progress_bar=False,
                              zero_init=args.zero_init),
        sparsity=SparsityConfig(method=args.method, sparsity=args.sparsity, delta_t=10**6))

    class Report(L.Callback):
        def on_train_end(self, trainer, module):
            masks = module.sparse_engine.whole_masks()  # joined from the ranks' fragments (a collective)
            params = list(module.model.parameters())
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):  # for the equality check only, after the peak was read
                digest = {n: float(p.detach().double().sum()) for n, p in module.model.named_parameters()}
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
                "build_peak": trainer.strategy.build_peak_bytes, "run_peak": self.run_peak,
                "baseline": self.baseline, "masks": {n: int(m.sum()) for n, m in masks.items()},
                "mask_hash": float(sum(float(m.nonzero()[:, -1].double().sum()) for m in masks.values())),
                "weights": digest}))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.run_peak = (peak_rss() or 0) - self.baseline

        def setup(self, trainer, module, stage):
            self.baseline = reset_peak_rss() or 0  # before the build: the resident memory of the process itself

    torch.set_num_threads(1)
    trainer, module, data = build(cfg, [Report()], logger=False)
    if args.cap_id:  # the OS caps the build (model init, first masks, conversion to ZeRO-3 parameters)
        cap = BuildCap(args.cap_id, int(os.environ["RANK"]), int(args.budget))
        strategy = trainer.strategy
        sharded = strategy.model_sharded_context

        @contextmanager
        def capped_build():
            with cap.capped(), sharded():
                yield

        strategy.model_sharded_context = capped_build
    trainer.fit(module, datamodule=data)


def launch(args, world: int, zero_init: bool, budget: float, os_cap: bool) -> tuple[Optional[list[dict]], float, list]:
    """Per rank its report (None when the run failed: under an OS cap, an OOM-killed build), the seconds, and
    per rank the cgroup's peak and OOM kills (empty without an OS cap)."""
    out = Path(tempfile.mkdtemp(prefix=f"zi-w{world}-{int(zero_init)}-"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
           "--worker", str(out), "--preset", args.preset, "--n-layer", str(args.n_layer), "--block", str(args.block),
           "--method", args.method, "--sparsity", str(args.sparsity), "--steps", str(args.steps),
           "--budget", str(int(budget))]
    cap_id = f"dstlm-zi-{os.getpid()}-w{world}-{int(zero_init)}"
    if os_cap:
        cmd += ["--cap-id", cap_id]
    if zero_init:
        cmd.append("--zero-init")
    # glibc raises its mmap threshold after large frees (up to 32 MB), keeping freed tensors resident in the heap;
    # a fixed threshold returns every tensor over 1 MB to the system when freed, so peaks measure what is live
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": "1048576"}
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    secs = time.time() - t0
    caps = read_caps(cap_id, world) if os_cap else []
    if r.returncode != 0:
        if any(c["oom_kills"] for c in caps):
            return None, secs, caps
        raise SystemExit(f"world {world} zero_init={zero_init} failed:\n{r.stderr[-3000:]}")
    return [json.loads((out / f"rank{i}.json").read_text()) for i in range(world)], secs, caps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt-1b")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--method", default="srigl")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--budget-gb", type=float, default=None)
    ap.add_argument("--budget-fraction", type=float, default=0.9, help="budget as a fraction of the fp32 weights "
                    "(when --budget-gb is not given)")
    ap.add_argument("--no-os-cap", action="store_true", help="check the budget by measurement only")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--zero-init", action="store_true")
    ap.add_argument("--cap-id", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from dstlm.build import build_model
    from dstlm.models.presets import load_preset

    import torch

    with torch.device("meta"):
        model = build_model(load_preset(args.preset, n_layer=args.n_layer, block_size=args.block))
    n_params = sum(p.numel() for p in model.parameters())
    fp32 = 4 * n_params
    budget = args.budget_gb * 2**30 if args.budget_gb else args.budget_fraction * fp32
    os_cap = not args.no_os_cap and cgroup_caps_available()
    gib = 2**30
    print(f"{args.preset} with {args.n_layer} layers: {n_params / 1e6:.0f} M parameters, fp32 weights "
          f"{fp32 / gib:.2f} GiB; {args.method} {args.sparsity:.0%}; per-rank build budget {budget / gib:.2f} GiB, "
          f"{'enforced by the OS (a memory cgroup per rank)' if os_cap else 'checked by measurement'}\n")
    print("| world | build | build peak / rank (GiB, max) | OS cap peak / rank (GiB, max) | build within budget | "
          "start-up + steps peak / rank (GiB, max) | s |")
    print("|---:|---|---:|---:|---|---:|---:|")
    for world in [int(w) for w in args.worlds.split(",")]:
        results = {}
        for zero_init in (False, True):
            ranks, secs, caps = launch(args, world, zero_init, budget, os_cap)
            results[zero_init] = ranks
            how = "partitioned" if zero_init else "whole"
            cap_peak = max((c["cap_peak"] or 0 for c in caps), default=0)
            cap_text = f"{cap_peak / gib:.2f}" if caps else "-"
            if ranks is None:
                kills = sum(c["oom_kills"] for c in caps)
                print(f"| {world} | {how} | - | {cap_text} | no: {kills} rank(s) OOM-killed at the cap | - | "
                      f"{secs:.0f} |", flush=True)
                continue
            build_peak = max(r["build_peak"] for r in ranks)
            run_peak = max(r["run_peak"] for r in ranks)
            fits = build_peak <= budget if not caps else not any(c["oom_kills"] for c in caps)
            print(f"| {world} | {how} | {build_peak / gib:.2f} | {cap_text} | {'yes' if fits else 'no'} | "
                  f"{run_peak / gib:.2f} | {secs:.0f} |", flush=True)
        if results[False] is None or results[True] is None:
            print("|   | equal weights and masks: not compared (a run did not start) | | | | | |")
            continue
        same = all(a["weights"] == b["weights"] and a["masks"] == b["masks"] and a["mask_hash"] == b["mask_hash"]
                   for a, b in zip(results[False], results[True]))
        print(f"|   | equal weights and masks after {args.steps} step(s): {'yes' if same else 'NO'} | | | | | |")


if __name__ == "__main__":
    main()
