"""SparseBackend for DeepSpeed ZeRO-1/2/3: the sparse engine's view of sharded gradients, weights and state.

- Gradients of pruned entries are masked by a tensor hook on each sparse weight, which sees the rank's
  local, full-shape gradient before DeepSpeed reduces it; so the reduced gradient is exactly the masked
  global average. On steps whose dense gradient feeds a mask update the hook lets the gradient through;
  the engine then reads the reduced dense gradient (`safe_get_full_grad`) and writes back the masked one
  (`safe_set_full_grad`) before the optimizer step.
- Weights are zeroed in the fp32 master partitions (`safe_set_full_fp32_param`) and in the module's copy
  (ZeRO-1/2 keep it whole; ZeRO-3 partitions it too, so it is gathered, zeroed and re-partitioned with
  `GatheredParameters`: otherwise the next forward would still see the dropped weights), AdamW moments
  through `safe_{get,set}_full_optimizer_state`.
All `safe_*_full_*` calls are collectives: every rank calls them for the same parameters in the same
order, which the engine guarantees by walking its parameter list identically on every rank.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from dstlm.sparse.distributed import Collectives

STATE_KEYS = ("exp_avg", "exp_avg_sq")


class ZeROBackend(Collectives):
    def __init__(self, engine, stage: int) -> None:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage={stage} must be 0, 1, 2 or 3")
        self.sparse = engine
        self.stage = stage
        self.capture_dense = False  # set for the micro-steps whose gradients feed a mask update
        # one hook per parameter (a batched expert weight holds several sparse matrices)
        self._handles = [group[0].weight.register_hook(self._hook_for(group[0])) for group in engine.groups]

    def _gathered(self, param, modify: bool = False):
        """Context in which a ZeRO-3 partitioned module weight is whole (a no-op for stages 0-2)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None)

    def _hook_for(self, sp):
        pruned = self.sparse.pruned

        def hook(grad: torch.Tensor) -> Optional[torch.Tensor]:
            if self.capture_dense:
                return None
            return grad.masked_fill(pruned(sp).to(grad.device), 0)

        return hook

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- SparseBackend ------------------------------------------------------------------------------
    def full_grad(self, param):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)

    @torch.no_grad()
    def mask_grad_(self, param, pruned: torch.Tensor) -> None:
        if not self.capture_dense:
            return  # the hook masked the local gradients before the reduction
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        grad = safe_get_full_grad(param)
        if grad is not None:
            safe_set_full_grad(param, grad.masked_fill(pruned.to(grad.device), 0))

    def full_weight(self, param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)

    @torch.no_grad()
    def mask_weight_(self, param, keep):
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(param)
        safe_set_full_fp32_param(param, master * keep.to(master.dtype))
        # the module's copy is refreshed from the master only at the next optimizer step: zero it now, or the
        # next forward still sees the dropped weights (under ZeRO-3 gather, zero, re-partition)
        with self._gathered(param, modify=True):
            param.data.mul_(keep.to(param.dtype))

    def _state(self, param, key):
        from deepspeed.utils import safe_get_full_optimizer_state

        try:
            return safe_get_full_optimizer_state(param, key)
        except (TypeError, KeyError):  # no state before the first optimizer step
            return None

    @torch.no_grad()
    def mask_optimizer_state_(self, param, keep):
        from deepspeed.utils import safe_set_full_optimizer_state

        for key in STATE_KEYS:
            state = self._state(param, key)
            if state is not None:
                safe_set_full_optimizer_state(param, state * keep.to(state.dtype), key)

    def optimizer_state_zero_outside(self, param, mask):
        ok = True
        for key in STATE_KEYS:
            state = self._state(param, key)
            if state is not None and bool((state[~mask.to(state.device)] != 0).any()):
                ok = False
        return ok

    def module_weight_zero_outside(self, param, mask) -> bool:
        with self._gathered(param):
            return not bool((param.detach()[~mask.to(param.device)] != 0).any())
