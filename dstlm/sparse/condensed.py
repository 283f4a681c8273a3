"""The condensed layout of a constant-fan-in sparse linear layer, and the module that computes with it.

A masked [out, in] layer whose active output units all hold the same number k of weights (SRigL, N:M) is
stored as weights [R, k] and input indices [R, k] (uint16 when in <= 65,536, else int32) for its R active
units; ablated units (no weights) keep only their bias. The layer then reads and multiplies only its
non-zero weights:

    y[..., rows[r]] = sum_j weight[r, j] * x[..., indices[r, j]] + bias[rows[r]]

Two ways to compute it, chosen per call by batch size (`path="auto"`):
- "kernel": dstlm's compiled CPU op (dstlm/sparse/csrc/condensed.cpp): forward, input gradient and the
  gradient of the active weights only. Wins while the batch is small enough that the dense matmul is bound
  by reading weights (generation, online inference) and, at high sparsity, well beyond.
- "structured": the active rows as a dense [R, in] matrix and one dense matmul (ablated units removed);
  the PyTorch path, and the fallback when the kernel is unavailable or the dtype is not fp32.
Both are exact to fp32 rounding against the masked dense layer (`tests/test_condensed.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from dstlm.sparse.kernels import condensed_ops

PATHS = ("auto", "kernel", "structured")
# "auto" uses the kernel for a layer of density d = k / in while the rows of input per call stay below the
# limit of the first entry with d <= its density; else the structured path. Measured by benchmarks/condensed.py
# on this project's CPU kind (docs/results.md, "Condensed layers"): forward alone, the kernel beats the dense
# matmul up to d = 0.3 at every batch size; forward + backward only up to d = 0.2 at large batches.
KERNEL_BELOW = {
    "inference": ((0.3, 1 << 62), (0.5, 64)),
    "training": ((0.2, 1 << 62), (0.3, 256), (0.5, 16)),
}


def kernel_can_run(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernel is built and computes this call: fp32 input and weight on the CPU."""
    return (x2.dtype == torch.float32 and weight.dtype == torch.float32 and x2.device.type == "cpu"
            and condensed_ops() is not None)


def needs_grad(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad)


def kernel_wins(density: float, batch: int, training: bool = False) -> bool:
    for limit, below in KERNEL_BELOW["training" if training else "inference"]:
        if density <= limit:
            return batch < below
    return False


class NotConstantFanIn(ValueError):
    pass


