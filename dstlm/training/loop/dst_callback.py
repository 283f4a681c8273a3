"""DSTCallback: drives dstlm.sparse.SparseEngine from Lightning's hooks.

Per optimizer step: gradients of pruned entries are masked (on_before_optimizer_step, before Lightning
clips them), and at update steps the dense-gradient scores are captured first. After the optimizer step
(on_train_batch_end, before any checkpoint of that step is written) masks update, weights and
optimizer state of dropped/grown entries are zeroed, mask checksums are compared across ranks and the
invariants verified. The callback decides *when*; the engine decides *what*.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from dstlm.sparse import SparseEngine, TorchBackend
from dstlm.sparse.condensed_train import CondensedComputeLinear
from dstlm.training.resilience import hooks


class DSTCallback(L.Callback):
    def __init__(self) -> None:
        self.engine: Optional[SparseEngine] = None
        self.backend: Optional[TorchBackend] = None
        self._pending_state: Optional[dict] = None
        self._last_step = -1
        self._sparsity: Optional[float] = None  # refreshed after mask updates only (cheap progress bar)
        self._condensed: list[CondensedComputeLinear] = []  # layers that compute condensed (sparsity.condensed)
        self._guards: Optional[list] = None  # the run's NonFiniteGuard callbacks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if "FSDP" in name:
            raise ValueError(f"dynamic sparse training under the {name} strategy is not supported; use "
                             f"trainer.strategy=auto|ddp|deepspeed_stage_1|deepspeed_stage_2")

    def _engine(self, pl_module) -> SparseEngine:
        engine = getattr(pl_module, "sparse_engine", None)
        if engine is None:
            raise RuntimeError("DSTCallback needs a module built with a sparsity config (LMModule(sparsity=...))")
        return engine

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.engine = self._engine(pl_module)
        partition = self.engine.cfg.partition_masks
        if "DeepSpeed" in type(trainer.strategy).__name__:
            from dstlm.training.zero.backend import ZeROBackend

            stage = trainer.strategy.config.get("zero_optimization", {}).get("stage", 0)
            if partition and stage != 3:
                raise ValueError(f"sparsity.partition_masks=true needs ZeRO-3, this run has ZeRO-{stage}; "
                                 f"use deepspeed_stage_3 or drop partition_masks")
            self.backend = ZeROBackend(self.engine.groups, stage, mask_before_reduce=not partition)
        else:
            if partition:
                raise ValueError(f"sparsity.partition_masks=true needs ZeRO-3, this run has "
                                 f"{type(trainer.strategy).__name__}; use deepspeed_stage_3 or drop partition_masks")
            self.backend = TorchBackend(trainer.optimizers[0] if trainer.optimizers else None, grads_synced=True)
        resumed = self._pending_state is not None
        if resumed:
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None
        if partition:  # keep this rank's fragments only: cut from the first masks, or read from the checkpoint
            self.engine.partition(self.backend, trainer.strategy.mask_fragment_files if resumed else None)
        self._last_step = trainer.global_step
        self._guards = None
        self._condensed = [m for m in pl_module.modules() if isinstance(m, CondensedComputeLinear)]
        if self._condensed and "DeepSpeed" in type(trainer.strategy).__name__:
            raise ValueError("sparsity.condensed=true runs with trainer.strategy auto, ddp or ddp_spawn (DeepSpeed "
                             "partitions the weights the condensed layers read); set sparsity.condensed=false")
        rank_zero_info(self.engine.describe())
        if self._condensed:
            rank_zero_info(f"sparsity.condensed: {len(self._condensed)} layers compute condensed (docs/condensed.md)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        scores = self.engine.needs_scores(trainer.global_step + 1)
        self.backend.capture_dense = scores  # the dense gradient passes the masking hook on score steps
        for layer in self._condensed:  # condensed layers compute the dense weight gradient only then
            layer.dense_grad = scores

    def on_train_end(self, trainer, pl_module) -> None:
        self.backend.remove_hooks()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # DeepSpeed owns gradient accumulation: Lightning then calls this after every micro-batch, but the
        # gradient is complete (and the optimizer steps) only at the accumulation boundary, which the engine
        # itself reports (before its step() of this micro-batch)
        if trainer.strategy.handles_gradient_accumulation \
                and not trainer.strategy.deepspeed_engine.is_gradient_accumulation_boundary():
            return
        if self._skipping(trainer, trainer.global_step):
            return  # a non-finite step that is dropped: no score from its gradients
        self.engine.before_optimizer_step(trainer.global_step + 1, self.backend)

    def _skipping(self, trainer, step: int) -> bool:
        if self._guards is None:  # found once: the callbacks do not change during a fit
            from dstlm.training.resilience.nonfinite import NonFiniteGuard

            self._guards = [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)]
        return any(g.skipping(step) for g in self._guards)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine = self.engine
        t = trainer.global_step
        if t != self._last_step and self._skipping(trainer, t - 1):
            self._last_step = t  # a dropped step: the masks, and the update due at t if any, stay as they were
        if t != self._last_step:  # an optimizer step happened (not an accumulation micro-step)
            self._last_step = t
            stats = engine.after_optimizer_step(t, self.backend)
            hooks.fire("masks_updated", engine=engine, rank=trainer.global_rank, step=t)
            verify = stats is not None or (engine.cfg.verify_every and t % engine.cfg.verify_every == 0)
            if verify:
                problems = engine.verify(self.backend)
                if problems:
                    raise RuntimeError(f"sparse invariants broken at step {t}: {'; '.join(problems)}")
            if stats is not None and trainer.is_global_zero:
                # straight to the loggers, once per update (self.log would repeat the value every log step)
                metrics = {f"sparsity/{k}": v for k, v in stats.items() if not k.startswith("layer/")}
                metrics.update({f"density/{k[6:]}": v for k, v in stats.items() if k.startswith("layer/")})
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=t)
            if stats is not None:
                self._sparsity = 1.0 - engine.density()
        if self._sparsity is None:
            self._sparsity = 1.0 - engine.density()
        # a CPU tensor, so logging it is no host-to-device copy (a stream synchronisation on a GPU) every step
        pl_module.log("sparsity", torch.tensor(self._sparsity, dtype=torch.float32), prog_bar=True, on_step=True,
                      on_epoch=False, rank_zero_only=True)

    def state_dict(self) -> dict:
        return self.engine.state_dict() if self.engine is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._pending_state = state

    def summary(self) -> dict:
        if self.engine is None:
            return {}
        e = self.engine
        out = {"sparsity": 1.0 - e.density(), "sparsity_method": e.cfg.method, "mask_updates": e.n_updates,
               "itop": e.last_stats.get("itop")}
        s = e.spread()
        out["mask_spread"] = {"fan_in_cv": round(s["fan_in_cv"], 4), "fan_out_cv": round(s["fan_out_cv"], 4)}
        if e.links:
            c = e.census()
            out["unit_census"] = {"units": c["units"], "dead": c["dead"], "orphans": c["orphans"],
                                  "dead_unit_frac": round(c["dead_unit_frac"], 4),
                                  "wasted_weight_frac": round(c["wasted_weight_frac"], 4)}
        return out
