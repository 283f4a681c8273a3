"""Sparse-IFT as a model converter (`SparseIFT`): Sparse Wide rewrites the model config before the build;
Parallel, Factorized and Doped swap the selected linear layers (dstlm/transforms/ift_layers.py) and MoE expert
projections (ift_experts.py) after it. Then `sparsity_config` gives the DST config that trains the transformed
weights, each at the density that keeps its layer at the dense layer's FLOPs (or, with match=total, the whole
forward pass at the dense model's). The formulas are in ift_spec.py. Plain torch: no Lightning/DeepSpeed.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import replace
from typing import Optional

import torch.nn as nn

from dstlm.models.gpt import GPTConfig, dense_layer_shapes, expert_layer_names, linear_layer_names
from dstlm.models.moe import MoEMLP
from dstlm.sparse.config import SparsityConfig
from dstlm.sparse.flops import count_flops, dense_count
from dstlm.transforms.ift_experts import expert_projection
from dstlm.transforms.ift_layers import (IFT_MODULES, SparseDopedLinear, SparseFactorizedLinear,
                                         SparseParallelLinear, linear_family)
from dstlm.transforms.ift_spec import DEFAULT_LAYERS, SparseIFTConfig, parallel_branches

__all__ = ["SparseIFT", "SparseIFTConfig", "fold_to_dense"]


class SparseIFT:
    """The converter for one SparseIFTConfig on a model whose dense config is `base`."""

    name = "sparse_ift"

    def __init__(self, cfg: SparseIFTConfig, base: GPTConfig) -> None:
        self.cfg, self.base = cfg, base
        self.every = linear_layer_names(base)
        experts = expert_layer_names(base)
        selected = selected_layers(self.every + list(experts), cfg.layers)
        self.layers = [n for n in selected if n not in experts]  # dense linear layers transformed
        self.experts: dict[int, list[str]] = {}  # MoE block -> its expert projections transformed
        for n in selected:
            if n in experts and cfg.family != "wide":  # Sparse Wide widens the experts with the model
                i, w = experts[n]
                self.experts.setdefault(i, []).append(w)
        self.config: GPTConfig = wide_config(base, cfg, self.layers, self.every) if cfg.family == "wide" else base

    def transform_config(self, cfg: GPTConfig) -> GPTConfig:
        return self.config

    def transform_model(self, model: nn.Module) -> None:
        s, family = self.cfg.sparsity, self.cfg.family
        if family == "wide":
            return
        for name in self.layers:  # in model order: each new module draws its construction init in turn
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, linear_family(family, getattr(parent, attr), s, self.cfg.factorized_mid))
        for i, projections in self.experts.items():
            moe: MoEMLP = model.blocks[i].mlp
            for j, proj in enumerate(moe.projections):
                if proj.name in projections:
                    moe.set_projection(j, expert_projection(family, proj, s, self.cfg.factorized_mid))

    def sparsity_config(self, model: nn.Module, base: SparsityConfig, seq_len: Optional[int] = None) -> SparsityConfig:
        """The DST config that drives the transformed weights: the user's method and schedule, with every sparse
        weight of the transformed layers included at its iso-FLOP density (nothing else is sparsified)."""
        if base.method_class.fixed_sparsity:
            raise ValueError(f"ift.family={self.cfg.family} with sparsity.method={base.method}: that method fixes "
                             f"every layer's density, so Sparse-IFT's iso-FLOP densities cannot be applied; use "
                             f"rigl, srigl, set or static")
        densities = iso_flop_densities(model, self.base, self.cfg, self.layers)
        if self.cfg.match == "total":
            densities = match_total_flops(model, densities, self.base, seq_len or self.config.block_size)
        numel = {n: _numel_and_cost(model, n)[0] for n in densities}
        global_density = sum(densities[n] * numel[n] for n in densities) / sum(numel.values())
        params = dict(model.named_parameters())
        include = list(dict.fromkeys(n if n in params else n.rsplit(".", 1)[0] for n in densities))  # experts
        return replace(base, include=include, exclude=[], no_ablate=[],
                       overrides={n: 1.0 - d for n, d in densities.items()},
                       sparsity=max(0.0, 1.0 - global_density), distribution="uniform")

    @staticmethod
    def overridden(base: SparsityConfig) -> list[str]:
        """The user's sparsity fields, set away from their defaults, that `sparsity_config` replaces."""
        defaults = SparsityConfig(method=base.method)
        fields = ("distribution", "include", "exclude", "overrides", "no_ablate")
        return [f"sparsity.{k}={getattr(base, k)!r}" for k in fields if getattr(base, k) != getattr(defaults, k)]

    def describe(self, model: nn.Module) -> str:
        s = self.cfg.sparsity
        if self.cfg.family == "wide":
            how = (f"n_embd {self.base.n_embd} -> {self.config.n_embd}, MLP hidden {self.base.mlp_hidden} -> "
                   f"{self.config.mlp_hidden}")
        elif self.cfg.family == "parallel":
            how = f"{parallel_branches(s)} parallel sparse branches per layer"
        elif self.layers:
            first = model.get_submodule(self.layers[0])
            how = f"rank {first.u.out_features} for {self.layers[0]}" if getattr(first, "u", None) is not None \
                else "rank 0"
        else:
            how = "experts only"
        experts = [f"blocks.{i}.mlp.{w}" for i, ws in self.experts.items() for w in ws]
        where = f"{len(self.layers)} layers" + (f" and the experts' {', '.join(experts)}" if experts else "")
        return f"Sparse-IFT {self.cfg.family} at s={s:g} on {where} ({how})"


