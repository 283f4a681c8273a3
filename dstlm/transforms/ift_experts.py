"""Sparse-IFT families on MoE expert projections, as batched [E, ...] tensors on the MoE layer.

Each expert projection `p` (`w_in`: C -> H, `w_out`: H -> C, dense shape [n_out, n_in]) is stored as:
- plain (no transform, or Sparse Wide, which only changes the widths):  p [E, n_out, n_in]
- parallel (b branches):  p, p_b1 ... p_b{b-1}, each [E, n_out, n_in]; W_e = sum of branches
- factorized (rank r):  p_u [E, r, n_in], p_v [E, n_out, r] (plus a per-expert LayerNorm p_norm_w / p_norm_b
  [E, r] when factorized_mid has layernorm); y = V_e mid(U_e x)
- doped (rank r):  p [E, n_out, n_in] sparse, p_u [E, r, n_in] and p_v [E, n_out, r] dense; y = W_e x + V_e U_e x
Structure (b, r) and initial scales come from dstlm/transforms/ift.py's formulas, shared with the linear-layer
families. Every [E, ...] tensor is listed in the layer's `batched_params` (so FLOP counts see it) and the
sparse ones in `sparse_batched` (the engine gives each expert matrix its own mask and iso-FLOP density).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dstlm.models.moe import ExpertProjection
from dstlm.transforms.ift_spec import doped_rank, factorized_init_std, factorized_rank, parallel_branches


class ParallelExperts(ExpertProjection):
    family = "parallel"

    def __init__(self, name: str, n_out: int, n_in: int, sparsity: float) -> None:
        super().__init__(name, n_out, n_in)
        self.branches = parallel_branches(sparsity)

    def _branch(self, j: int) -> str:
        return self.name if j == 0 else f"{self.name}_b{j}"

    def shapes(self):
        return {self._branch(j): (self.n_out, self.n_in) for j in range(self.branches)}

    @torch.no_grad()
    def reset(self, layer, std):
        for j in range(self.branches):  # the sum of b branches has the dense std
            nn.init.normal_(getattr(layer, self._branch(j)), 0.0, std / math.sqrt(self.branches))

    def apply(self, layer, e, x):
        w = getattr(layer, self.name)[e]
        for j in range(1, self.branches):  # sum of the branches' weights = sum of their outputs
            w = w + getattr(layer, self._branch(j))[e]
        return x @ w.t()

    @torch.no_grad()
    def folded(self, layer):
        return sum(getattr(layer, self._branch(j)) for j in range(self.branches)).detach().clone()


class FactorizedExperts(ExpertProjection):
    family = "factorized"

    def __init__(self, name: str, n_out: int, n_in: int, sparsity: float, mid: str) -> None:
        super().__init__(name, n_out, n_in)
        self.rank, self.mid = factorized_rank(n_in, n_out, sparsity), mid

    def shapes(self):
        return {f"{self.name}_u": (self.rank, self.n_in), f"{self.name}_v": (self.n_out, self.rank)}

    def names(self):
        norm = [f"{self.name}_norm_w", f"{self.name}_norm_b"] if "layernorm" in self.mid else []
        return list(self.shapes()) + norm

    def create(self, layer, E):
        super().create(layer, E)
        if "layernorm" in self.mid:
            layer.register_parameter(f"{self.name}_norm_w", nn.Parameter(torch.ones(E, self.rank)))
            layer.register_parameter(f"{self.name}_norm_b", nn.Parameter(torch.zeros(E, self.rank)))

    @torch.no_grad()
    def reset(self, layer, std):
        su, sv = factorized_init_std(self.n_in, self.rank, std)
        nn.init.normal_(getattr(layer, f"{self.name}_u"), 0.0, su)
        nn.init.normal_(getattr(layer, f"{self.name}_v"), 0.0, sv)
        if "layernorm" in self.mid:
            nn.init.ones_(getattr(layer, f"{self.name}_norm_w"))
            nn.init.zeros_(getattr(layer, f"{self.name}_norm_b"))

    def apply(self, layer, e, x):
        p = self.name
        h = x @ getattr(layer, f"{p}_u")[e].t()
        if "layernorm" in self.mid:
            h = F.layer_norm(h, (self.rank,), getattr(layer, f"{p}_norm_w")[e], getattr(layer, f"{p}_norm_b")[e])
        if "gelu" in self.mid:
            h = F.gelu(h, approximate="tanh")
        return h @ getattr(layer, f"{p}_v")[e].t()

    @torch.no_grad()
    def folded(self, layer):
        if self.mid != "none":
            raise ValueError(f"experts factorized with factorized_mid={self.mid!r} are not linear and cannot be "
                             f"folded into dense experts; export needs factorized_mid=none")
        return getattr(layer, f"{self.name}_v") @ getattr(layer, f"{self.name}_u")


class DopedExperts(ExpertProjection):
    family = "doped"

    def __init__(self, name: str, n_out: int, n_in: int, sparsity: float) -> None:
        super().__init__(name, n_out, n_in)
        self.rank = doped_rank(n_in, n_out, sparsity)

    def shapes(self):
        shapes = {self.name: (self.n_out, self.n_in)}
        if self.rank:
            shapes.update({f"{self.name}_u": (self.rank, self.n_in), f"{self.name}_v": (self.n_out, self.rank)})
        return shapes

    def sparse(self):
        return [self.name]  # the low-rank part stays dense

    @torch.no_grad()
    def reset(self, layer, std):
        nn.init.normal_(getattr(layer, self.name), 0.0, std)
        if self.rank:
            nn.init.normal_(getattr(layer, f"{self.name}_u"), 0.0, 1.0 / math.sqrt(self.n_in))
            nn.init.zeros_(getattr(layer, f"{self.name}_v"))  # the expert starts as its sparse part

    def apply(self, layer, e, x):
        y = x @ getattr(layer, self.name)[e].t()
        if self.rank:
            y = y + (x @ getattr(layer, f"{self.name}_u")[e].t()) @ getattr(layer, f"{self.name}_v")[e].t()
        return y

    @torch.no_grad()
    def folded(self, layer):
        w = getattr(layer, self.name).detach().clone()
        if self.rank:
            w = w + getattr(layer, f"{self.name}_v") @ getattr(layer, f"{self.name}_u")
        return w


def expert_projection(family: str, proj: ExpertProjection, sparsity: float, mid: str) -> ExpertProjection:
    """The Sparse-IFT layout of a plain expert projection."""
    if family == "parallel":
        return ParallelExperts(proj.name, proj.n_out, proj.n_in, sparsity)
    if family == "factorized":
        return FactorizedExperts(proj.name, proj.n_out, proj.n_in, sparsity, mid)
    if family == "doped":
        return DopedExperts(proj.name, proj.n_out, proj.n_in, sparsity)
    raise ValueError(f"ift.family={family!r} has no expert layout (wide only changes the widths)")
