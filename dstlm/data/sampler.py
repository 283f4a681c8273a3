"""A deterministic, resumable, data-parallel batch sampler.

The data order is defined by *global* batches: epoch e shuffles all items with a generator seeded by
(seed, e), global batch b is permutation[b*G : (b+1)*G] with G = batch_size * world_size, and rank r
takes its slice [r*batch_size : (r+1)*batch_size]. Hence 1 rank x batch 16 and 2 ranks x batch 8 see
the same global batches, and a run resumed at (epoch, batches_done) continues with the very next batch.
"""

from __future__ import annotations

from typing import Iterator

import torch


class ResumableBatchSampler(torch.utils.data.Sampler):
    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
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
        self.epoch = 0
        self._resume_at = 0  # batches to skip at the start of the next iteration (consumed once)
        if len(self) == 0:
            raise ValueError(
                f"{n_items} blocks cannot fill one global batch of {batch_size} x {world_size} ranks; "
                f"lower data.batch_size or data.block_size, or add data"
            )

    def __len__(self) -> int:
        return self.n_items // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Make the next iteration start at batch `batches_done` of `epoch`."""
        self.epoch = epoch
        # a checkpoint taken after the epoch's last batch resumes at the start of the next epoch
        self._resume_at = batches_done if batches_done < len(self) else 0

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_items)
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_items, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_at = self._resume_at, 0
        perm = self.order(self.epoch)
        G = self.batch_size * self.world_size
        for b in range(start, len(self)):
            lo = b * G + self.rank * self.batch_size
            yield perm[lo: lo + self.batch_size].tolist()
