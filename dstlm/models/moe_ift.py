"""Sparse-IFT families on MoE expert projections, as batched [E, ...] tensors on the MoE layer.

Each expert projection `p` (`w_in`: C -> H, `w_out`: H -> C, dense shape [n_out, n_in]) is stored as:
- plain (no transform, or Sparse Wide, which only changes the widths):  p [E, n_out, n_in]
- parallel (b = round(1/(1-s)) branches):  p, p_b1 ... p_b{b-1}, each [E, n_out, n_in]; W_e = sum of branches
- factorized (rank r = ceil(D / ((1-s)(n_in+n_out)))):  p_u [E, r, n_in], p_v [E, n_out, r] (plus a per-expert
  LayerNorm p_norm_w / p_norm_b [E, r] when factorized_mid has layernorm); y = V_e mid(U_e x)
- doped (rank r = floor(s D / (n_in+n_out))):  p [E, n_out, n_in] sparse, p_u [E, r, n_in] and p_v [E, n_out, r]
  dense; y = W_e x + V_e U_e x
The same formulas as the dense-layer modules of dstlm.sparse.ift, expert by expert: every [E, ...] tensor is
listed in the layer's `batched_params` (so FLOP counts see it) and the sparse ones in `sparse_batched` (the
engine gives each expert matrix its own mask and iso-FLOP density).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dstlm.sparse.ift import doped_rank, factorized_rank, parallel_branches


class ExpertProjection:
    """The layout of one expert projection (no tensors: those live on the MoE layer)."""

    def __init__(self, name: str, n_out: int, n_in: int, family: Optional[str], sparsity: float, mid: str) -> None:
        self.name, self.n_out, self.n_in, self.family, self.mid = name, n_out, n_in, family, mid
        self.branches = parallel_branches(sparsity) if family == "parallel" else 1
        if family == "factorized":
            self.rank = factorized_rank(n_in, n_out, sparsity)
        elif family == "doped":
            self.rank = doped_rank(n_in, n_out, sparsity)
        else:
            self.rank = 0

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Batched tensor name -> per-expert [rows, cols]."""
        p, o, i, r = self.name, self.n_out, self.n_in, self.rank
        if self.family == "factorized":
            return {f"{p}_u": (r, i), f"{p}_v": (o, r)}
        shapes = {p: (o, i)}
        shapes.update({f"{p}_b{j}": (o, i) for j in range(1, self.branches)})
        if self.family == "doped" and r:
            shapes.update({f"{p}_u": (r, i), f"{p}_v": (o, r)})
        return shapes

    def sparse(self) -> list[str]:
        """The tensors DST sparsifies (the dense low-rank part of doped stays dense)."""
        return [n for n in self.shapes() if self.family != "doped" or n == self.name]

    def create(self, layer: nn.Module, E: int) -> None:
        for n, shape in self.shapes().items():
            layer.register_parameter(n, nn.Parameter(torch.empty(E, *shape)))
        if self.family == "factorized" and "layernorm" in self.mid:
            layer.register_parameter(f"{self.name}_norm_w", nn.Parameter(torch.ones(E, self.rank)))
            layer.register_parameter(f"{self.name}_norm_b", nn.Parameter(torch.zeros(E, self.rank)))

    @torch.no_grad()
    def reset(self, layer: nn.Module, std: float) -> None:
        """Initialise so each expert's product has the dense projection's output scale (as dstlm.sparse.ift)."""
        p = self.name
        if self.family == "factorized":
            nn.init.normal_(getattr(layer, f"{p}_u"), 0.0, 1.0 / math.sqrt(self.n_in))
            nn.init.normal_(getattr(layer, f"{p}_v"), 0.0, std * math.sqrt(self.n_in / self.rank))
            if hasattr(layer, f"{p}_norm_w"):
                nn.init.ones_(getattr(layer, f"{p}_norm_w"))
                nn.init.zeros_(getattr(layer, f"{p}_norm_b"))
            return
        for j in range(self.branches):  # the sum of b branches has the dense std
            nn.init.normal_(getattr(layer, p if j == 0 else f"{p}_b{j}"), 0.0, std / math.sqrt(self.branches))
        if self.family == "doped" and self.rank:
            nn.init.normal_(getattr(layer, f"{p}_u"), 0.0, 1.0 / math.sqrt(self.n_in))
            nn.init.zeros_(getattr(layer, f"{p}_v"))  # the expert starts as its sparse part

    def apply(self, layer: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, n_in] -> expert e's projection [n, n_out]."""
        p = self.name
        if self.family == "factorized":
            h = x @ getattr(layer, f"{p}_u")[e].t()
            if hasattr(layer, f"{p}_norm_w"):
                h = F.layer_norm(h, (self.rank,), getattr(layer, f"{p}_norm_w")[e], getattr(layer, f"{p}_norm_b")[e])
            if "gelu" in self.mid:
                h = F.gelu(h, approximate="tanh")
            return h @ getattr(layer, f"{p}_v")[e].t()
        w = getattr(layer, p)[e]
        for j in range(1, self.branches):  # sum of the sparse branches' weights = sum of their outputs
            w = w + getattr(layer, f"{p}_b{j}")[e]
        y = x @ w.t()
        if self.family == "doped" and self.rank:
            y = y + (x @ getattr(layer, f"{p}_u")[e].t()) @ getattr(layer, f"{p}_v")[e].t()
        return y

    @torch.no_grad()
    def folded(self, layer: nn.Module) -> torch.Tensor:
        """The [E, n_out, n_in] dense weights this projection computes (for export)."""
        p = self.name
        if self.family == "factorized":
            if self.mid != "none":
                raise ValueError(f"experts factorized with factorized_mid={self.mid!r} are not linear and cannot be "
                                 f"folded into dense experts; export needs factorized_mid=none")
            return getattr(layer, f"{p}_v") @ getattr(layer, f"{p}_u")
        w = sum(getattr(layer, p if j == 0 else f"{p}_b{j}") for j in range(self.branches))
        if self.family == "doped" and self.rank:
            w = w + getattr(layer, f"{p}_v") @ getattr(layer, f"{p}_u")
        return w.detach().clone()

    def names(self) -> list[str]:
        extra = [f"{self.name}_norm_w", f"{self.name}_norm_b"] if self.family == "factorized" and \
            "layernorm" in self.mid else []
        return list(self.shapes()) + extra
