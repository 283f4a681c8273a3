"""Non-finite losses and gradients: stop the run, or skip the optimizer step (a bounded number of times).

The loss is checked before backward on every micro-batch, the gradients before the optimizer step (single process
and DDP, where they are already averaged over the ranks; DeepSpeed keeps them in its own buffers, and fp16's loss
scaler skips steps with inf gradients by design). Every rank learns whether any rank saw a non-finite loss, so
all stop or skip together (a rank that stopped alone would leave the others waiting in the gradient all-reduce).

`trainer.on_nonfinite: stop` (the default) raises NonFiniteError: the step, the rank(s) or the parameter, and the
last good checkpoint. `skip` drops the step's gradients instead: the weights, the optimizer's moments and step
counts, the masks and the DST scores stay as they were; the step counter and the learning-rate schedule move on
(the step's data is spent). At most `trainer.max_skipped_steps` steps are skipped in a run (resumes included),
then the next one stops it. This callback must come before DSTCallback, which asks it whether a step is skipped.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import torch


class NonFiniteError(ValueError):
    """A NaN/inf loss or gradient: the run stops with the step, the rank(s) or parameter and the last good
    checkpoint (a ValueError, so the command line prints it as one line)."""


class NonFiniteGuard(L.Callback):
    def __init__(self, policy: str = "stop", max_skipped: int = 10) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"trainer.on_nonfinite={policy!r} is not one of stop, skip")
        self.policy = policy
        self.max_skipped = max_skipped
        self.skipped: list[int] = []  # global steps (0-based, as the messages count them) whose update was dropped
        self._skip_at: int | None = None  # the step being skipped now
        self._batch_idx = 0
        self._ds_skipped = 0  # DeepSpeed's count of the steps it dropped itself

    # -- what DSTCallback asks ----------------------------------------------------------------------------
    def skipping(self, step: int) -> bool:
        """Whether the optimizer step with index `step` (trainer.global_step while it is computed) is skipped."""
        return step == self._skip_at or step in self.skipped

    # -- checks ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).any().to(torch.int32).reshape(1)
        if trainer.world_size > 1:
            bad = pl_module.all_gather(bad).reshape(-1)
        if bool(bad.any()):
            ranks = [i for i, b in enumerate(bad.tolist()) if b]
            self._found(trainer, f"non-finite loss at step {trainer.global_step} (micro-batch {self._batch_idx}) on "
                                 f"rank(s) {ranks}")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if handles_accumulation(trainer):
            return  # DeepSpeed: gradients live in its buffers (the loss is checked all the same)
        if self._skip_at != trainer.global_step and not str(trainer.precision).startswith("16"):
            check_gradients(pl_module, lambda what: self._found(trainer, what))
        if self._skip_at == trainer.global_step:
            for p in pl_module.parameters():
                p.grad = None  # the optimizer then leaves every weight and its state alone

    def _found(self, trainer: L.Trainer, what: str) -> None:
        step = trainer.global_step
        if self._skip_at == step:
            return  # another micro-batch of a step already skipped
        if self.policy == "skip" and len(self.skipped) < self.max_skipped:
            self._skip_at = step
            self.skipped.append(step)
            if trainer.is_global_zero:
                print(f"dstlm: {what}; skipping this step ({len(self.skipped)} of trainer.max_skipped_steps="
                      f"{self.max_skipped}): weights, optimizer state and masks unchanged", flush=True)
            return
        bound = (f"; trainer.max_skipped_steps={self.max_skipped} steps were skipped already ({self.skipped})"
                 if self.policy == "skip" else "")
        raise NonFiniteError(f"{what}{bound}{last_good(trainer)}")

    def on_train_start(self, trainer, pl_module) -> None:
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        self._ds_skipped = engine.skipped_steps if engine is not None else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None and engine.skipped_steps > self._ds_skipped:
            self._ds_skipped = engine.skipped_steps
            if not str(trainer.precision).startswith("16"):  # fp16: a loss-scale overflow, which is routine
                # ZeRO found the gradient norm non-finite and dropped the step itself (weights unchanged); stop
                # here, before the DST update and the checkpoint of this step
                raise NonFiniteError(f"non-finite gradient at step {trainer.global_step - 1} (DeepSpeed found the "
                                     f"gradient norm non-finite and dropped the step){last_good(trainer)}")
        if self._skip_at is not None and trainer.global_step > self._skip_at:
            self._skip_at = None
            pl_module.log("train/skipped_steps", float(len(self.skipped)), on_step=True, on_epoch=False)

    # -- checkpoints and the run summary --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = list(state.get("skipped", []))

    def summary(self) -> dict:
        return {"skipped_steps": list(self.skipped)} if self.skipped else {}


def handles_accumulation(trainer: L.Trainer) -> bool:
    return bool(getattr(trainer.strategy, "handles_gradient_accumulation", False))


def check_gradients(module: torch.nn.Module, found) -> None:
    """Call `found(message)` naming the first parameter whose gradient holds a NaN or inf (one norm per tensor)."""
    named = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    if not named:
        return
    norms = torch.stack(torch._foreach_norm([g for _, g in named]))
    if not bool(torch.isfinite(norms).all()):
        first = next(n for (n, _), v in zip(named, norms.tolist()) if not math.isfinite(v))
        found(f"non-finite gradient of {first} at step {getattr(module, 'global_step', 0)}")


def last_checkpoint(trainer) -> str | None:
    """The newest complete checkpoint of the run (what last.ckpt points at), or None."""
    ckpt = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
    last = Path(ckpt.dirpath) / "last.ckpt" if ckpt is not None and ckpt.dirpath else None
    return os.path.realpath(last) if last is not None and last.exists() else None


def last_good(trainer) -> str:
    """Where a stopped run resumes from, and what to change first."""
    skip = "" if trainer is not None and handles_accumulation(trainer) else " (or set trainer.on_nonfinite=skip)"
    last = last_checkpoint(trainer)
    if last is not None:
        return (f"; stopped before the weights changed (the last good checkpoint is {last}, which "
                f"`--ckpt_path last` resumes); lower optim.lr, raise optim.warmup_steps or set "
                f"trainer.gradient_clip_val, then resume{skip}")
    if trainer is None or trainer.global_step == 0:
        return ("; stopped before the weights changed, at the first step: the initial weights or the data give it "
                "(check model.init_std and the model section; with a pretrained model, its weights)")
    return ("; stopped before the weights changed (no checkpoint was written yet); lower optim.lr, raise "
            f"optim.warmup_steps or set trainer.gradient_clip_val{skip}")
