"""Which weights are sparse, and their masks: persistent bool buffers on the owning modules.

A weight `blocks.0.attn.q_proj.weight` gets the buffer `blocks.0.attn.q_proj.weight_mask` (same shape,
bool), so masks travel with every state_dict and checkpoint, sharded or not.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

NEVER_SPARSE = (nn.Embedding, nn.LayerNorm)


@dataclass
class SparseParam:
    """One sparsified weight: fully qualified name, owning module and attribute name."""

    name: str
    module: nn.Module
    attr: str

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def mask(self) -> torch.Tensor:
        return getattr(self.module, f"{self.attr}_mask")

    @mask.setter
    def mask(self, value: torch.Tensor) -> None:
        getattr(self.module, f"{self.attr}_mask").copy_(value)

    @property
    def shape(self) -> tuple[int, int]:
        """[out, in] view of the weight (the weight's own shape for 2-D parameters)."""
        return tuple(self.mask.shape)


def select_params(model: nn.Module, include: Iterable[str], exclude: Iterable[str]) -> list[SparseParam]:
    """Sparsifiable weights (>= 2-D parameters of modules other than embeddings/norms, not shared with an
    embedding) whose names match an include pattern and no exclude pattern, in model order."""
    include, exclude = list(include), list(exclude)
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, NEVER_SPARSE) for p in m.parameters(False)}
    chosen, seen = [], set()
    for mod_name, module in model.named_modules():
        if isinstance(module, NEVER_SPARSE):
            continue
        for attr, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{attr}" if mod_name else attr
            if p.ndim < 2 or id(p) in embedding_ids or id(p) in seen:
                continue
            if any(fnmatch.fnmatchcase(name, pat) for pat in include) and not any(
                fnmatch.fnmatchcase(name, pat) for pat in exclude
            ):
                seen.add(id(p))
                chosen.append(SparseParam(name, module, attr))
    if not chosen:
        raise ValueError(f"sparsity.include={include} (exclude={exclude}) matches no sparsifiable weight; "
                         f"weights look like {_example_names(model)}")
    return chosen


def _example_names(model: nn.Module) -> str:
    names = [n for n, p in model.named_parameters() if p.ndim >= 2][:3]
    return ", ".join(names) or "(none)"


def check_patterns_match(model: nn.Module, patterns: Iterable[str], what: str) -> None:
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(f"{what} pattern {pat!r} matches no parameter; names look like {_example_names(model)}")


def attach_mask(sp: SparseParam, mask: torch.Tensor) -> None:
    """Register (or overwrite) the persistent bool buffer `<attr>_mask` on the owning module."""
    buf_name = f"{sp.attr}_mask"
    mask = mask.to(device=sp.weight.device, dtype=torch.bool)
    if buf_name in sp.module._buffers:
        sp.module._buffers[buf_name].copy_(mask)
    else:
        sp.module.register_buffer(buf_name, mask, persistent=True)


def mask_checksum(masks: Iterable[torch.Tensor]) -> torch.Tensor:
    """[n_layers, 2] int64: (non-zeros, position hash) per mask; equal on all ranks iff masks agree
    (up to hash collisions)."""
    rows = []
    for m in masks:
        flat = m.flatten()
        idx = flat.nonzero().squeeze(1).to(torch.int64)
        h = ((idx * 2654435761) % 2147483647).sum() if idx.numel() else torch.zeros((), dtype=torch.int64)
        rows.append(torch.stack([idx.new_tensor(idx.numel()), h.to(torch.int64)]))
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.int64)