def selected_layers(linears: list[str], patterns: list[str]) -> list[str]:
    """The linear-layer names matching any pattern; a pattern matching none is refused."""
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in linears):
            raise ValueError(f"ift.layers pattern {pat!r} matches no linear layer; layers look like "
                             f"{linears[0]!r} (embeddings and the LM head stay dense)")
    return [n for n in linears if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]


def wide_mode(names: list[str], every: list[str]) -> str:
    """'residual' (every block projection selected) or 'mlp' (exactly the MLP layers); else refused.
    `every`: the model's dense block projections (MoE blocks have experts instead of an MLP)."""
    mlp = {n for n in every if ".mlp." in n}
    if set(names) == set(every):
        return "residual"
    if mlp and set(names) == mlp:
        return "mlp"
    raise ValueError("ift.family=wide widens shared hidden dimensions, so it needs either every block projection "
                     f"({DEFAULT_LAYERS}) or exactly the MLP layers (['blocks.*.mlp.fc_in', 'blocks.*.mlp.fc_out']); "
                     f"got {len(names)} layers")


def wide_config(cfg, ift: SparseIFTConfig, names: list[str], every: list[str]):
    """The widened model config. The residual width is rounded to a multiple of the head count (x2 for
    RoPE's even head size) -- the solved densities absorb the rounding. MoE experts widen with the MLP
    (unless model.moe.expert_hidden fixes their width) and are sparsified at their iso-FLOP density too."""
    s = ift.sparsity
    if wide_mode(names, every) == "mlp":
        return replace(cfg, mlp_ratio=cfg.mlp_ratio / (1.0 - s))
    unit = cfg.n_head * (2 if cfg.pos_emb == "rope" else 1)
    width = max(unit, int(math.floor(cfg.n_embd / math.sqrt(1.0 - s) / unit + 0.5)) * unit)
    return replace(cfg, n_embd=width)


def sparse_weights(model: nn.Module, ift: SparseIFTConfig, names: list[str]) -> dict[str, tuple[str, ...]]:
    """For each transformed layer, the parameter names of its sparse weights."""
    out = {}
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, SparseParallelLinear):
            out[name] = tuple(f"{name}.branches.{i}.weight" for i in range(len(m.branches)))
        elif isinstance(m, SparseFactorizedLinear):
            out[name] = (f"{name}.u.weight", f"{name}.v.weight")
        elif isinstance(m, SparseDopedLinear):
            out[name] = (f"{name}.sparse.weight",)
        else:
            out[name] = (f"{name}.weight",)
    return out


