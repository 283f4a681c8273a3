"""A deterministic, resumable, data-parallel batch sampler.

The data order is defined by *global* batches: epoch e shuffles all items with a generator seeded by
(seed, e), global batch b of that epoch is permutation[b*G : (b+1)*G] with G = batch_size * world_size,
and rank r takes its slice [r*batch_size : (r+1)*batch_size]. Hence 1 rank x batch 16 and 2 ranks x
batch 8 see the same global batches.

For training, one iteration runs through `total_batches` global batches, crossing data epochs inside
(Lightning then sees a single epoch, and every checkpoint is a mid-epoch one, which Lightning restores
exactly). The position is absolute: `resume(n)` makes the next iteration start with global batch n, so a
resumed run continues with the very next batch. Iterating has no side effects, so Lightning may call
iter() as often as it likes.

With `item_weights` (the counted targets of each item, for fine-tuning examples whose prompts and padding
do not count), every index comes as (index, n) with n the total weight of the optimizer step the batch belongs
to: all ranks' items of its `accumulate` consecutive global batches. Every rank computes n alone from the
shared permutation, so the loss can be normalised by the step's counted targets without communication.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch


class ResumableBatchSampler(torch.utils.data.Sampler):
    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, total_batches: Optional[int] = None,
                 item_weights: Optional[np.ndarray] = None, accumulate: int = 1) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.n_items = n_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.batches_per_epoch = n_items // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{n_items} blocks cannot fill one global batch of {batch_size} x {world_size} ranks; "
                f"lower data.batch_size or data.block_size, or add data"
            )
        self.total_batches = total_batches or self.batches_per_epoch
        if item_weights is not None and len(item_weights) != n_items:
            raise ValueError(f"item_weights has {len(item_weights)} entries for {n_items} items")
        self.item_weights = None if item_weights is None else np.asarray(item_weights, dtype=np.int64)
        self.accumulate = max(1, accumulate)
        self.start = 0  # absolute index (over all data epochs) of the first global batch to yield

    def __len__(self) -> int:
        # The full length even when resumed: Lightning restores its own batch counter to `start` and
        # expects len - start more batches, which is exactly what iteration yields.
        return self.total_batches

    def resume(self, batches_consumed: int) -> None:
        """Continue after `batches_consumed` global batches (counted over all data epochs)."""
        self.start = min(batches_consumed, self.total_batches)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_items)
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_items, generator=g)

    def global_batch(self, b: int, perm: Optional[torch.Tensor] = None) -> list[int]:
        """This rank's items of absolute global batch b."""
        epoch, offset = divmod(b, self.batches_per_epoch)
        perm = self.order(epoch) if perm is None else perm
        lo = offset * self.batch_size * self.world_size + self.rank * self.batch_size
        return perm[lo: lo + self.batch_size].tolist()

    def all_ranks_items(self, b: int, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every rank's items of absolute global batch b."""
        epoch, offset = divmod(b, self.batches_per_epoch)
        perm = self.order(epoch) if perm is None else perm
        G = self.batch_size * self.world_size
        return perm[offset * G: (offset + 1) * G]

    def step_weight(self, b: int) -> int:
        """The total item weight of the optimizer step that global batch b belongs to."""
        first = b - b % self.accumulate
        last = min(first + self.accumulate, self.total_batches)
        return int(sum(self.item_weights[self.all_ranks_items(g).numpy()].sum() for g in range(first, last)))

    def __iter__(self) -> Iterator[list]:
        perm_epoch, perm, weight = -1, None, None
        for b in range(self.start, self.total_batches):
            epoch = b // self.batches_per_epoch
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, self.order(epoch)
            items = self.global_batch(b, perm)
            if self.item_weights is None:
                yield items
                continue
            if weight is None or b % self.accumulate == 0:
                weight = self.step_weight(b)
            yield [(i, weight) for i in items]
