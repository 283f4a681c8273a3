"""The small interface through which the sparse engine touches distributed training state.

The engine never imports Lightning or DeepSpeed. A backend answers: what is the full (global, averaged)
gradient and weight of a parameter, how to mask a gradient and write a weight, how to zero optimizer
state at given positions, and how to compare values across data-parallel ranks. `TorchBackend` covers one process and
DDP (whose gradients are already all-reduced after backward); sharded strategies implement the same
methods over their fragments.

On more than one rank the engine decides masks on shards (dstlm/sparse/selectors.py): each rank takes the
entries of a contiguous fragment of each parameter's flat index (`fragment`), reads its weights and reduced
gradient there (`local_weight`, `local_grad`), and the new masks are joined by one byte all-reduce
(`assemble`). ZeRO's fragments are the rank's own partitions; DDP's replicas split each parameter evenly, so
every rank does 1/world of the work.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.distributed as dist

from dstlm.sparse.bits import pack_bits, unpack_bits


class SparseBackend(Protocol):
    """What the engine needs of a distributed strategy (every member below; `TorchBackend` and
    training/zero/backend.py's `ZeROBackend` implement them all)."""

    rank: int
    world_size: int
    def full_grad(self, param: torch.nn.Parameter) -> Optional[torch.Tensor]: ...
    def mask_grad_(self, param: torch.nn.Parameter, mask: torch.Tensor) -> None: ...
    def full_weight(self, param: torch.nn.Parameter) -> torch.Tensor: ...
    def mask_weight_(self, param: torch.nn.Parameter, keep: torch.Tensor) -> None: ...
    def mask_optimizer_state_(self, param: torch.nn.Parameter, keep: torch.Tensor) -> None: ...
    def all_equal(self, values: torch.Tensor) -> bool: ...
    def all_gather(self, values: torch.Tensor) -> list[torch.Tensor]: ...
    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def assemble(self, numel: int, start: int, local: torch.Tensor) -> torch.Tensor: ...
    # decisions on shards (world > 1)
    shards: bool
    """Masks may be decided on each rank's fragments."""
    whole_fragments: bool
    """Every fragment is a whole parameter or nothing: its owner decides it alone, then the masks are joined."""
    capture_dense: bool
    """Set by the training layer on steps whose dense gradient feeds a score (a backend masking gradients in a
    hook lets them through)."""
    def plan(self, params: list[torch.nn.Parameter]) -> None: ...
    def remove_hooks(self) -> None: ...
    def fragment(self, param: torch.nn.Parameter) -> tuple[int, int]: ...
    def local_weight(self, param: torch.nn.Parameter) -> torch.Tensor: ...
    def local_grad(self, param: torch.nn.Parameter) -> Optional[torch.Tensor]: ...
    def violations(self, param: torch.nn.Parameter, mask: torch.Tensor) -> torch.Tensor: ...


class Collectives:
    """Cross-rank comparisons and reductions over the default process group (a no-op on one rank)."""

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def all_equal(self, values: torch.Tensor) -> bool:
        gathered = self.all_gather(values)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    def all_gather(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `values` (same shape everywhere), in rank order: each rank fills its slot of a zeroed
        [world, ...] tensor and one sum joins them (meant for small tensors: checksums and counts)."""
        if self.world_size == 1:
            return [values]
        slots = torch.zeros((self.world_size, *values.shape), dtype=values.dtype, device=values.device)
        slots[self.rank] = values
        return list(self.all_reduce_sum_(slots).unbind(0))

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.world_size > 1 else 0

    def all_reduce_mean_(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks (the reduction the sharded rules run on)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def assemble(self, numel: int, start: int, local: torch.Tensor) -> torch.Tensor:
        """The whole flat tensor of which each rank holds `local` at [start, start + len): fragments are
        disjoint and cover it, so a sum over the ranks joins them. A bool joins bit-packed (1/8 byte per
        entry on the wire: the ranks' bits are disjoint, so the byte sum is their OR)."""
        if local.dtype != torch.bool:
            out = torch.zeros(numel, dtype=local.dtype, device=local.device)
            out[start:start + local.numel()] = local.reshape(-1)
            return self.all_reduce_sum_(out)
        packed = torch.zeros(-(-numel // 8), dtype=torch.uint8, device=local.device)
        n = local.numel()
        if n:
            lo, hi = start // 8, -(-(start + n) // 8)
            bits = torch.zeros((hi - lo) * 8, dtype=torch.uint8, device=local.device)
            bits[start - lo * 8:start - lo * 8 + n] = local.reshape(-1)
            packed[lo:hi] = pack_bits(bits)
        return unpack_bits(self.all_reduce_sum_(packed), numel)


def keep_where_(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """tensor = 0 where `keep` is False, in place (NaN and inf included, unlike a multiply), with no ~keep
    temporary: the masks are the only per-weight state the gradient masking needs."""
    return torch.where(keep.to(tensor.device), tensor, tensor.new_zeros(()), out=tensor)


def even_fragment(numel: int, rank: int, world: int) -> tuple[int, int]:
    """(start, length) of rank's part when a flat index of `numel` entries is cut into `world` near-equal runs."""
    per = -(-numel // world)
    start = min(numel, rank * per)
    return start, min(numel, start + per) - start


def count_nonzero_outside(values: torch.Tensor, keep: torch.Tensor) -> int:
    """Non-zero entries of `values` where `keep` (same length) is False."""
    return int(torch.count_nonzero(values.reshape(-1).masked_fill(keep.reshape(-1).to(values.device), 0)))


class TorchBackend(Collectives):
    """Single process or DDP with a plain torch optimizer (state tensors shaped like the parameter)."""

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None, grads_synced: bool = True,
                 shard_by: str = "owner") -> None:
        self.optimizer = optimizer
        # DDP all-reduces (averages) gradients during backward; then the score needs no further reduction.
        self.grads_synced = grads_synced
        if shard_by not in ("owner", "entries"):
            raise ValueError(f"shard_by={shard_by!r}: use 'owner' or 'entries'")
        self.shard_by = shard_by
        self._owner: dict[int, int] = {}

    def full_grad(self, param):
        if param.grad is None:
            return None
        grad = param.grad.detach()
        if not self.grads_synced and self.world_size > 1:
            grad = self.all_reduce_mean_(grad.clone())
        return grad

    def _aligned(self, param, tensor: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the part of parameter-shaped `tensor` that `mask` covers, the mask shaped like it): the whole tensor
        for a whole mask, this rank's flat fragment for a fragment's mask (masks partitioned across ranks)."""
        if mask.numel() == param.numel():
            return tensor, mask.reshape(tensor.shape)
        start, n = self.fragment(param)
        if mask.numel() != n:
            raise ValueError(f"a mask of {mask.numel()} entries for a parameter of {param.numel()} whose fragment "
                             f"here holds {n}")
        return tensor.view(-1)[start:start + n], mask.reshape(-1)

    @torch.no_grad()
    def mask_grad_(self, param, mask):
        if param.grad is not None:
            keep_where_(*self._aligned(param, param.grad, mask))

    def full_weight(self, param):
        return param.detach()

    @torch.no_grad()
    def mask_weight_(self, param, keep):
        # a multiply by the bool mask itself (cast inside the kernel: no float copy of the mask); pruned negative
        # weights become -0.0, as the recorded runs of tests/test_golden.py have them (keep_where_ gives +0.0)
        part, keep = self._aligned(param, param.data, keep)
        part.mul_(keep)

    def _states(self, param):
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(param, {})
        return [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]

    @torch.no_grad()
    def mask_optimizer_state_(self, param, keep):
        for t in self._states(param):
            part, k = self._aligned(param, t, keep)
            part.mul_(k)

    # -- on shards --------------------------------------------------------------------------------
    # Every replica holds every weight and gradient whole, so a rank can decide whole parameters alone:
    # shard_by="owner" (default) gives each parameter to one rank (largest first, to the least loaded), which
    # decides it with the one-process rules and no collective inside, and the masks are joined;
    # shard_by="entries" splits every parameter evenly and decides with the sharded rules, as under ZeRO.
    shards = True
    capture_dense = False  # gradients are masked after backward, never in a hook

    def remove_hooks(self) -> None:
        """No hooks to remove."""

    @property
    def whole_fragments(self) -> bool:
        return self.shard_by == "owner"

    def plan(self, params: list[torch.nn.Parameter]) -> None:
        """Owners of the sparse parameters (called by the engine with the same list on every rank)."""
        loads = [0] * self.world_size
        self._owner = {}
        for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
            rank = min(range(self.world_size), key=lambda r: (loads[r], r))
            self._owner[id(params[i])] = rank
            loads[rank] += params[i].numel()

    def fragment(self, param):
        if self.shard_by == "owner" and id(param) in self._owner:
            return (0, param.numel()) if self._owner[id(param)] == self.rank else (0, 0)
        return even_fragment(param.numel(), self.rank, self.world_size)  # also before any plan (checks)

    def local_weight(self, param):
        start, n = self.fragment(param)
        return param.detach().reshape(-1)[start:start + n]

    def local_grad(self, param):
        grad = self.full_grad(param)
        if grad is None:
            return None
        start, n = self.fragment(param)
        return grad.reshape(-1)[start:start + n]

    def violations(self, param, mask):
        """[non-zero weights, non-zero module weights, non-zero optimizer state] at pruned entries of this
        rank's fragment (the fragments of all ranks cover the parameter once)."""
        start, n = self.fragment(param)
        keep = mask.reshape(-1)[start:start + n] if mask.numel() == param.numel() else mask.reshape(-1)
        states = sum(count_nonzero_outside(t.reshape(-1)[start:start + n], keep) for t in self._states(param))
        return torch.tensor([count_nonzero_outside(self.local_weight(param), keep), 0, states], dtype=torch.int64)
