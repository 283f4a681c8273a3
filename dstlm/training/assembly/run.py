"""Run a RunConfig: fit (with resume, resharding a ZeRO checkpoint written by another world size) and validate."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from dstlm.checkpoint import checkpoint_problem, consolidate_checkpoint, is_deepspeed_checkpoint, newest_readable
from dstlm.training.assembly.build import build, run_dir
from dstlm.training.config import RunConfig
from dstlm.training.resilience.preemption import (FINISHED, finished_marker, newest_complete, set_aside_incomplete,
                                                  write_finished)
from dstlm.training.assembly.summary import peak_memory

__all__ = ["build", "fit", "run_dir", "validate"]


def _reshard_if_needed(cfg: RunConfig, trainer: L.Trainer, ckpt_path: str) -> str:
    """A ZeRO checkpoint written by another number of ranks resumes through DeepSpeed's universal format."""
    if not is_deepspeed_checkpoint(ckpt_path):
        return ckpt_path
    from dstlm.training.zero.strategies import DeepSpeedZeRO, saved_world_size, universal_checkpoint

    if not isinstance(trainer.strategy, DeepSpeedZeRO):
        raise ValueError(f"{ckpt_path} is a DeepSpeed ZeRO checkpoint but trainer.strategy={cfg.trainer.strategy!r}; "
                         f"resume it with a deepspeed_stage_N strategy (any number of ranks)")
    saved, now = saved_world_size(ckpt_path), cfg.trainer.devices * cfg.trainer.num_nodes
    if saved == now:
        return ckpt_path
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    if rank == 0:
        print(f"dstlm: {ckpt_path} was written by {saved} rank(s), resuming on {now}: "
              f"loading it through DeepSpeed's universal checkpoint format")
    universal = universal_checkpoint(ckpt_path, rank)
    trainer.strategy.config.setdefault("checkpoint", {})["load_universal"] = True
    return str(universal)