def iso_flop_densities(model: nn.Module, base, ift: SparseIFTConfig, names: list[str]) -> dict[str, float]:
    """Density of every sparse weight so each transformed layer's non-zero multiply-adds equal the dense
    layer's D (the dense parts of a doped layer count in full). `base`: the dense model's config."""
    dense_shapes = dense_layer_shapes(base)
    params = dict(model.named_parameters())
    out = {}
    for name, weights in sparse_weights(model, ift, names).items():
        n_out, n_in = dense_shapes[name]
        budget = n_in * n_out
        m = model.get_submodule(name)
        if isinstance(m, SparseDopedLinear) and m.u is not None:
            budget -= m.u.weight.numel() + m.v.weight.numel()
        total = sum(params[w].numel() for w in weights)
        density = min(1.0, budget / total)
        for w in weights:
            out[w] = density
    for name, m in model.named_modules():  # Sparse-IFT experts: per expert, the same rule as a layer
        for proj in getattr(m, "projections", ()):
            if proj.family is None:
                continue
            shapes = proj.shapes()
            sparse = proj.sparse()
            budget = proj.n_in * proj.n_out - sum(math.prod(shapes[n]) for n in shapes if n not in sparse)
            density = min(1.0, budget / sum(math.prod(shapes[n]) for n in sparse))
            out.update({f"{name}.{n}.{e}": density for n in sparse for e in range(m.cfg.num_experts)})
    if ift.family == "wide":  # MoE experts widened with the model: each expert matrix at base / wide size
        for name, m in model.named_modules():
            if hasattr(m, "batched_params"):
                hidden0 = base.moe.expert_hidden or base.mlp_hidden
                for attr in m.batched_params:
                    w = getattr(m, attr)
                    density = min(1.0, hidden0 * base.n_embd / w[0].numel())
                    if density < 1.0:
                        out.update({f"{name}.{attr}.{e}": density for e in range(w.shape[0])})
    return out


def _numel_and_cost(model: nn.Module, name: str) -> tuple[int, float]:
    """Elements of a sparse matrix (a parameter, or one expert of a batched one) and the forward FLOPs per
    token one of its non-zeros costs (2; for an expert, 2 * top_k / num_experts: tokens visit k of E)."""
    params = dict(model.named_parameters())
    if name in params:
        return params[name].numel(), 2.0
    owner, attr, _ = name.rsplit(".", 2)
    m = model.get_submodule(owner)
    return getattr(m, attr)[0].numel(), 2.0 * m.cfg.top_k / m.cfg.num_experts


def match_total_flops(model: nn.Module, densities: dict[str, float], base, seq_len: int) -> dict[str, float]:
    """Scale the sparse weights' densities so the whole forward pass costs the dense model's FLOPs."""
    base_total = dense_count(base, dense_layer_shapes(base), seq_len).forward
    now_dense = count_flops(model, linear_layer_names(base), seq_len).forward_all_dense  # no masks yet
    cost = {w: _numel_and_cost(model, w) for w in densities}
    other = now_dense - sum(n * c for n, c in cost.values())
    budget = base_total - other
    if budget <= 0:
        raise ValueError(f"ift.match=total is impossible: the dense parts of the transformed model alone cost "
                         f"{other / 1e6:.2f} MFLOP/token, more than the dense model's {base_total / 1e6:.2f}; use "
                         f"ift.match=layers or a lower ift.sparsity")
    scale = budget / sum(densities[w] * n * c for w, (n, c) in cost.items())
    return {w: min(1.0, d * scale) for w, d in densities.items()}


def fold_to_dense(model: nn.Module) -> nn.Module:
    """Replace every parallel / doped / linear-factorized layer by the one dense nn.Linear it computes
    (exactly: sum of branches, W + V U, V U), and such MoE experts by plain [E, out, in] experts, e.g. to
    export to a standard architecture. In place."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "fold_experts"):  # MoE experts stored as a Sparse-IFT family
            module.fold_experts()
        if isinstance(module, IFT_MODULES):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.to_dense())
    return model
