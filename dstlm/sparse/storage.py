"""Where masks live: one interface, two stores.

`WholeMasks`: every matrix's mask is a bool buffer on the module that owns the weight (`<attr>_mask`, saved in
every state_dict): one process, DDP, ZeRO-1/2, and ZeRO-3 with sparsity.partition_masks=false.
`FragmentMasks`: each rank holds the mask of its own fragment of every sparse parameter (the contiguous run of
the flat storage index its ZeRO-3 partition covers) and nothing else of it; the module buffers are emptied, and
whatever needs more than a fragment is answered from per-row and per-column counts summed over the ranks, or
(tests and tools) by joining the fragments. Checkpoint files of fragments: dstlm/sparse/fragments.py.

Both answer the same questions for the engine: the mask that gradients, weights and optimizer state are masked
with here (`local`), the entries this rank decides (`old`), the counts, the whole masks, the ever-active
record (ITOP), and `commit`: take a new mask, zeroing the dropped and newly grown entries' weights and state
before it replaces the old one.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from dstlm.sparse.connectivity import MaskCounts
from dstlm.sparse.bits import count_packed, pack_mask, unpack_bits
from dstlm.sparse.fragments import Fragment, fragment_state, partial_counts, read_fragments
from dstlm.sparse.masks import SparseParam, flat_storage, matrix_run, param_name, release_whole_mask
from dstlm.sparse.selection import count

Group = list[SparseParam]
Zero = Callable[[torch.Tensor], None]  # zeroes a parameter's weights and optimizer state where keep is False


class WholeMasks:
    """Masks as module buffers, the same whole masks on every rank."""

    partitioned = False

    def __init__(self, groups: list[Group], shapes: dict[str, tuple[int, int]]) -> None:
        self.groups, self.shapes = groups, shapes
        self.ever: dict[str, torch.Tensor] = {sp.name: pack_mask(sp.mask) for g in groups for sp in g}
        """Per matrix, bit-packed: every entry that was ever active (1/8 byte per sparse weight)."""

    def local(self, group: Group) -> torch.Tensor:
        return group[0].full_mask

    def old(self, group: Group, start: int, n: int) -> torch.Tensor:
        """The current mask at flat storage positions start .. start + n of the group's parameter."""
        return group[0].full_mask.reshape(-1)[start:start + n]

    def counts(self) -> dict[str, MaskCounts]:
        return {sp.name: MaskCounts.of(sp.mask) for g in self.groups for sp in g}

    def whole(self) -> dict[str, torch.Tensor]:
        return {sp.name: sp.mask for g in self.groups for sp in g}

    def size(self, group: Group) -> tuple[int, tuple[int, ...]]:
        """The group's parameter's number of entries and storage shape."""
        full = group[0].full_mask
        return full.numel(), tuple(full.shape)

    def commit(self, group: Group, new: torch.Tensor, zero: Zero) -> dict[str, int]:
        """Take the group's new whole mask (parameter-shaped); per matrix, the entries active before and after."""
        full = group[0].full_mask
        keep = new & full
        kept = {}
        for sp in group:
            self.ever[sp.name] |= pack_mask(sp.view(new)).to(self.ever[sp.name].device)
            kept[sp.name] = count(sp.view(keep))
        full.copy_(new)
        zero(keep)
        return kept

    def ever_active(self) -> int:
        return sum(count_packed(e) for e in self.ever.values())

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.ever)

    def load(self, ever: dict[str, torch.Tensor], device: torch.device) -> None:
        # bit-packed since 2026-12-01 (2ae1b62); a checkpoint from before holds bool masks
        self.ever = {k: (pack_mask(v) if v.dtype == torch.bool else v).to(device, copy=True) for k, v in ever.items()}

    def cut(self, backend, files: Optional[list], scores) -> "FragmentMasks":
        """This rank's fragments (the runs `backend.fragment` gives) of the masks held now, or, with `files`
        (a checkpoint's saved fragments, any world size), of the saved ones; the whole buffers are freed.
        Pending scores saved in the files go to `scores` (a Scores)."""
        if files is not None:
            fragments = restore(self.groups, backend, files, scores, lambda g: tuple(g[0].full_mask.shape))
        else:
            fragments = {}
            for group in self.groups:
                full = group[0].full_mask
                start, n = backend.fragment(group[0].weight)
                ever = pack_mask(self._ever_of(group)[start:start + n].to(full.device))
                fragments[param_name(group)] = Fragment(start, full.reshape(-1)[start:start + n].clone(), ever,
                                                        tuple(full.shape))
        for group in self.groups:
            release_whole_mask(group, group[0].full_mask.device)
        return FragmentMasks(self.groups, self.shapes, fragments, backend)

    def _ever_of(self, group: Group) -> torch.Tensor:
        """The group's ever-active record unpacked, as its parameter's flat storage."""
        mats = []
        for sp in group:
            shape = self.shapes[sp.name]
            mats.append(unpack_bits(self.ever[sp.name], math.prod(shape)).reshape(shape))
        return flat_storage(group, mats)


