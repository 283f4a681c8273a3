"""Input-activation norms for Wanda-style first masks (Sun et al. 2023: score |W_ij| * ||X_j||_2).

For every sparse [out, in] matrix held by a module whose forward input carries the `in` features in its last
dimension (linear layers, GPT-2's Conv1D), ||X_j|| is the 2-norm of input feature j over every token of the
calibration batches, taken by a forward hook. Matrices of fused expert tensors see only the tokens routed to
their expert inside the module's own forward, which a hook on the module cannot tell apart: they get no norms
and their first masks fall back to magnitude (the manifest and the run's sparsity.yaml say which).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from dstlm.sparse.masks import SparseParam


@torch.no_grad()
def input_norms(model: nn.Module, params: list[SparseParam], batches: Iterable) -> dict[str, torch.Tensor]:
    """{matrix name: fp32 [in] norms} for the matrices whose inputs a hook sees; runs `model(x)` per batch
    (x, _) in eval mode and restores the training mode."""
    sums: dict[int, torch.Tensor] = {}
    names: dict[int, list[str]] = {}
    hooks = []
    for sp in params:
        if sp.index is not None:
            continue
        cols = sp.shape[1]
        key = id(sp.module)
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
    was_training = model.training
    model.eval()
    try:
        n = 0
        for x, _ in batches:
            model(x)
            n += 1
        if n == 0:
            raise ValueError("no calibration batches: the training data gave none (sparsity.wanda_batches)")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: sums[key].sqrt() for key, ns in names.items() if key in sums for name in ns}
