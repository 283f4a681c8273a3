"""Every sparse matrix's first mask, and the weights it leaves: pruned entries zeroed, kept ones rescaled.

Per matrix, in order: a mask that came with the model (an exported sparse model) is kept as it is; a random
first mask is decided from the shape alone (the method's `init_mask`); magnitude and Wanda masks rank the
weights (`init_mask_scored`, through the selector of wherever the weights are: whole, or this rank's slice of
a partitioned build). The sparse-aware rescale multiplies each kept weight of a randomly initialised model by
sqrt(in / active inputs of its row).

A partitioned build (trainer.zero_init) holds only placeholders and this rank's slices of the weights: masks
need only shapes, magnitude masks are decided on the slices, and with sparsity.partition_masks each rank then
keeps only its fragment of each mask from the start (`FragmentMasks`).
"""

from __future__ import annotations

from typing import Optional

import torch

from dstlm.sparse.connectivity import MaskCounts
from dstlm.sparse.density import Layer
from dstlm.sparse.bits import pack_mask
from dstlm.sparse.fragments import Fragment
from dstlm.sparse.masks import SparseParam, attach_mask, matrix_run, param_name, release_whole_mask
from dstlm.sparse.methods import DSTMethod
from dstlm.sparse.radix import Entries
from dstlm.sparse.selection import Ties
from dstlm.sparse.selectors import Selector, whole
from dstlm.sparse.storage import FragmentMasks, WholeMasks

Group = list[SparseParam]


