"""Sparse-IFT (Sparse Iso-FLOP Transformations, Thangarasa et al.): its config and the structure formulas
shared by the linear-layer families (ift_layers.py) and the MoE expert families (ift_experts.py).

Families (n_in -> n_out dense layer, D = n_in * n_out multiply-adds per token):
- wide:       widen the hidden dimensions by k = 1/sqrt(1-s) (every block projection: residual stream and
              MLP hidden) or by 1/(1-s) (MLP hidden only, when only MLP layers are selected).
- parallel:   b = round(1/(1-s)) sparse copies of the layer, outputs summed.
- factorized: W -> V U, U: n_in -> r, V: r -> n_out, r = ceil(D / ((1-s)(n_in+n_out))), both sparse;
              optional LayerNorm and/or GELU between U and V.
- doped:      sparse W plus a dense low-rank U V of rank r = floor(s D / (n_in+n_out)).
`s` fixes the structure (width, branches, rank); each transformed layer's density is then solved so its
non-zero multiply-adds equal D exactly (dstlm/transforms/ift.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dstlm.config_types import check_field_types

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
        check_field_types(self, "ift")
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


def parallel_branches(s: float) -> int:
    return max(1, int(math.floor(1.0 / (1.0 - s) + 0.5)))  # round half up (Python's round() is to even)


def factorized_rank(n_in: int, n_out: int, s: float) -> int:
    return int(math.ceil(n_in * n_out / ((1.0 - s) * (n_in + n_out)) - 1e-9))


def doped_rank(n_in: int, n_out: int, s: float) -> int:
    return int(math.floor(s * n_in * n_out / (n_in + n_out) + 1e-9))


def factorized_init_std(n_in: int, rank: int, std: float) -> tuple[float, float]:
    """Stds of U and V so V U x has the dense layer's output scale: Var = r sV^2 n_in sU^2 = n_in std^2."""
    return 1.0 / math.sqrt(n_in), std * math.sqrt(n_in / rank)
