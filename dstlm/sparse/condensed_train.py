"""Sparse training that computes condensed (`sparsity.condensed: true`, methods srigl and nm).

Each constant-fan-in nn.Linear the engine sparsifies keeps its dense parameter and its mask, so the
optimizer, the engine, checkpoints and DDP see exactly what masked training gives them; only the layer's
matmuls change. Its forward and its input gradient run the condensed kernel on the active weights (gathered
from the parameter at the mask's positions), and its weight gradient is computed for the active entries only
and scattered into a zero gradient: the masked gradient masked training would produce, without the dense
weight-gradient matmul. On the steps whose dense gradient feeds a mask update (the engine's `needs_scores`),
the layer computes the whole dense weight gradient instead, as the dense layer would. The layout (active
units and their input indices) is rebuilt from the mask when the mask changes, i.e. after each update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dstlm.sparse.condensed import (CondensedMatmul, MatmulPlan, index_dtype, kernel_can_run, kernel_wins,
                                    masked_layout, needs_grad)
from dstlm.sparse.kernels import condensed_ops


@dataclass
class Layout:
    key: tuple
    rows: torch.Tensor      # [R] int64: active output units
    indices: torch.Tensor   # [R, k] uint16 / int32: their inputs
    flat: torch.Tensor      # [R, k] int64: positions in the flattened [out, in] weight
    csc: list               # per input, the entries reading it (the input gradient's structure)
    density: float


class CondensedComputeLinear(nn.Linear):
    """An nn.Linear (same parameters, buffers and state_dict) whose matmuls run condensed from its
    `weight_mask`. Made by `enable_condensed_compute` on a built model; `dense_grad` asks the next backward
    for the whole dense weight gradient."""

    dense_grad: bool = False
    layer_name: str = "layer"
    _layout: Optional[Layout] = None

    def layout(self) -> Layout:
        mask = self.weight_mask
        key = (mask._version, mask.data_ptr())
        if self._layout is None or self._layout.key != key:
            rows, cols = masked_layout(mask, self.layer_name)
            indices = cols.to(index_dtype(self.in_features)).contiguous()
            ops = condensed_ops()
            self._layout = Layout(key, rows, indices, (rows[:, None] * self.in_features + cols).contiguous(),
                                  ops.csc(indices, self.in_features) if ops is not None else [],
                                  cols.numel() / max(1, mask.numel()))
        return self._layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if not kernel_can_run(x2, self.weight):
            return F.linear(x, self.weight, self.bias)
        lay = self.layout()
        training = needs_grad(x2, self.weight)
        if lay.rows.numel() == 0 or lay.flat.shape[1] == 0 or not kernel_wins(lay.density, x2.shape[0], training):
            return F.linear(x, self.weight, self.bias)
        plan = MatmulPlan(lay.indices, lay.rows, self.out_features, lambda: lay.csc, lay.flat, self.dense_grad)
        y = CondensedMatmul.apply(x2.contiguous(), self.weight, self.bias, plan)
        return y.reshape(*x.shape[:-1], self.out_features)


def enable_condensed_compute(params: Iterable, method: str) -> list[CondensedComputeLinear]:
    """Turn the plain nn.Linear layers among the engine's sparse params into CondensedComputeLinear (in
    place: names, parameters and buffers stay). Refuses when none qualifies or the kernel is missing."""
    if condensed_ops() is None:
        raise ValueError("sparsity.condensed=true needs dstlm's condensed CPU kernel, which did not build here (see "
                         "the warning above); install g++ and ninja, or set sparsity.condensed=false")
    layers = []
    for sp in params:
        module = sp.module
        if sp.index is not None or sp.transposed or sp.attr != "weight" or type(module) not in (
                nn.Linear, CondensedComputeLinear):
            continue
        module.__class__ = CondensedComputeLinear
        module.layer_name = sp.name.rsplit(".", 1)[0]
        layers.append(module)
    if not layers:
        raise ValueError(f"sparsity.condensed=true found no plain linear layer among the sparse weights of method "
                         f"{method}; set sparsity.condensed=false")
    return layers
