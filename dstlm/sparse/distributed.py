"""The small interface through which the sparse engine touches distributed training state.

The engine never imports Lightning or DeepSpeed. A backend answers: what is the full (global, averaged)
gradient and weight of a parameter, how to mask a gradient and write a weight, how to zero optimizer
state at given positions, and how to compare values across data-parallel ranks. `TorchBackend` covers one process and
DDP (whose gradients are already all-reduced after backward); sharded strategies implement the same
methods over their fragments.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.distributed as dist


class SparseBackend(Protocol):
    def full_grad(self, param: torch.nn.Parameter) -> Optional[torch.Tensor]: ...
    def mask_grad_(self, param: torch.nn.Parameter, pruned: torch.Tensor) -> None: ...
    def full_weight(self, param: torch.nn.Parameter) -> torch.Tensor: ...
    def mask_weight_(self, param: torch.nn.Parameter, keep: torch.Tensor) -> None: ...
    def mask_optimizer_state_(self, param: torch.nn.Parameter, keep: torch.Tensor) -> None: ...
    def optimizer_state_zero_outside(self, param: torch.nn.Parameter, mask: torch.Tensor) -> bool: ...
    def all_equal(self, values: torch.Tensor) -> bool: ...
    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor: ...


class Collectives:
    """Cross-rank comparisons and reductions over the default process group (a no-op on one rank)."""

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def all_equal(self, values: torch.Tensor) -> bool:
        if self.world_size == 1:
            return True
        gathered = [torch.zeros_like(values) for _ in range(self.world_size)]
        dist.all_gather(gathered, values)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    def all_reduce_mean_(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor


class TorchBackend(Collectives):
    """Single process or DDP with a plain torch optimizer (state tensors shaped like the parameter)."""

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None, grads_synced: bool = True) -> None:
        self.optimizer = optimizer
        # DDP all-reduces (averages) gradients during backward; then the score needs no further reduction.
        self.grads_synced = grads_synced

    def full_grad(self, param):
        if param.grad is None:
            return None
        grad = param.grad.detach()
        if not self.grads_synced and self.world_size > 1:
            grad = self.all_reduce_mean_(grad.clone())
        return grad

    @torch.no_grad()
    def mask_grad_(self, param, pruned):
        if param.grad is not None:
            param.grad.masked_fill_(pruned, 0)

    def full_weight(self, param):
        return param.detach()

    @torch.no_grad()
    def mask_weight_(self, param, keep):
        param.mul_(keep.to(param.dtype))

    def _states(self, param):
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(param, {})
        return [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]

    @torch.no_grad()
    def mask_optimizer_state_(self, param, keep):
        for t in self._states(param):
            t.mul_(keep.to(t.dtype))

    def optimizer_state_zero_outside(self, param, mask):
        return all(bool((t[~mask] == 0).all()) for t in self._states(param))
