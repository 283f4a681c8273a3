"""Which weights are sparse, and their masks: persistent bool buffers on the owning modules.

A weight `blocks.0.attn.q_proj.weight` gets the buffer `blocks.0.attn.q_proj.weight_mask` (same shape,
bool), so masks travel with every state_dict and checkpoint, sharded or not.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from dstlm.sparse.radix import Entries

NEVER_SPARSE = (nn.Embedding, nn.LayerNorm)


@dataclass
class SparseParam:
    """One sparsified weight matrix: name, owning module and attribute name. For a batched parameter
    ([E, out, in], e.g. MoE experts listed in the module's `batched_params`) `index` selects one matrix:
    each expert is its own sparse weight with its own mask slice and budget, while backends keep working
    on the whole parameter (`weight`, `full_mask`). `transposed`: the storage is [in, out] (GPT-2's Conv1D,
    expert tensors stored [E, in, out]); `view` then presents the [out, in] matrix the rules decide on, so
    rows are output units and fan-in / N:M groups run along the input whatever the storage."""

    name: str
    module: nn.Module
    attr: str
    index: Optional[int] = None
    transposed: bool = False

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This matrix's part of a weight-shaped tensor as [out, in] (the tensor itself for 2-D [out, in]
        weights; a strided view, not a copy, when the storage is transposed)."""
        m = tensor if self.index is None else tensor[self.index]
        return m.t() if self.transposed else m

    def to_storage(self, matrix: torch.Tensor) -> torch.Tensor:
        """`view`'s inverse for one [out, in] matrix: the same values laid out as this weight stores them."""
        return matrix.t().contiguous() if self.transposed else matrix

    def storage_index(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat [out, in] indices of the matrix's entries at these flat positions of its storage (the identity
        unless transposed: storage [in, out] position c * out + r is entry r * in + c)."""
        if not self.transposed:
            return flat
        rows, cols = self.shape
        return (flat % rows) * cols + flat // rows

    def entries(self, start: int, n: int, device: torch.device) -> Entries:
        """The matrix's entries at flat storage positions start .. start + n, as the sharded rules read them
        (their [out, in] indices made a block at a time, never whole)."""
        rows, cols = self.shape
        return Entries(n, cols, device, start=start, storage_rows=rows if self.transposed else None)

    @property
    def full_mask(self) -> torch.Tensor:
        return getattr(self.module, f"{self.attr}_mask")

    @property
    def mask(self) -> torch.Tensor:
        return self.view(self.full_mask)

    @mask.setter
    def mask(self, value: torch.Tensor) -> None:
        self.mask.copy_(value)

    @property
    def shape(self) -> tuple[int, int]:
        """[out, in] view of the weight (the weight's own shape for 2-D parameters); read from the mask once it
        exists (a ZeRO-3 partitioned weight holds no shape of its own)."""
        held = self.module._buffers.get(f"{self.attr}_mask")
        if held is None or held.numel() == 0:  # no mask yet, or a partitioned one (sparsity.partition_masks)
            held = self.weight if not hasattr(self.weight, "ds_shape") else torch.empty(self.weight.ds_shape,
                                                                                         device="meta")
        return tuple(self.view(held).shape)


def select_params(model: nn.Module, include: Iterable[str], exclude: Iterable[str]) -> list[SparseParam]:
    """Sparsifiable weights (>= 2-D parameters of modules other than embeddings/norms, not shared with an
    embedding) whose names match an include pattern and no exclude pattern, in model order."""
    include, exclude = list(include), list(exclude)
    chosen, seen = [], set()
    for name, module, attr, p in _sparsifiable_params(model):
        if id(p) in seen or not _matches(name, include) or _matches(name, exclude):
            continue
        seen.add(id(p))
        if p.ndim == 3 and attr in getattr(module, "batched_params", ()):
            chosen += [SparseParam(f"{name}.{e}", module, attr, e) for e in range(p.shape[0])]
        else:
            chosen.append(SparseParam(name, module, attr))
    if not chosen:
        raise ValueError(f"sparsity.include={include} (exclude={exclude}) matches no sparsifiable weight; "
                         f"weights look like {_example_names(model)}")
    return chosen


def _sparsifiable_params(model: nn.Module):
    """(name, module, attribute, parameter) of every parameter that may be sparse, in model order."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, NEVER_SPARSE) for p in m.parameters(False)}
    for mod_name, module in model.named_modules():
        if isinstance(module, NEVER_SPARSE) or getattr(module, "dstlm_dense", False):  # e.g. MoE routers
            continue
        for attr, p in module.named_parameters(recurse=False):
            if id(p) not in embedding_ids and _sparsifiable(module, attr, p):
                yield (f"{mod_name}.{attr}" if mod_name else attr), module, attr, p


def _sparsifiable(module: nn.Module, attr: str, p: torch.Tensor) -> bool:
    """A >= 2-D parameter the module does not keep dense (`dense_params`; a batched parameter not listed in
    `sparse_batched`, e.g. the dense low-rank part of Sparse-IFT doped experts)."""
    if p.ndim < 2 or attr in getattr(module, "dense_params", ()):
        return False
    batched = getattr(module, "batched_params", ())
    return attr not in batched or attr in getattr(module, "sparse_batched", batched)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _example_names(model: nn.Module) -> str:
    names = [n for n, p in model.named_parameters() if p.ndim >= 2][:3]
    return ", ".join(names) or "(none)"


def check_patterns_match(model: nn.Module, patterns: Iterable[str], what: str,
                         extra_names: Iterable[str] = ()) -> None:
    """Refuse a pattern that matches no parameter (nor any of extra_names, e.g. per-expert matrix names)."""
    names = [n for n, _ in model.named_parameters()] + list(extra_names)
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ValueError(f"{what} pattern {pat!r} matches no parameter; names look like {_example_names(model)}")


def attach_mask(sp: SparseParam, mask: torch.Tensor, persistent: bool = True) -> None:
    """Register (or overwrite) the bool buffer `<attr>_mask` on the owning module (persistent: saved with the
    module's state; masks partitioned across ranks are saved by the engine instead)."""
    buf_name = f"{sp.attr}_mask"
    # a partitioned build's placeholder weights live on the meta device: their masks stay where they were made
    mask = mask.to(device=mask.device if sp.weight.is_meta else sp.weight.device, dtype=torch.bool)
    if buf_name not in sp.module._buffers:
        simple = sp.index is None and not sp.transposed
        full = mask if simple else torch.ones(sp.weight.shape, dtype=torch.bool, device=mask.device)
        sp.module.register_buffer(buf_name, full.clone(), persistent=persistent)
    sp.view(sp.module._buffers[buf_name]).copy_(mask)


def mask_checksum(masks: Iterable[torch.Tensor]) -> torch.Tensor:
    """[n_layers, 2] int64: (non-zeros, position hash) per mask; equal on all ranks iff masks agree
    (up to hash collisions)."""
    rows = []
    for m in masks:
        flat = m.flatten()
        idx = flat.nonzero().squeeze(1).to(torch.int64)
        h = (((idx + 1) * 2654435761) % 2147483647).sum() if idx.numel() else torch.zeros((), dtype=torch.int64)
        rows.append(torch.stack([idx.new_tensor(idx.numel()), h.to(torch.int64)]))
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.int64)


# -- a parameter's matrices (a group: one SparseParam, or a batched parameter's several, in index order) ------


def flat_storage(group: list[SparseParam], matrices: list[torch.Tensor]) -> torch.Tensor:
    """The group's per-matrix [out, in] tensors laid out as its parameter's flat storage (matrices in index order)."""
    return torch.cat([sp.to_storage(m).reshape(-1) for sp, m in zip(group, matrices)])


def per_matrix(group: list[SparseParam], flat: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The inverse of `flat_storage`: a parameter's flat storage-order tensor as each matrix's own [out, in] copy."""
    whole = flat.reshape(shape)
    return {sp.name: sp.view(whole).clone(memory_format=torch.contiguous_format) for sp in group}


def release_whole_mask(group: list[SparseParam], device: torch.device) -> None:
    """Free the group's whole mask buffer once its fragment is kept: an empty placeholder keeps the buffer's name,
    never saved (also a mask that came with the model: the fragments are saved instead)."""
    module, name = group[0].module, f"{group[0].attr}_mask"
    module._buffers[name] = torch.zeros(0, dtype=torch.bool, device=device)
    module._non_persistent_buffers_set.add(name)


def param_name(group: list[SparseParam]) -> str:
    """The parameter's name (a batched parameter's matrices are named <parameter>.<index>)."""
    return group[0].name.rsplit(".", 1)[0] if group[0].index is not None else group[0].name


def matrix_run(sp: SparseParam, shape: tuple[int, int], start: int, length: int) -> tuple[int, int, int]:
    """(base, a, b): matrix `sp` ([out, in] `shape`) occupies base .. base + out * in of its parameter's flat
    index (a batched parameter holds several), and a .. b is its part inside the flat range start .. start + length."""
    numel = shape[0] * shape[1]
    base = 0 if sp.index is None else sp.index * numel
    a = min(max(start, base), base + numel)
    return base, a, max(a, min(start + length, base + numel))


# -- which weights are sparse, under a sparsity config ---------------------------------------------------


def matrix_shapes(model: nn.Module, cfg: Any, params: list[SparseParam]) -> dict[str, tuple[int, int]]:
    """Every sparse matrix's [out, in] shape, after checking the config's patterns match some of them."""
    matrices = [sp.name for sp in params]
    check_patterns_match(model, cfg.overrides.keys(), "sparsity.overrides", matrices)
    check_patterns_match(model, cfg.no_ablate, "sparsity.no_ablate", matrices)
    shapes = {sp.name: tuple(sp.view(sp.weight).shape) for sp in params}
    for sp in params:
        if len(shapes[sp.name]) != 2:
            raise ValueError(f"{sp.name} has shape {tuple(sp.weight.shape)}; sparsify [out, in] weights only "
                             f"(use an adapter that presents an [out, in] view)")
    return shapes


def include_of(model: nn.Module, cfg: Any) -> list[str]:
    """The include patterns in force: the config's, or the model's default when unset."""
    return cfg.include if cfg.include is not None else getattr(model, "default_sparse_include", ["blocks.*"])


def sparse_params_of(model: nn.Module, cfg: Any) -> list[SparseParam]:
    """The sparse matrices of `model` under the config's include / exclude patterns (unset include: the
    model's default); a model may choose them itself (`sparse_params`, e.g. the Hugging Face adapter)."""
    include = include_of(model, cfg)
    choose = getattr(model, "sparse_params", None)
    return choose(include, cfg.exclude) if choose is not None else select_params(model, include, cfg.exclude)
