"""Sparse-IFT families of one dense linear layer (n_in -> n_out), as modules that replace it (dstlm/transforms/
ift.py swaps them in). Each initialises itself (`init_as_dense`) so its output has the scale of the dense layer
it replaces, and folds back (`to_dense`) into the one nn.Linear it computes, where that is linear."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dstlm.transforms.ift_spec import doped_rank, factorized_init_std, factorized_rank, parallel_branches


class SparseParallelLinear(nn.Module):
    """b parallel linear branches of the same shape, outputs summed (one shared bias)."""

    def __init__(self, n_in: int, n_out: int, branches: int, bias: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(n_in, n_out, bias=False) for _ in range(branches))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sum(branch(x) for branch in self.branches)
        return y + self.bias if self.bias is not None else y

    def init_as_dense(self, std: float) -> None:
        for branch in self.branches:  # the sum of b branches has the dense layer's std
            nn.init.normal_(branch.weight, 0.0, std / math.sqrt(len(self.branches)))

    def to_dense(self) -> nn.Linear:
        w = sum(b.weight.detach() for b in self.branches)
        return _linear(w, self.bias)


class SparseFactorizedLinear(nn.Module):
    """x -> V(mid(U x)); U: n_in -> r, V: r -> n_out (V carries the bias)."""

    def __init__(self, n_in: int, n_out: int, rank: int, bias: bool, mid: str = "none") -> None:
        super().__init__()
        self.u = nn.Linear(n_in, rank, bias=False)
        self.v = nn.Linear(rank, n_out, bias=bias)
        self.mid = mid
        self.norm = nn.LayerNorm(rank) if "layernorm" in mid else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.u(x)
        if self.norm is not None:
            h = self.norm(h)
        if "gelu" in self.mid:
            h = F.gelu(h, approximate="tanh")
        return self.v(h)

    def init_as_dense(self, std: float) -> None:
        su, sv = factorized_init_std(self.u.in_features, self.u.out_features, std)
        nn.init.normal_(self.u.weight, 0.0, su)
        nn.init.normal_(self.v.weight, 0.0, sv)
        if self.v.bias is not None:
            nn.init.zeros_(self.v.bias)

    def to_dense(self) -> nn.Linear:
        if self.mid != "none":
            raise ValueError(f"a factorized layer with factorized_mid={self.mid!r} is not linear and cannot be "
                             f"folded into one dense layer; export needs factorized_mid=none")
        return _linear(self.v.weight.detach() @ self.u.weight.detach(), self.v.bias)


class SparseDopedLinear(nn.Module):
    """Sparse W plus a dense low-rank V U (V starts at zero, so the layer starts as its sparse part)."""

    def __init__(self, n_in: int, n_out: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.sparse = nn.Linear(n_in, n_out, bias=bias)
        self.u = nn.Linear(n_in, rank, bias=False) if rank else None
        self.v = nn.Linear(rank, n_out, bias=False) if rank else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sparse(x)
        return y + self.v(self.u(x)) if self.u is not None else y

    def init_as_dense(self, std: float) -> None:
        nn.init.normal_(self.sparse.weight, 0.0, std)
        if self.sparse.bias is not None:
            nn.init.zeros_(self.sparse.bias)
        if self.u is not None:
            nn.init.normal_(self.u.weight, 0.0, 1.0 / math.sqrt(self.u.in_features))
            nn.init.zeros_(self.v.weight)

    def to_dense(self) -> nn.Linear:
        w = self.sparse.weight.detach()
        if self.u is not None:
            w = w + self.v.weight.detach() @ self.u.weight.detach()
        return _linear(w, self.sparse.bias)


IFT_MODULES = (SparseParallelLinear, SparseFactorizedLinear, SparseDopedLinear)


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach())
    return out


def linear_family(family: str, dense: nn.Linear, sparsity: float, mid: str) -> nn.Module:
    """The module of `family` that replaces `dense` (parallel / factorized / doped)."""
    n_in, n_out, bias = dense.in_features, dense.out_features, dense.bias is not None
    if family == "parallel":
        return SparseParallelLinear(n_in, n_out, parallel_branches(sparsity), bias)
    if family == "factorized":
        return SparseFactorizedLinear(n_in, n_out, factorized_rank(n_in, n_out, sparsity), bias, mid)
    if family == "doped":
        return SparseDopedLinear(n_in, n_out, doped_rank(n_in, n_out, sparsity), bias)
    raise ValueError(f"ift.family={family!r} has no layer module (wide only changes the widths)")
