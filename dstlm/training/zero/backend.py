"""SparseBackend for DeepSpeed ZeRO-1/2/3: the sparse engine's view of sharded gradients, weights and state.

- Gradients of pruned entries are masked by a tensor hook on each sparse weight, which sees the rank's
  local, full-shape gradient before DeepSpeed reduces it; so the reduced gradient is exactly the masked
  global average. On steps whose dense gradient feeds a mask update the hook lets the gradient through;
  the engine then reads the reduced dense gradient and masks it before the optimizer step. With masks
  partitioned across ranks (sparsity.partition_masks, ZeRO-3) no rank holds the whole mask a hook needs:
  every step masks the rank's partition of the reduced gradient instead (the same numbers: a mean of
  masked gradients is the masked mean).
- Masks handed to the masking methods are whole (parameter-shaped) or the rank's fragment alone.
- Weights, gradients and AdamW moments are read and masked on the rank's own fragment only, with no
  gather: under ZeRO-1/2 the fragment of the parameter that the rank's flat fp32 partition holds
  (`param._hp_mapping`: its range in the parameter, the fp32 master view, the reduced gradient and the
  optimizer-state views), under ZeRO-3 the parameter's partition (`safe_{get,set}_local_*`, and the
  module's partition `param.ds_tensor`, which the next forward gathers). ZeRO-1/2 hold the module weight
  whole on every rank: each rank zeroes it whole (no communication).
- On more than one rank the engine decides masks on shards from the same fragments (`fragment`,
  `local_weight`, `local_grad`). `full_grad` / `full_weight` (collective gathers, `safe_get_full_*`) serve only
  whole decisions: one rank, or a method without a sharded rule; every rank calls them for the same
  parameters in the same order.
"""

from __future__ import annotations

from typing import Optional

import torch

from dstlm.sparse.distributed import Collectives, count_nonzero_outside, keep_where_

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def z3_fragment(param) -> tuple[int, int]:
    """(start, length) in a ZeRO-3 parameter's flat index of the entries its partition on this rank holds."""
    from deepspeed import comm

    size = param.ds_tensor.ds_numel
    start = min(param.ds_numel, comm.get_rank(group=param.ds_process_group) * size)
    return start, min(param.ds_numel, start + size) - start


