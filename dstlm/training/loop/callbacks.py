"""Callbacks of every run: step-based checkpoints that keep the last K, a PNG loss curve, RNG state, and the
tokens/s meter."""

from __future__ import annotations

import csv
import math
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dstlm.training.resilience import hooks
from dstlm.training.resilience.preemption import STEP_NAME

SAVE_TIMES = "save_seconds.txt"  # in the checkpoint folder: the seconds of the latest saves, all ranks together


class StepCheckpoint(ModelCheckpoint):
    """Checkpoint every N optimizer steps, keep the newest K, and always save the final step. `last.ckpt` is
    a symbolic link to the newest complete step checkpoint, swapped atomically after that checkpoint is in
    place: a kill at any moment leaves `last.ckpt` on a complete checkpoint at most one interval old, and
    no checkpoint is written twice."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep_last_k: int) -> None:
        super().__init__(dirpath=dirpath, filename=STEP_NAME, auto_insert_metric_name=False,
                         every_n_train_steps=every_n_steps or None, save_top_k=max(1, keep_last_k),
                         monitor="step", mode="max", save_last="link", enable_version_counter=False)
        self.save_seconds: list[float] = []

    def summary(self) -> dict:
        return {"checkpoint_save_s_max": round(max(self.save_seconds), 2)} if self.save_seconds else {}

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        """Point linkpath at filepath in one atomic rename (Lightning removes the old link first, which
        leaves a moment with no last.ckpt at all)."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            tmp = f"{linkpath}.link.tmp"
            _remove(tmp)
            os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):  # a full copy from an older dstlm
                _remove(linkpath)
            os.replace(tmp, linkpath)
        trainer.strategy.barrier("dstlm-ckpt-linked")

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Write to `<file>.tmp`, then swap it in: a save that fails or is killed midway leaves the previous
        checkpoint of that name intact (files and DeepSpeed's checkpoint directories alike)."""
        tmp = f"{filepath}.tmp"
        if trainer.is_global_zero:
            _remove(tmp)
        trainer.strategy.barrier("dstlm-ckpt-pre")
        t0 = time.perf_counter()
        try:
            trainer.save_checkpoint(tmp, self.save_weights_only)  # every rank writes its shards (DeepSpeed)
            hooks.fire("checkpoint_written", path=tmp, folder=Path(self.dirpath), rank=trainer.global_rank,
                       step=trainer.global_step)
        except OSError as e:
            raise self._save_failed(trainer, tmp, e) from None
        trainer.strategy.barrier("dstlm-ckpt-written")
        if trainer.is_global_zero:
            atomic_replace(tmp, filepath)
        trainer.strategy.barrier("dstlm-ckpt-swapped")
        self.save_seconds.append(time.perf_counter() - t0)
        if trainer.is_global_zero:  # what a preemption signal's lead time must cover (dstlm slurm reads it)
            record = Path(self.dirpath) / SAVE_TIMES
            record.write_text(" ".join(f"{s:.4f}" for s in self.save_seconds[-20:]) + "\n")  # a small save takes < 5 ms
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _save_failed(self, trainer: L.Trainer, tmp: str, e: OSError) -> OSError:
        """A write that failed (a full disk, a quota, a vanished mount): what it left is removed, nothing was
        swapped in, and the error names the last good checkpoint. (Under several ranks, the others stop at the next
        barrier, within trainer.collective_timeout_s.)"""
        try:
            _remove(tmp)
        except OSError:
            pass
        last = Path(self.dirpath) / "last.ckpt"
        good = (f"the last good checkpoint is {os.path.realpath(last)}, which `--ckpt_path last` resumes"
                if last.exists() else "no checkpoint was written before it")
        reason = e.strerror or str(e)
        err = OSError(f"saving the checkpoint of step {trainer.global_step} to {tmp} failed ({reason}); nothing "
                      f"was replaced: {good}; free space under {self.dirpath} (or lower trainer.keep_last_k) and "
                      f"resume")
        err.errno = e.errno
        return err

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The final step (or a requested stop) is saved here, inside the batch loop, and not in
        # on_train_end: Lightning restores a checkpoint written after the loop ended by re-creating the
        # data iterator, which would replay one batch.
        finishing = trainer.global_step >= trainer.max_steps > 0 or trainer.should_stop
        at_boundary = not trainer.fit_loop.epoch_loop._should_accumulate()
        if finishing and at_boundary and self._last_global_step_saved < trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def atomic_replace(src: str, dst: str) -> None:
    """Move a finished checkpoint (file or directory) over `dst`. Files: one atomic rename. Directories:
    the old one is renamed aside first, so some complete checkpoint exists at every moment."""
    if os.path.isdir(src) and os.path.isdir(dst):
        old = f"{dst}.old"
        _remove(old)
        os.replace(dst, old)
        os.replace(src, dst)
        _remove(old)
    else:
        if os.path.isdir(dst):
            _remove(dst)
        os.replace(src, dst)


def read_metrics(log_dir: str | Path) -> list[dict]:
    """All rows of every metrics.csv under log_dir (one per resumed segment), in file order."""
    rows: list[dict] = []
    for path in sorted(Path(log_dir).glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with path.open() as f:
            rows.extend(csv.DictReader(f))
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, the last value per step winning (a resumed run overwrites)."""
    by_step: dict[int, float] = {}
    for r in rows:
        v = r.get(key, "")
        if v not in ("", None) and r.get("step", "") != "":
            by_step[int(float(r["step"]))] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_loss(log_dir: str | Path, out_png: str | Path) -> Path | None:
    """Write a PNG of train and validation loss against optimizer step; None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(log_dir)
    ts, tl = series(rows, "train/loss")
    vs, vl = series(rows, "val/loss")
    if not ts and not vs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if ts:
        ax.plot(ts, tl, lw=1, alpha=0.8, label="train loss")
    if vs:
        ax.plot(vs, vl, "o-", lw=1.5, label="val loss")
        ax.set_title(f"final val loss {vl[-1]:.3f} (ppl {math.exp(vl[-1]):.1f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


class LossPlot(L.Callback):
    """At the end of fit, rank 0 draws the loss curves of the whole run (all resumed segments)."""

    def __init__(self, log_dir: str | Path, out_png: str | Path) -> None:
        self.log_dir, self.out_png = Path(log_dir), Path(out_png)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()
            plot_loss(self.log_dir, self.out_png)


class RNGState(L.Callback):
    """Saves and restores the torch/numpy/python RNG streams so a resumed run draws the same dropout
    masks (and any other randomness) as an uninterrupted one."""

    def state_dict(self) -> dict:
        import random

        import numpy as np
        import torch

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain types only, so checkpoints load with torch.load(weights_only=True)
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        import random

        import numpy as np
        import torch

        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class ThroughputMeter(L.Callback):
    """Training tokens/s over all ranks, from the wall time between consecutive micro-batches: on the progress
    bar and in the logs as `tok/s` (refreshed every >= `window_s` seconds), and the run average (validation
    excluded) as `tokens_per_s` in summary.json."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._t_last: float | None = None
        self._win_tokens, self._win_time, self._rate = 0, 0.0, 0.0
        self._run_tokens, self._run_time = 0, 0.0

    @property
    def average(self) -> float:
        return self._run_tokens / self._run_time if self._run_time > 0 else 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._t_last is not None:
            tokens = batch[0].numel() * trainer.world_size
            self._win_tokens += tokens
            self._run_tokens += tokens
            self._win_time += now - self._t_last
            self._run_time += now - self._t_last
            if self._win_time >= self.window_s:
                self._rate = self._win_tokens / self._win_time
                self._win_tokens, self._win_time = 0, 0.0
        self._t_last = now
        # a CPU tensor: Lightning turns a Python number into a tensor on the module's device, and on a GPU that
        # host-to-device copy would synchronise the stream every step
        pl_module.log("tok/s", torch.tensor(self._rate, dtype=torch.float32), prog_bar=True, on_step=True,
                      on_epoch=False, rank_zero_only=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t_last = None  # the time spent validating must not count against training throughput

    def summary(self) -> dict:
        return {"tokens_per_s": round(self.average, 1)}
