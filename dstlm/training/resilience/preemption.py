"""Preemption and automatic resume: what a job on a shared cluster needs to survive being stopped.

- The preemption signal (SLURM's `--signal=USR2@<lead seconds>`, or `scancel --signal=USR2`) only sets a flag
  in the handler: saving inside a signal handler can interrupt a collective or a write halfway.
- At every optimizer-step boundary the flag is combined over all ranks (a max all-reduce of one integer), so
  every rank stops at the same step; `trainer.should_stop` then makes the step checkpoint callback save that
  step (all ranks together, written to a temporary name, swapped in, `last.ckpt` relinked), rank 0 writes
  <run>/PREEMPTED and the run ends with exit code EXIT_PREEMPTED; the batch script requeues the job.
- `--ckpt_path auto` resumes from the newest complete checkpoint of the run directory (named by the recipe,
  never by job id or time), sets aside what a killed save left half-written, and starts fresh when there is
  none; a run whose FINISHED marker covers the requested steps does nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly at a checkpoint, run it again to go on
FINISHED = "FINISHED"  # in the run folder: the run reached its max_steps
PREEMPTED = "PREEMPTED"  # in the run folder: the latest attempt stopped on the preemption signal


class Preemption(L.Callback):
    """Stop every rank at the same step boundary after the preemption signal, checkpointed."""

    def __init__(self, signum: signal.Signals, marker: Optional[Path] = None) -> None:
        self.signum = signum
        self.marker = marker  # <run>/PREEMPTED, written when the run stopped on the signal
        self.flag = False  # set by the handler (this rank)
        self.preempted_at: Optional[int] = None  # the step all ranks stopped at
        self._previous = None
        self._signal_time: Optional[float] = None

    def _handler(self, signum, frame) -> None:  # only sets a flag: no I/O, no collectives
        self.flag = True
        self._signal_time = time.monotonic()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.flag, self.preempted_at = False, None
        self._previous = signal.signal(self.signum, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # not an optimizer-step boundary
        stop = torch.tensor([int(self.flag)], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
        if int(stop.item()) and self.preempted_at is None:
            self.preempted_at = trainer.global_step
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"dstlm: preemption signal {self.signum.name} received: every rank stops after step "
                      f"{trainer.global_step}, saving a checkpoint", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        """After the stop step's checkpoint is in place (saved inside the loop): rank 0 writes <run>/PREEMPTED,
        then every rank waits for it, so no rank can exit (and have the launcher kill the others) before the
        job can tell a clean preemption from a crash."""
        if self.preempted_at is None:
            return
        if trainer.is_global_zero and self.marker is not None:
            write_json_atomic(self.marker, {"step": self.preempted_at, "signal": self.signum.name,
                                            "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        trainer.strategy.barrier("dstlm-preempted")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def summary(self) -> dict:
        out = {"preempted": self.preempted_at is not None}
        if self.preempted_at is not None:
            out["preempted_at_step"] = self.preempted_at
            if self._signal_time is not None:
                out["stop_after_signal_s"] = round(time.monotonic() - self._signal_time, 1)
        return out


# -- automatic resume -----------------------------------------------------------------------------------------
def set_aside_incomplete(ckpt_dir: Path, rank: int = 0) -> list[Path]:
    """Rename what a killed save left behind (`*.tmp` files or DeepSpeed directories) to `*.incomplete-<n>`, so
    no later resume can pick it up; returns the new names. Only rank 0 renames."""
    if not ckpt_dir.is_dir():
        return []
    moved = []
    for tmp in sorted(ckpt_dir.glob("*.tmp")):
        n = 0
        while (ckpt_dir / f"{tmp.stem}.incomplete-{n}").exists():
            n += 1
        target = ckpt_dir / f"{tmp.stem}.incomplete-{n}"
        if rank == 0:
            os.replace(tmp, target)
        moved.append(target)
    return moved


def newest_complete(ckpt_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint: the one `last.ckpt` points at, or a newer `step<N>.ckpt` (a save that
    was in place when the job died before relinking `last.ckpt`; half-written saves are `*.tmp` and never
    match). None when there is neither. A dangling link (its target deleted by hand) is refused with the fix."""
    last = ckpt_dir / "last.ckpt"
    if os.path.lexists(last) and not last.exists():
        raise FileNotFoundError(f"{last} points at {os.readlink(last)!r}, which does not exist; remove the link "
                                f"to start over, or restore the checkpoint")
    best, best_step = (last, _step_of(Path(os.path.realpath(last)))) if last.exists() else (None, None)
    for path in ckpt_dir.glob("step*.ckpt") if ckpt_dir.is_dir() else ():
        step = _step_of(path)
        if step is not None and (best is None or best_step is None or step > best_step):
            best, best_step = path, step
    return best


STEP_NAME = "step{step:07d}"  # the file name (without .ckpt) StepCheckpoint gives each step's checkpoint


def _step_of(path: Path) -> Optional[int]:
    """The step of a `STEP_NAME` checkpoint file, else None."""
    match = re.fullmatch(r"step(\d+)\.ckpt", path.name)
    return int(match.group(1)) if match else None


def finished_marker(run_dir: Path) -> Optional[dict]:
    path = run_dir / FINISHED
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.parent / f".{path.name}.partial"
    tmp.write_text(json.dumps(value) + "\n")
    os.replace(tmp, path)


def write_finished(run_dir: Path, summary: dict) -> None:
    write_json_atomic(run_dir / FINISHED, {"steps": summary.get("steps"), "val_loss": summary.get("val_loss"),
                                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
