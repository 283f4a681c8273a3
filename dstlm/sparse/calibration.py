"""Input-activation norms for Wanda-style first masks (Sun et al. 2023: score |W_ij| * ||X_j||_2).

For every sparse [out, in] matrix held by a module whose forward input carries the `in` features in its last
dimension (linear layers, GPT-2's Conv1D), ||X_j|| is the 2-norm of input feature j over every token of the
calibration batches, taken by a forward hook.

A matrix of a fused expert tensor ([E, ...], one matrix per expert) sees only the tokens routed to its
expert, inside the module's own forward, where a hook on the module cannot tell them apart. Its inputs are
taken where the expert's matrix is used: a torch function mode watches every `F.linear(x, W)` and `x @ W`
whose W is a view of one expert of a fused tensor (same storage; the expert from the view's offset) and sums
x's squares along the `in` features. A model whose experts run in a kernel that never forms such a view (a
grouped matmul) offers `calibration_context()` to switch to a per-expert loop for the calibration forward
(dstlm's own MoE layers and transformers' eager experts are such loops).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dstlm.sparse.masks import SparseParam


@torch.no_grad()
def input_norms(model: nn.Module, params: list[SparseParam], batches: Iterable) -> dict[str, torch.Tensor]:
    """{matrix name: fp32 [in] norms} for the matrices whose inputs a hook sees; runs `model(x)` per batch
    (x, _) in eval mode and restores the training mode."""
    sums: dict[int, torch.Tensor] = {}
    names: dict[int, list[str]] = {}
    hooks = _input_hooks([sp for sp in params if sp.index is None], sums, names)
    experts = _ExpertInputs([sp for sp in params if sp.index is not None])
    was_training = model.training
    model.eval()
    context = getattr(model, "calibration_context", nullcontext)
    try:
        n = 0
        with context(), experts:
            for x, _ in batches:
                model(x)
                n += 1
        if n == 0:
            raise ValueError("no calibration batches: the training data gave none (sparsity.wanda_batches)")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    norms = {name: sums[key].sqrt() for key, ns in names.items() if key in sums for name in ns}
    norms.update({name: s.sqrt() for name, s in experts.sums.items()})
    return norms


def _input_hooks(params: list[SparseParam], sums: dict, names: dict) -> list:
    """A forward hook on each module holding sparse matrices, summing x^2 of its input per column into
    sums[id(module)]; names[id(module)]: the matrices that input feeds."""
    hooks = []
    for sp in params:
        cols, key = sp.shape[1], id(sp.module)
        names.setdefault(key, []).append(sp.name)
        if len(names[key]) > 1:
            continue

        def hook(module, args, output, key=key, cols=cols):
            x = args[0] if args else None
            if not torch.is_tensor(x) or x.shape[-1] != cols:
                return
            s = x.detach().reshape(-1, cols).float().pow(2).sum(0)
            sums[key] = s if key not in sums else sums[key] + s

        hooks.append(sp.module.register_forward_hook(hook))
    return hooks


class _ExpertInputs(TorchFunctionMode):
    """Sums of squared inputs of each expert matrix of fused tensors, from the linear / matmul calls that use a
    view of one expert."""

    def __init__(self, params: list[SparseParam]) -> None:
        super().__init__()
        self.sums: dict[str, torch.Tensor] = {}
        self.fused: dict[int, tuple[torch.Tensor, dict[int, SparseParam]]] = {}
        for sp in params:
            tensor = getattr(sp.module, sp.attr)
            key = tensor.untyped_storage().data_ptr()
            self.fused.setdefault(key, (tensor, {}))[1][sp.index] = sp

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fused and len(args) >= 2 and torch.is_tensor(args[1]) and args[1].ndim == 2:
            if func is F.linear:  # x @ W.T: W is [out, in]
                self._record(args[0], args[1], in_dim=1)
            elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):  # x @ W: W is [in, out]
                self._record(args[0], args[1], in_dim=0)
        return func(*args, **kwargs)

    def _record(self, x, w: torch.Tensor, in_dim: int) -> None:
        entry = self.fused.get(w.untyped_storage().data_ptr())
        if entry is None or not torch.is_tensor(x):
            return
        tensor, by_expert = entry
        e, rest = divmod(w.storage_offset() - tensor.storage_offset(), tensor[0].numel())
        sp = by_expert.get(e)
        cols = w.shape[in_dim]
        if sp is None or rest != 0 or cols != sp.shape[1] or x.shape[-1] != cols:
            return
        s = x.detach().reshape(-1, cols).float().pow(2).sum(0)
        self.sums[sp.name] = s if sp.name not in self.sums else self.sums[sp.name] + s
