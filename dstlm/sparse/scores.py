"""Dense-gradient scores: |dL/dW| summed in fp32 over the score window (the last sparsity.grad_accumulation
optimizer steps before a mask update), for methods that grow by gradient (`uses_dense_grad`).

Where a mask is decided whole, its score is kept per matrix ([out, in], `whole`); where it is decided on
shards, each rank keeps the score of its fragment of each parameter (`fragments`, flat storage order) and
nothing else. A checkpoint taken inside a window carries the pending scores: whole (joined from the ranks'
fragments by a collective) or, with partitioned masks, in each rank's fragment file (`in_files`). A resume
turns whole scores into this rank's fragments where decisions are sharded (`localize`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from dstlm.sparse.masks import SparseParam, flat_storage, param_name, per_matrix

Group = list[SparseParam]


class Scores:
    def __init__(self) -> None:
        self.whole: dict[str, torch.Tensor] = {}
        """Per matrix name: [out, in] (decided whole)."""
        self.fragments: dict[str, torch.Tensor] = {}
        """Per parameter name: this rank's fragment (decided on shards)."""
        self.steps = 0
        """Steps summed into the window so far."""
        self.in_files = False
        """A restored checkpoint's pending scores are in its mask fragment files (read at `partition`)."""

    @staticmethod
    def _add(store: dict[str, torch.Tensor], key: str, grad: torch.Tensor) -> None:
        if key in store:  # accumulated in place, in fp32, where the gradient lives
            store[key].add_(grad.abs())
        else:
            store[key] = grad.abs().float()

    def capture(self, groups: list[Group], backend, sharded: bool, shape_of: Callable[[str], tuple]) -> None:
        """Add this step's gradient: each rank's fragment of the reduced gradient when `sharded` (nothing
        gathered), else each matrix's whole gradient (one, possibly collective, read per parameter)."""
        if sharded:
            self.localize(groups, backend)
            for group in groups:
                g = backend.local_grad(group[0].weight)
                if g is not None:
                    self._add(self.fragments, param_name(group), g)
        else:
            for group in groups:
                full = backend.full_grad(group[0].weight)
                if full is None:
                    continue
                for sp in group:
                    self._add(self.whole, sp.name, sp.view(full).detach().reshape(shape_of(sp.name)).contiguous())
        self.steps += 1

    def localize(self, groups: list[Group], backend) -> None:
        """Whole scores (restored from a checkpoint) become this rank's fragments."""
        if not self.whole:
            return
        for group in groups:
            if group[0].name not in self.whole:
                continue
            whole = flat_storage(group, [self.whole.pop(sp.name) for sp in group])
            start, n = backend.fragment(group[0].weight)
            self.fragments[param_name(group)] = whole[start:start + n].clone()

    def joined(self, groups: list[Group], backend, size_of: Callable[[Group], tuple[int, tuple]]) -> dict:
        """The fragments joined whole, per matrix (a collective: every rank calls it); `size_of(group)` gives the
        parameter's entries and storage shape."""
        out = {}
        for group in groups:
            local = self.fragments.get(param_name(group))
            if local is None:
                continue
            start, _ = backend.fragment(group[0].weight)
            numel, shape = size_of(group)
            out.update(per_matrix(group, backend.assemble(numel, start, local), shape))
        return out

    def restore_fragment(self, group: Group, score: torch.Tensor, shape: tuple, world: int) -> None:
        """A pending score read back from the fragment files: the rank's fragment (sharded decisions), or on one
        rank, whose fragment is the whole parameter, per matrix as whole decisions read it."""
        if world > 1:
            self.fragments[param_name(group)] = score
        else:
            self.whole.update(per_matrix(group, score, shape))

    def fragment(self, group: Group) -> Optional[torch.Tensor]:
        return self.fragments.get(param_name(group))

    def clear(self) -> None:
        self.whole.clear()
        self.fragments.clear()
        self.steps = 0

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (*self.whole.values(), *self.fragments.values()))
