"""Sparse Iso-FLOP Transformations (Sparse-IFT, Thangarasa et al.): swap dense linear layers for a sparse
family with the same forward FLOPs at sparsity s, then let any DST rule train the sparse weights.

Families (n_in -> n_out dense layer, D = n_in * n_out multiply-adds per token):
- wide:       widen the hidden dimensions by k = 1/sqrt(1-s) (every block projection: residual stream and
              MLP hidden) or by 1/(1-s) (MLP hidden only, when only MLP layers are selected).
- parallel:   b = round(1/(1-s)) sparse copies of the layer, outputs summed.
- factorized: W -> V U, U: n_in -> r, V: r -> n_out, r = ceil(D / ((1-s)(n_in+n_out))), both sparse;
              optional LayerNorm and/or GELU between U and V.
- doped:      sparse W plus a dense low-rank U V of rank r = floor(s D / (n_in+n_out)).
`s` fixes the structure (width, branches, rank); each transformed layer's density is then solved so its
non-zero multiply-adds equal D exactly (up to one weight): it is 1-s whenever the structure is exact, and
absorbs the rounding of widths, branch counts and ranks otherwise. Pure torch: no Lightning/DeepSpeed.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES = ("wide", "parallel", "factorized", "doped")
MIDS = ("none", "layernorm", "gelu", "layernorm_gelu")
ATTN = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj")
MLP = ("mlp.fc_in", "mlp.fc_out")
DEFAULT_LAYERS = [f"blocks.*.{n}" for n in ATTN + MLP]


@dataclass
class SparseIFTConfig:
    """Which Sparse-IFT family replaces which dense layers, at which sparsity."""

    family: str = "wide"
    """wide, parallel, factorized or doped."""
    sparsity: float = 0.5
    """Sparsity s of the transformed layers, in [0, 1); fixes width / branches / rank."""
    layers: list[str] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    """Module-name patterns of the linear layers to transform (embeddings and LM head stay dense)."""
    factorized_mid: str = "none"
    """Between U and V of the factorized family: none, layernorm, gelu or layernorm_gelu."""
    match: str = "layers"
    """layers: each transformed layer has its dense layer's FLOPs; total: the sparse weights' density is
    lowered further so the whole forward pass (attention scores and the LM head, which Sparse Wide
    widens, included) has the dense model's FLOPs."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"ift.family={self.family!r} is unknown; choose one of: {', '.join(FAMILIES)}")
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"ift.sparsity={self.sparsity!r} must be in [0, 1)")
        if self.factorized_mid not in MIDS:
            raise ValueError(f"ift.factorized_mid={self.factorized_mid!r} is unknown; choose one of: {', '.join(MIDS)}")
        if self.match not in ("layers", "total"):
            raise ValueError(f"ift.match={self.match!r} is unknown; choose layers or total")
        if not self.layers:
            raise ValueError("ift.layers is empty; give module-name patterns such as 'blocks.*.mlp.fc_in'")


# -- transformed layers ---------------------------------------------------------------------------------
class SparseParallelLinear(nn.Module):
    """b parallel linear branches of the same shape, outputs summed (one shared bias)."""

    def __init__(self, n_in: int, n_out: int, branches: int, bias: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(n_in, n_out, bias=False) for _ in range(branches))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = sum(branch(x) for branch in self.branches)
        return y + self.bias if self.bias is not None else y

    def ift_init(self, std: float) -> None:
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

    def ift_init(self, std: float) -> None:
        n_in, rank = self.u.in_features, self.u.out_features
        # V U x has the dense layer's output scale: Var = r * sV^2 * n_in * sU^2 = n_in * std^2
        nn.init.normal_(self.u.weight, 0.0, 1.0 / math.sqrt(n_in))
        nn.init.normal_(self.v.weight, 0.0, std * math.sqrt(n_in / rank))
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

    def ift_init(self, std: float) -> None:
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


# -- structure ------------------------------------------------------------------------------------------
def parallel_branches(s: float) -> int:
    return max(1, int(math.floor(1.0 / (1.0 - s) + 0.5)))  # round half up (Python's round() is to even)


def factorized_rank(n_in: int, n_out: int, s: float) -> int:
    return int(math.ceil(n_in * n_out / ((1.0 - s) * (n_in + n_out)) - 1e-9))


def doped_rank(n_in: int, n_out: int, s: float) -> int:
    return int(math.floor(s * n_in * n_out / (n_in + n_out) + 1e-9))


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