class ZeROBackend(Collectives):
    whole_fragments = False  # fragments are ZeRO's partitions: decided on shards

    def __init__(self, groups: list, stage: int, mask_before_reduce: bool = True) -> None:
        """`groups`: the engine's sparse parameters (`SparseEngine.groups`), whose gradients are masked by a
        hook before ZeRO reduces them (with `mask_before_reduce`)."""
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage={stage} must be 0, 1, 2 or 3")
        self.stage = stage
        self.capture_dense = False  # set for the micro-steps whose gradients feed a mask update
        self.mask_before_reduce = mask_before_reduce
        # one hook per parameter (a batched expert weight holds several sparse matrices)
        self._handles = [group[0].weight.register_hook(self._hook_for(group[0])) for group in groups] \
            if mask_before_reduce else []

    def _hook_for(self, sp):
        def hook(grad: torch.Tensor) -> Optional[torch.Tensor]:
            if self.capture_dense:
                return None
            return torch.where(sp.full_mask.to(grad.device), grad, grad.new_zeros(()))

        return hook

    def plan(self, params) -> None:
        """Nothing to plan: each rank's fragments are its ZeRO partitions."""

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- SparseBackend ------------------------------------------------------------------------------
    def full_grad(self, param):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)

    def mask_grad_(self, param, mask: torch.Tensor) -> None:
        if self.capture_dense or not self.mask_before_reduce:  # else the hook masked it before the reduction
            self.mask_local_grad_(param, mask)

    def full_weight(self, param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)

    def mask_weight_(self, param, keep):
        self.mask_local_weight_(param, keep)

    def mask_optimizer_state_(self, param, keep):
        self.mask_local_optimizer_state_(param, keep)

    # -- on shards: the rank's own fragment of each parameter --------------------------------------------
    @property
    def shards(self) -> bool:
        return self.stage in (1, 2, 3)

    def fragment(self, param) -> tuple[int, int]:
        """(start, length) in the parameter's flat index of the entries this rank's optimizer partition holds."""
        if self.stage == 3:
            return z3_fragment(param)
        if not hasattr(param, "_hp_mapping"):  # not partitioned (stage 0): the whole parameter
            return 0, param.numel()
        mapping = param._hp_mapping
        if mapping is None:  # no entry of this parameter in the rank's partition
            return 0, 0
        return mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel

    def _local_keep(self, param, keep: torch.Tensor) -> torch.Tensor:
        """The fragment's part of `keep`: a whole (parameter-shaped) mask is cut, a fragment's is itself."""
        start, n = self.fragment(param)
        flat = keep.reshape(-1)
        if flat.numel() == getattr(param, "ds_numel", param.numel()):
            return flat[start:start + n]
        if flat.numel() != n:
            raise ValueError(f"a mask of {flat.numel()} entries for a parameter of "
                             f"{getattr(param, 'ds_numel', param.numel())} whose fragment here holds {n}")
        return flat

    @staticmethod
    def _z3_whole(param) -> bool:
        """Whether a ZeRO-3 parameter is held whole right now (persistent parameters, below
        stage3_param_persistence_threshold, are never released after their first gather)."""
        return param.data.numel() == param.ds_numel > 0

    def local_weight(self, param) -> torch.Tensor:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(param).reshape(-1)[:self.fragment(param)[1]]
        if not hasattr(param, "_hp_mapping"):
            return param.detach().reshape(-1)
        mapping = param._hp_mapping
        return mapping.get_hp_fragment().reshape(-1) if mapping is not None else param.new_zeros(0, dtype=torch.float32)

    def _grad_fragment(self, param) -> Optional[torch.Tensor]:
        """A view of this rank's fragment of the reduced gradient (ZeRO-1/2), as deepspeed's own
        get_full_hp_grad reads it."""
        start, n = self.fragment(param)
        if param.grad is not None:
            return param.grad.reshape(-1)[start:start + n]
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return param.new_zeros(0, dtype=torch.float32) if hasattr(param, "_hp_mapping") else None
        frag = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
        if frag.numel() == param.numel() and frag.numel() != n:
            frag = frag.narrow(0, start, n)  # a whole accumulation buffer: the fragment only
        return frag

    def local_grad(self, param) -> Optional[torch.Tensor]:
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad

            grad = safe_get_local_grad(param)
            return None if grad is None else grad.reshape(-1)[:self.fragment(param)[1]]
        return self._grad_fragment(param)

    @torch.no_grad()
    def mask_local_grad_(self, param, mask: torch.Tensor) -> None:
        """Zero the rank's fragment of the reduced gradient off the mask (the dense steps' gradients reached
        the reduction unmasked)."""
        start, n = self.fragment(param)
        keep = self._local_keep(param, mask)
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            grad = safe_get_local_grad(param)
            if grad is not None:  # DeepSpeed hands out its fp32 gradient partition itself (a copy only when
                flat = grad.reshape(-1)  # offloaded to another device): masked in place, then set (a no-op
                keep_where_(flat[:n], keep)  # self-copy unless it was a copy): no per-step clone
                safe_set_local_grad(param, flat)
            return
        if param.grad is not None:  # ZeRO-1/2 before the reduction copied it: whole
            keep_where_(param.grad, mask.reshape(param.grad.shape))
            return
        frag = self._grad_fragment(param)
        if frag is not None:
            keep_where_(frag, keep)

    @torch.no_grad()
    def mask_local_weight_(self, param, keep: torch.Tensor) -> None:
        """Zero the rank's fp32 master fragment and the module's copy (its partition under ZeRO-3; under
        ZeRO-1/2 every rank holds the module weight whole and zeroes it whole) where `keep` (whole) is False."""
        start, n = self.fragment(param)
        local_keep = self._local_keep(param, keep)
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            master = safe_get_local_fp32_param(param).reshape(-1).clone()
            master[:n].mul_(local_keep.to(master.device, master.dtype))
            safe_set_local_fp32_param(param, master)
            param.ds_tensor.data.reshape(-1)[:n].mul_(local_keep.to(param.ds_tensor.device, param.ds_tensor.dtype))
            if self._z3_whole(param):  # a persistent (small) parameter stays gathered: the next forward reads it
                if keep.numel() != param.ds_numel:  # a fragment: the ranks' fragments joined (small by definition)
                    keep = self.assemble(param.ds_numel, start, local_keep)
                param.data.mul_(keep.reshape(param.data.shape).to(param.device, param.dtype))
            return
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            hp = mapping.get_hp_fragment()
            hp.mul_(local_keep.to(hp.device, hp.dtype).reshape(hp.shape))
        param.data.mul_(keep.reshape(param.shape).to(param.device, param.dtype))

    def _local_states(self, param) -> list[torch.Tensor]:
        out = []
        for key in STATE_KEYS:
            try:
                if self.stage == 3:
                    from deepspeed.utils import safe_get_local_optimizer_state

                    state = safe_get_local_optimizer_state(param, key)
                else:
                    mapping = getattr(param, "_hp_mapping", None)
                    state = None if mapping is None else mapping.get_hp_fragment(key)
            except (TypeError, KeyError, ValueError):  # no state before the first optimizer step
                state = None
            if state is not None:
                out.append((key, state))
        return out

    @torch.no_grad()
    def mask_local_optimizer_state_(self, param, keep: torch.Tensor) -> None:
        start, n = self.fragment(param)
        local_keep = self._local_keep(param, keep)
        for key, state in self._local_states(param):
            if self.stage == 3:
                from deepspeed.utils import safe_set_local_optimizer_state

                flat = state.reshape(-1).clone()
                flat[:n].mul_(local_keep.to(flat.device, flat.dtype))
                safe_set_local_optimizer_state(param, flat, key)
            else:  # a view into the flat optimizer state
                state.mul_(local_keep.to(state.device, state.dtype).reshape(state.shape))

    def violations(self, param, mask) -> torch.Tensor:
        """[non-zero fp32 master, non-zero module weights, non-zero optimizer state] at pruned entries of the
        rank's fragment; the fragments of all ranks cover each parameter once."""
        start, n = self.fragment(param)
        keep = self._local_keep(param, mask)
        module = 0
        if self.stage != 3 or self._z3_whole(param):  # the whole module copy the next forward reads
            module += count_nonzero_outside(param.detach().reshape(-1)[start:start + n], keep)
        if self.stage == 3:
            module += count_nonzero_outside(param.ds_tensor.reshape(-1)[:n], keep)
        states = sum(count_nonzero_outside(s.reshape(-1)[:n], keep) for _, s in self._local_states(param))
        master = self.local_weight(param)
        return torch.tensor([count_nonzero_outside(master, keep) if master.numel() == n else 0, module, states],
                            dtype=torch.int64)