def fit(cfg: RunConfig, ckpt_path: Optional[str] = None, extra_callbacks: Optional[list] = None) -> dict:
    """Train; returns (and writes to out_dir/name/summary.json) the final metrics. The run folder also gets
    config.yaml (what ran) and, for sparse runs, sparsity.yaml (the layout the engine used)."""
    out = run_dir(cfg)
    if ckpt_path == "auto":
        done = finished_marker(out)
        if done and (done.get("steps") or 0) >= cfg.trainer.max_steps:
            if _rank() == 0:
                print(f"dstlm: {out} finished {done['steps']} steps already ({out / FINISHED}); nothing to do "
                      f"(raise trainer.max_steps to train on)", flush=True)
            return {"run": str(out), "finished": True, **done}
        ckpt_path = _auto_resume(out)
    trainer, module, data = build(cfg, extra_callbacks)
    if ckpt_path == "last":
        last = out / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise FileNotFoundError(f"--ckpt_path last: no checkpoint at {last}; train first or give a path")
        ckpt_path = _readable(out, last, "--ckpt_path last")
    elif ckpt_path is not None and not Path(ckpt_path).exists():
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist")
    elif ckpt_path is not None:
        problem = checkpoint_problem(ckpt_path)
        if problem is not None:
            raise ValueError(f"checkpoint {ckpt_path} is unreadable: {problem}; give another one, or "
                             f"--ckpt_path last for the newest readable checkpoint of the run")
    if ckpt_path is not None:
        ckpt_path = _reshard_if_needed(cfg, trainer, ckpt_path)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    wall = time.perf_counter() - t0
    if ckpt_path is not None and trainer.global_step >= cfg.trainer.max_steps and \
            not {"train/loss", "val/loss"} & set(trainer.callback_metrics):  # no step ran: nothing was logged
        _finish_resumed(trainer, module, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    summary = {
        "run": str(out), "steps": trainer.global_step, "wall_s": round(wall, 1),
        "val_loss": metrics.get("val/loss"), "val_ppl": metrics.get("val/ppl"),
        "train_loss": metrics.get("train/loss"),
        "params": module.model.num_params(non_embedding=False),
        "train_tokens_seen": trainer.global_step * cfg.trainer.accumulate_grad_batches * cfg.data.batch_size
        * cfg.data.block_size * trainer.world_size,
        "corpus_tokens": getattr(data, "stats", {}),
        **peak_memory(trainer.strategy.root_device),
        "loss_png": str(out / "loss.png"), "logs": str(out / "logs"),
        "checkpoint": str(out / "checkpoints" / "last.ckpt"),
    }
    for cb in trainer.callbacks:
        if hasattr(cb, "summary"):
            summary.update(cb.summary())
    if trainer.is_global_zero:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if not summary.get("preempted") and trainer.global_step >= cfg.trainer.max_steps:
            write_finished(out, summary)
    return summary


def _finish_resumed(trainer, module, data) -> None:
    """A run resumed from a checkpoint at trainer.max_steps (its job died after the last save, e.g. in the final
    evaluation): Lightning then runs no step and calls no end-of-training hook, so do what the end of training
    does: the validation and the callbacks' end-of-training work (lm-eval, the final sparsity record)."""
    if _rank() == 0:
        print(f"dstlm: the checkpoint is at step {trainer.global_step} = trainer.max_steps: finishing the run "
              f"(validation, end-of-training evaluation)", flush=True)
    trainer.validate(module, datamodule=data, verbose=False)
    for cb in trainer.callbacks:
        if hasattr(cb, "finish_training"):
            cb.finish_training(trainer, module)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0"))))


def _readable(out: Path, first: Path, how: str) -> str:
    """`first`, or the newest readable step checkpoint when it is truncated or corrupt (said on rank 0)."""
    found, skipped = newest_readable(out / "checkpoints", first)
    if _rank() == 0:
        for line in skipped:
            print(f"dstlm: {line}; passing over it", flush=True)
    if found is None:
        raise ValueError(f"{how}: no readable checkpoint in {out / 'checkpoints'} ({'; '.join(skipped)}); "
                         f"start over without --ckpt_path, or restore a copy")
    if skipped and _rank() == 0:
        print(f"dstlm: resuming from the newest readable checkpoint instead: {os.path.realpath(found)}", flush=True)
    return str(found)


def _auto_resume(out: Path) -> Optional[str]:
    """--ckpt_path auto: the newest complete checkpoint of the run folder (what a killed save left is set aside
    and named), or None to start from scratch."""
    rank = _rank()
    moved = set_aside_incomplete(out / "checkpoints", rank)
    last = newest_complete(out / "checkpoints")
    if rank == 0:
        for m in moved:
            print(f"dstlm: set aside an incomplete checkpoint (a save was interrupted): {m}", flush=True)
        print(f"dstlm: resuming from {last} -> {os.path.realpath(last)}" if last else
              f"dstlm: no checkpoint in {out / 'checkpoints'}: starting from scratch", flush=True)
    return _readable(out, last, "--ckpt_path auto") if last else None


def validate(cfg: RunConfig, ckpt_path: Optional[str]) -> dict:
    """Validation loss/perplexity of a checkpoint (a .ckpt file, a DeepSpeed directory or a run folder)."""
    if ckpt_path == "last":
        ckpt_path = str(run_dir(cfg) / "checkpoints" / "last.ckpt")
    if ckpt_path is not None and not Path(ckpt_path).exists():
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist")
    if cfg.trainer.strategy.startswith("deepspeed") or (ckpt_path and is_deepspeed_checkpoint(ckpt_path)):
        # Validation needs no sharding of the optimizer: consolidate a ZeRO checkpoint to one fp32 file (any
        # stage, any world size) and validate it data-parallel. (Lightning cannot validate from a ZeRO-3
        # directory itself, and a DeepSpeed engine without an optimizer is not needed here.)
        cfg = replace(cfg, trainer=replace(cfg.trainer, strategy="ddp" if cfg.trainer.devices > 1 else "auto",
                                           offload_optimizer=False, offload_params=False, deepspeed_config=None,
                                           zero_init=False))
        if ckpt_path and is_deepspeed_checkpoint(ckpt_path):
            # one file per process: no rank waits for another (there is no process group yet)
            rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
            ckpt_path = str(consolidate_checkpoint(ckpt_path, run_dir(cfg) / f".consolidated-rank{rank}.ckpt"))
    trainer, module, data = build(cfg, logger=False)
    results = trainer.validate(module, datamodule=data, ckpt_path=ckpt_path, verbose=False)[0]
    results = {k: float(v) for k, v in results.items()}
    if "val/loss" in results and "val/ppl" not in results:
        results["val/ppl"] = math.exp(results["val/loss"])
    return results