def transform_modules(model: nn.Module, ift: SparseIFTConfig, names: list[str]) -> None:
    """Replace the named nn.Linear modules by the family's module (parallel / factorized / doped)."""
    s = ift.sparsity
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense: nn.Linear = getattr(parent, attr)
        n_in, n_out, bias = dense.in_features, dense.out_features, dense.bias is not None
        if ift.family == "parallel":
            new = SparseParallelLinear(n_in, n_out, parallel_branches(s), bias)
        elif ift.family == "factorized":
            new = SparseFactorizedLinear(n_in, n_out, factorized_rank(n_in, n_out, s), bias, ift.factorized_mid)
        elif ift.family == "doped":
            new = SparseDopedLinear(n_in, n_out, doped_rank(n_in, n_out, s), bias)
        else:  # pragma: no cover - wide is a config change
            raise ValueError(ift.family)
        setattr(parent, attr, new)


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


def iso_flop_densities(model: nn.Module, dense_shapes: dict[str, tuple[int, int]], ift: SparseIFTConfig,
                       names: list[str]) -> dict[str, float]:
    """Density of every sparse weight so each transformed layer's non-zero multiply-adds equal the dense
    layer's D (the dense parts of a doped layer count in full)."""
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
        base = model.base_config
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


def describe(ift: SparseIFTConfig, base_cfg, eff_cfg, names: list[str], model: nn.Module) -> str:
    s = ift.sparsity
    if ift.family == "wide":
        how = (f"n_embd {base_cfg.n_embd} -> {eff_cfg.n_embd}, MLP hidden {base_cfg.mlp_hidden} -> "
               f"{eff_cfg.mlp_hidden}")
    elif ift.family == "parallel":
        how = f"{parallel_branches(s)} parallel sparse branches per layer"
    elif names:
        first = model.get_submodule(names[0])
        how = f"rank {first.u.out_features} for {names[0]}" if getattr(first, "u", None) is not None else "rank 0"
    else:
        how = "experts only"
    experts = [f"{n}.{p.name}" for n, m in model.named_modules() for p in getattr(m, "projections", ())
               if p.family is not None]
    where = f"{len(names)} layers" + (f" and the experts' {', '.join(experts)}" if experts else "")
    return f"Sparse-IFT {ift.family} at s={s:g} on {where} ({how})"


def match_total_flops(model: nn.Module, densities: dict[str, float], dense_shapes: dict[str, tuple[int, int]],
                      seq_len: int) -> dict[str, float]:
    """Scale the sparse weights' densities so the whole forward pass costs the dense model's FLOPs."""
    from dstlm.models.gpt import linear_layer_names
    from dstlm.sparse.flops import count_flops, dense_count

    base_total = dense_count(model.base_config, dense_shapes, seq_len).forward
    now_dense = count_flops(model, linear_layer_names(model.base_config), seq_len).forward_all_dense  # no masks yet
    cost = {w: _numel_and_cost(model, w) for w in densities}
    other = now_dense - sum(n * c for n, c in cost.values())
    budget = base_total - other
    if budget <= 0:
        raise ValueError(f"ift.match=total is impossible: the dense parts of the transformed model alone cost "
                         f"{other / 1e6:.2f} MFLOP/token, more than the dense model's {base_total / 1e6:.2f}; use "
                         f"ift.match=layers or a lower ift.sparsity")
    scale = budget / sum(densities[w] * n * c for w, (n, c) in cost.items())
    return {w: min(1.0, d * scale) for w, d in densities.items()}


def ift_sparsity_config(model: nn.Module, ift: SparseIFTConfig, dense_shapes: dict[str, tuple[int, int]],
                        names: list[str], base, seq_len: Optional[int] = None):
    """The DST config that drives the transformed weights: the user's method and schedule, with every sparse
    weight of the transformed layers included at its iso-FLOP density (nothing else is sparsified)."""
    densities = iso_flop_densities(model, dense_shapes, ift, names)
    if ift.match == "total":
        densities = match_total_flops(model, densities, dense_shapes, seq_len or model.config.block_size)
    numel = {n: _numel_and_cost(model, n)[0] for n in densities}
    global_density = sum(densities[n] * numel[n] for n in densities) / sum(numel.values())
    params = dict(model.named_parameters())
    include = list(dict.fromkeys(n if n in params else n.rsplit(".", 1)[0] for n in densities))  # experts: their tensor
    return replace(base, include=include, exclude=[], no_ablate=[],
                   overrides={n: 1.0 - d for n, d in densities.items()},
                   sparsity=max(0.0, 1.0 - global_density), distribution="uniform")


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