class CondensedLinear(nn.Module):
    """y = x W^T + b for a constant-fan-in W held condensed; `from_masked` / `to_dense` convert exactly."""

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor, indices: torch.Tensor,
                 rows: torch.Tensor, bias: Optional[torch.Tensor] = None, path: str = "auto") -> None:
        super().__init__()
        if weight.shape != indices.shape or weight.ndim != 2 or rows.shape != (weight.shape[0],):
            raise ValueError(f"condensed layout: weight {tuple(weight.shape)}, indices {tuple(indices.shape)} and "
                             f"rows {tuple(rows.shape)} must be [R, k], [R, k] and [R]")
        if rows.numel() and (bool((rows[1:] <= rows[:-1]).any()) or int(rows[0]) < 0 or int(rows[-1]) >= out_features):
            raise ValueError(f"condensed layout: rows must ascend within [0, {out_features})")
        if path not in PATHS:
            raise ValueError(f"condensed path={path!r} is not one of {', '.join(PATHS)}")
        self.in_features, self.out_features, self.path = in_features, out_features, path
        self.weight = nn.Parameter(weight.detach().clone().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().contiguous())
        self.register_buffer("indices", indices.to(index_dtype(in_features)).contiguous())
        self.register_buffer("rows", rows.to(torch.int64).contiguous())
        self._csc: Optional[tuple] = None
        self._dense_rows: Optional[tuple] = None

    # -- conversion ----------------------------------------------------------------------------------------
    @classmethod
    def from_masked(cls, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    name: str = "layer", path: str = "auto") -> "CondensedLinear":
        """From a [out, in] weight and its bool mask: every unit with any active weight must hold the same
        number of them (units with none are ablated)."""
        if weight.shape != mask.shape or weight.ndim != 2:
            raise ValueError(f"{name}: weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must be one [out, in]")
        rows, indices = masked_layout(mask, name)
        values = weight.detach()[rows].gather(1, indices)
        return cls(weight.shape[1], weight.shape[0], values, indices, rows, bias, path)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [out, in] with zeros off the mask, bool mask)."""
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.weight.dtype, device=self.weight.device)
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.weight.device)
        idx = self.indices.to(torch.int64)
        dense[self.rows] = torch.zeros_like(dense[self.rows]).scatter_(1, idx, self.weight.detach())
        mask[self.rows] = torch.zeros_like(mask[self.rows]).scatter_(1, idx, True)
        return dense, mask

    @property
    def fan_in(self) -> int:
        return self.weight.shape[1]

    @property
    def density(self) -> float:
        return self.weight.numel() / max(1, self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, active_units={self.rows.numel()}, "
                f"fan_in={self.fan_in}, bias={self.bias is not None}, path={self.path}")

    # -- compute -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"condensed layer expects {self.in_features} input features, got {x.shape[-1]}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.choose(x2) == "kernel":
            x2 = x2.contiguous()
            if torch.is_grad_enabled() and (x2.requires_grad or any(p.requires_grad for p in self.parameters())):
                y = CondensedMatmul.apply(x2, self.weight, self.bias,
                                          MatmulPlan(self.indices, self.rows, self.out_features, self.csc))
            else:  # inference: no autograd node
                y = condensed_ops().forward(x2, self.weight.detach(), self.indices, self.rows,
                                            None if self.bias is None else self.bias.detach(), self.out_features, 0,
                                            False)[0]
        else:
            y = self._structured(x2)
        return y.reshape(*lead, self.out_features)

    def choose(self, x2: torch.Tensor) -> str:
        usable = self.fan_in > 0 and kernel_can_run(x2, self.weight)
        if self.path == "kernel" and not usable:
            return "structured"
        if self.path != "auto":
            return self.path
        wins = kernel_wins(self.density, x2.shape[0], needs_grad(x2, self.weight))
        return "kernel" if usable and wins else "structured"

    def _structured(self, x2: torch.Tensor) -> torch.Tensor:
        w = self._rows_dense().to(x2.dtype)
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        if self.rows.numel() == self.out_features:  # rows ascend, so these are all units in order
            return torch.nn.functional.linear(x2, w, bias)
        y = x2.new_zeros(x2.shape[0], self.out_features) if bias is None else bias.expand(x2.shape[0], -1).clone()
        return y.index_add(1, self.rows, x2 @ w.t()) if self.rows.numel() else y

    def _rows_dense(self) -> torch.Tensor:
        """The active rows as a dense [R, in] matrix; differentiable when training, cached otherwise."""
        if torch.is_grad_enabled() and self.weight.requires_grad:
            idx = self.indices.to(torch.int64)
            return self.weight.new_zeros(self.rows.numel(), self.in_features).scatter(1, idx, self.weight)
        key = (self.weight._version, self.weight.data_ptr(), self.indices._version, self.indices.data_ptr())
        if self._dense_rows is None or self._dense_rows[0] != key:
            idx = self.indices.to(torch.int64)
            dense = self.weight.new_zeros(self.rows.numel(), self.in_features).scatter_(1, idx, self.weight.detach())
            self._dense_rows = (key, dense)
        return self._dense_rows[1]

    def csc(self) -> list[torch.Tensor]:
        """Per input, the condensed entries reading it (for the input gradient); rebuilt when indices change."""
        key = (self.indices._version, self.indices.data_ptr())
        if self._csc is None or self._csc[0] != key:
            self._csc = (key, condensed_ops().csc(self.indices, self.in_features))
        return self._csc[1]


def masked_layout(mask: torch.Tensor, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [R] int64, indices [R, k] int64, ascending in each row) of a constant-fan-in [out, in] mask;
    units without active weights are ablated (left out)."""
    mask = mask.to(torch.bool)
    counts = mask.sum(1)
    rows = counts.nonzero().squeeze(1)
    fan_ins = counts[rows].unique()
    if fan_ins.numel() > 1:
        raise NotConstantFanIn(f"{name}: active units hold {int(fan_ins.min())} to {int(fan_ins.max())} weights; "
                               f"only constant fan-in layers (sparsity.method srigl or nm) can be condensed")
    k = int(fan_ins[0]) if fan_ins.numel() else 0
    return rows, mask[rows].nonzero()[:, 1].view(rows.numel(), k)  # nonzero is row-major: inputs ascend