class FirstMasks:
    def __init__(self, method: DSTMethod, layers: dict[str, Layer], tie_seed: int, mask_init: str,
                 input_norms: Optional[dict[str, torch.Tensor]] = None, partitioned=None) -> None:
        self.method, self.layers, self.tie_seed, self.mask_init = method, layers, tie_seed, mask_init
        self.input_norms = input_norms or {}
        self.partitioned = partitioned
        self.kept_masks = 0
        """Sparse matrices whose mask came with the model and was kept."""
        self.wanda_unseen = 0
        """mask_init=wanda matrices calibration gave no input (an expert no token reached)."""

    @torch.no_grad()
    def attach(self, groups: list[Group], rescale: bool, partition_masks: bool):
        """Decide, attach (as `<attr>_mask` buffers) and apply every group's first masks; the store that holds
        them: whole, or this rank's fragments when a partitioned build partitions masks."""
        shapes = {n: la.shape for n, la in self.layers.items()}
        cut = self.partitioned is not None and partition_masks
        fragments, counts = {}, {}
        for group in groups:
            self._attach_group(group, rescale, persistent=not partition_masks)
            if cut:
                self._cut(group, fragments, counts)
        return FragmentMasks(groups, shapes, fragments, counts=counts) if cut else WholeMasks(groups, shapes)

    def _attach_group(self, group: Group, rescale: bool, persistent: bool) -> None:
        """The weights' factor: 0 where pruned, the sparse-aware rescale (or 1) where kept; applied to the whole
        parameter in one multiply, which a partitioned build can apply to its slice alone. Weights on the meta
        device are such a build's placeholders: masks need only shapes."""
        param = group[0].weight
        device = torch.device("cpu") if param.is_meta else param.device
        factor = torch.ones(param.shape, dtype=param.dtype, device=device)
        for sp in group:
            mask, kept = self._first(sp, device)
            attach_mask(sp, mask, persistent=persistent)
            f = sp.mask.to(param.dtype)
            # the sparse-aware rescale is for random initialisations, never for pretrained or kept weights
            if rescale and not kept and self.mask_init == "random":
                row_nnz = sp.mask.sum(dim=1, keepdim=True).clamp_min(1).to(param.dtype)
                f = f * torch.sqrt(self.layers[sp.name].shape[1] / row_nnz)
            sp.view(factor).copy_(f)
        param.mul_(factor)

    def _cut(self, group: Group, fragments: dict[str, Fragment], counts: dict[str, MaskCounts]) -> None:
        """Keep this rank's fragment of the group's first mask (the slice the partitioned build holds of its
        weight, which is the rank's ZeRO-3 partition) and the matrices' counts (every rank decided the same whole
        mask: no collective), then free the whole mask."""
        found = self.partitioned.local_values(group[0].weight)
        if found is None:
            raise RuntimeError(f"{param_name(group)} is not a placeholder of the partitioned build "
                               f"(trainer.zero_init)")
        start, values = found
        full = group[0].full_mask
        for sp in group:
            counts[sp.name] = MaskCounts.of(sp.mask)
        part = full.reshape(-1)[start:start + values.numel()].clone()
        fragments[param_name(group)] = Fragment(start, part, pack_mask(part), tuple(full.shape))
        release_whole_mask(group, full.device)

    def _first(self, sp: SparseParam, device: torch.device) -> tuple[torch.Tensor, bool]:
        """The first [out, in] mask of one sparse matrix, and whether it came with the model (kept)."""
        layer = self.layers[sp.name]
        ties = Ties(self.tie_seed, "init", sp.name)
        existing = getattr(sp.module, f"{sp.attr}_mask", None)
        if existing is not None and getattr(sp.module, "dstlm_keep_mask", False):
            mask = sp.view(existing).clone()  # a mask that came with the model: kept, never re-pruned
            self.method.adopt_mask(layer, mask)
            self.kept_masks += 1
            return mask, True
        w = sp.view(sp.weight)
        reads_weights = self.mask_init != "random" or self.method.init_reads_weights
        if w.is_meta and reads_weights:
            return self._on_slices(sp, ties, device), False
        if not reads_weights:  # decided from the shape alone
            probe = w.contiguous() if not w.is_meta else torch.zeros((), device=device).expand(w.shape)
            return self.method.init_mask(layer, probe, ties), False
        if self.mask_init == "random":
            return self.method.init_mask(layer, w.contiguous(), ties), False
        score = w.detach().abs().float()
        norms = self.input_norms.get(sp.name) if self.mask_init == "wanda" else None
        self.wanda_unseen += int(self.mask_init == "wanda" and norms is None)
        if norms is not None:
            score = score * norms.to(score.device, torch.float32)[None, :]
        return self.method.init_mask_scored(layer, score, whole(layer.shape, score.device), ties,
                                            per_row=norms is not None), False

    def _on_slices(self, sp: SparseParam, ties: Ties, device: torch.device) -> torch.Tensor:
        """A magnitude mask decided from this rank's slice of a partitioned weight through the collective
        selector, joined whole by one byte all-reduce: each entry is decided by the one rank holding it. Every
        rank calls it for every matrix, in the same order (collectives inside)."""
        all_reduce = getattr(self.partitioned, "all_reduce", None)
        if self.mask_init != "magnitude" or self.method.init_reads_weights or all_reduce is None:
            how = f"sparsity.mask_init={self.mask_init!r}" if self.mask_init != "random" else \
                f"sparsity.method={self.method.name!r}"
            raise ValueError(f"{how} ranks {sp.name} by its weights, which a partitioned build (trainer.zero_init) "
                             f"holds only in part; use mask_init=random with another method, or "
                             f"trainer.zero_init=false")
        layer = self.layers[sp.name]
        start, values = self.partitioned.local_values(sp.weight)
        base, a, b = matrix_run(sp, layer.shape, start, values.numel())
        index = sp.storage_index(torch.arange(a - base, b - base, device=device))
        score = values[a - start:b - start].detach().abs().float().to(device)
        select = Selector(Entries.of(index, layer.shape[1]), layer.shape, all_reduce)
        local = self.method.init_mask_scored(layer, score, select, ties, per_row=False)
        whole = torch.zeros(layer.shape[0] * layer.shape[1], dtype=torch.uint8, device=device)
        whole[index] = local.to(torch.uint8)
        return all_reduce(whole).bool().reshape(layer.shape)