def restore(groups: list[Group], backend, files: list, scores, shape_of) -> dict[str, Fragment]:
    """This rank's fragments read from a checkpoint's fragment files (written at any world size), for the runs
    `backend.fragment` gives; pending scores in the files go to `scores`. `shape_of(group)`: its storage shape."""
    runs = {param_name(g): backend.fragment(g[0].weight) for g in groups}
    saved = read_fragments(files, runs, scores=scores.in_files)
    fragments = {}
    for group in groups:
        key, device, shape = param_name(group), group[0].full_mask.device, shape_of(group)
        mask, ever, score = saved[key]
        if score is not None:
            scores.restore_fragment(group, score.to(device), shape, backend.world_size)
        fragments[key] = Fragment(runs[key][0], mask.to(device), pack_mask(ever.to(device)), shape)
    scores.in_files = False
    return fragments


class FragmentMasks:
    """sparsity.partition_masks: each rank's fragment of every mask (`fragments`, per parameter name), with the
    counts over all ranks cached until the next change (computing them is a collective)."""

    partitioned = True

    def __init__(self, groups: list[Group], shapes: dict[str, tuple[int, int]], fragments: dict[str, Fragment],
                 backend=None, counts: Optional[dict[str, MaskCounts]] = None) -> None:
        self.groups, self.shapes, self.fragments = groups, shapes, fragments
        self.backend = backend
        self._counts = counts

    def adopt(self, backend) -> None:
        """Fragments cut at build (trainer.zero_init), before the backend existed: they must be the runs the
        backend gives (the rank's ZeRO-3 partitions), and move to where the module's placeholder masks live."""
        self.backend = backend
        for group in self.groups:
            key, f = param_name(group), self.fragments[param_name(group)]
            run = tuple(backend.fragment(group[0].weight))
            if (f.start, f.length) != run:
                raise RuntimeError(f"{key}: the mask fragment cut at build covers ({f.start}, {f.length}) but this "
                                   f"rank's ZeRO-3 partition is {run}")
            device = group[0].full_mask.device
            f.mask, f.ever = f.mask.to(device), f.ever.to(device)
        if self._counts is not None:
            device = self.device
            self._counts = {k: MaskCounts(c.rows.to(device), c.cols.to(device)) for k, c in self._counts.items()}
        self.counts()

    def reload(self, backend, files: list, scores) -> None:
        """The fragments read from a checkpoint's files instead (after a cut at build)."""
        self.backend = backend
        self.fragments = restore(self.groups, backend, files, scores, lambda g: self.fragments[param_name(g)].shape)
        self._counts = None
        self.counts()

    @property
    def device(self) -> torch.device:
        return self.local(self.groups[0]).device

    def local(self, group: Group) -> torch.Tensor:
        return self.fragments[param_name(group)].mask

    def old(self, group: Group, start: int, n: int) -> torch.Tensor:
        f = self.fragments[param_name(group)]
        if (f.start, f.length) != (start, n):
            raise RuntimeError(f"{param_name(group)}: this rank's mask fragment covers {f.start}+{f.length} "
                               f"but its weight partition {start}+{n}")
        return f.mask

    def counts(self) -> dict[str, MaskCounts]:
        """Per matrix, the sum of every rank's partial counts (a collective on the first call after a change:
        every rank makes it at the same point; the engine does, at `partition` and after each update)."""
        if self._counts is None:
            parts = []
            for group in self.groups:
                f = self.fragments[param_name(group)]
                for sp in group:
                    rows, cols = self.shapes[sp.name]
                    base, a, b = matrix_run(sp, self.shapes[sp.name], f.start, f.length)
                    parts += partial_counts(rows, cols, sp.storage_index, f.mask[a - f.start:b - f.start], a - base)
            flat = self.backend.all_reduce_sum_(torch.cat(parts))
            out, i = {}, 0
            for g in self.groups:
                for sp in g:
                    rows, cols = self.shapes[sp.name]
                    out[sp.name] = MaskCounts(flat[i:i + rows], flat[i + rows:i + rows + cols])
                    i += rows + cols
            self._counts = out
        return self._counts

    def whole(self) -> dict[str, torch.Tensor]:
        """Joined from the ranks' fragments (a collective, and whole masks on every rank: tests and tools)."""
        out = {}
        for group in self.groups:
            f = self.fragments[param_name(group)]
            whole = self.backend.assemble(f.numel, f.start, f.mask).reshape(f.shape)
            out.update({sp.name: sp.view(whole) for sp in group})
        return out

    def size(self, group: Group) -> tuple[int, tuple[int, ...]]:
        f = self.fragments[param_name(group)]
        return f.numel, f.shape

    def commit(self, group: Group, new: torch.Tensor, zero: Zero) -> dict[str, int]:
        """Take this rank's new fragment; per matrix, this rank's entries active before and after. The fragment
        holds the kept entries while weights and state are zeroed (no second buffer), then the new mask."""
        f = self.fragments[param_name(group)]
        f.ever |= pack_mask(new)
        keep = f.mask.logical_and_(new)
        kept = {}
        for sp in group:
            _, a, b = matrix_run(sp, self.shapes[sp.name], f.start, f.length)
            kept[sp.name] = count(keep[a - f.start:b - f.start])
        zero(keep)
        f.mask.copy_(new)
        self._counts = None
        return kept

    def ever_active(self) -> int:
        """This rank's part of the ever-active count (the engine sums the ranks')."""
        return sum(count_packed(f.ever) for f in self.fragments.values())

    def state(self) -> dict:
        return {}

    def file_state(self, scores: dict[str, torch.Tensor]) -> dict:
        """What this rank saves in its fragment file: its fragments, bit-packed with their ranges, and `scores`."""
        return fragment_state(self.fragments, self.backend.rank, self.backend.world_size, scores)