def index_dtype(in_features: int) -> torch.dtype:
    return torch.uint16 if in_features <= 1 << 16 else torch.int32


@dataclass
class MatmulPlan:
    """What one condensed matmul reads: the layout, and where its active weights come from. `flat` None: the
    weight argument is the [R, k] condensed weight itself (CondensedLinear); else it is a dense [out, in]
    parameter and the active weights are gathered at these flat positions, its gradient scattered back (or,
    with `dense_grad`, computed whole: condensed training on a mask-update step)."""

    indices: torch.Tensor
    rows: torch.Tensor
    out_features: int
    csc: Callable[[], list]
    flat: Optional[torch.Tensor] = None
    dense_grad: bool = False


class CondensedMatmul(torch.autograd.Function):
    """y = x W^T + b through the kernel. The forward keeps its transposed input blocks, which the backward
    reads instead of x (x itself is kept only when the whole dense weight gradient is wanted)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                plan: MatmulPlan) -> torch.Tensor:
        w_c = weight.detach() if plan.flat is None else weight.detach().reshape(-1)[plan.flat]
        y, x_t = condensed_ops().forward(x2, w_c, plan.indices, plan.rows, None if bias is None else bias.detach(),
                                         plan.out_features, 0, True)
        ctx.plan, ctx.has_bias, ctx.w_shape = plan, bias is not None, weight.shape
        ctx.dense_w = plan.flat is not None and plan.dense_grad
        ctx.save_for_backward(x_t, w_c, x2 if ctx.dense_w else None)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x_t, w_c, x2 = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = gy.contiguous()
        dense_w = need_w and ctx.dense_w
        gx, gw = condensed_ops().backward(gy, x_t, w_c, plan.indices, plan.rows, plan.csc() if need_x else [],
                                          need_x, need_w and not dense_w)
        if dense_w:  # the whole dense gradient: the engine scores inactive positions from it
            gw = gy.t().mm(x2)
        elif need_w and plan.flat is not None:  # the masked dense gradient: active entries, zeros elsewhere
            gw = torch.zeros(ctx.w_shape.numel(), dtype=w_c.dtype).index_copy_(
                0, plan.flat.reshape(-1), gw.reshape(-1)).view(ctx.w_shape)
        gb = gy.sum(0) if need_b and ctx.has_bias else None
        return (gx if need_x else None), (gw if need_w else None), gb, None


def condense(model: nn.Module, path: str = "auto") -> dict[str, str]:
    """Replace, in place, every plain nn.Linear whose mask (`weight_mask` buffer) has constant fan-in by its
    CondensedLinear. Returns {layer: what happened} for every masked layer (condensed, or why it was kept)."""
    outcome = {}
    for name, module in list(model.named_modules()):
        mask = getattr(module, "weight_mask", None)
        if mask is None:
            continue
        if type(module) is not nn.Linear:
            outcome[name] = f"kept: a {type(module).__name__}, not a plain Linear"
            continue
        try:
            layer = CondensedLinear.from_masked(module.weight, mask, module.bias, name=name, path=path)
        except NotConstantFanIn as err:
            outcome[name] = f"kept: {str(err).split(': ', 1)[1]}"
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer.to(module.weight.device))
        outcome[name] = (f"condensed: {layer.rows.numel()} of {layer.out_features} units, fan-in {layer.fan_in} "
                         f"of {layer.in_features}")
    return outcome


def condensed_layouts(model: nn.Module) -> dict[str, list[int]]:
    """{layer: [in_features, out_features]} of the model's condensed layers (stored with a checkpoint so
    the loader can rebuild them before loading their weights)."""
    return {n: [m.in_features, m.out_features] for n, m in model.named_modules() if isinstance(m, CondensedLinear)}


def rebuild_condensed(model: nn.Module, layouts: dict[str, list[int]], state: dict[str, torch.Tensor]) -> None:
    """Put CondensedLinear modules, shaped from a state dict's tensors, where `condensed_layouts` recorded them."""
    for name, (in_features, out_features) in layouts.items():
        prefix = f"{name}."
        try:
            weight, indices, rows = (state[prefix + key] for key in ("weight", "indices", "rows"))
        except KeyError as err:
            raise ValueError(f"condensed layer {name!r} has no {err.args[0]!r} in the checkpoint") from None
        layer = CondensedLinear(in_features, out_features, weight, indices, rows, state.get(prefix + "bias"))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
