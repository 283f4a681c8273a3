"""FLOPs per token of a (sparse, possibly Sparse-IFT transformed) GPT against its dense baseline.

Conventions (say them with every figure):
- a linear layer costs 2 FLOPs per non-zero weight per token (one multiply-add); masks are read from the
  modules' `weight_mask` buffers (or, masks partitioned across ranks, the sparse engine's counts:
  `active=engine.active_entries()`), so the count is of the weights that are really non-zero;
- attention scores (Q K^T and A V) cost 2 * 2 * T * C per layer per token at context T, width C (no
  discount for the causal mask, as in the PaLM/nanoGPT MFU convention); embeddings lookups cost 0;
- training = forward + backward = 3x forward for dense and for static sparse weights (sparse input and
  weight gradients); each DST method says its own cost (`DSTMethod.training_flops`): those that read the
  dense gradient (RigL, SRigL, N:M) add it every delta_t steps: (3 f_s delta_t + 2 f_s + f_D) / (delta_t + 1),
  f_D the forward FLOPs with every sparse weight dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from dstlm.sparse.methods import method_class


@dataclass
class FlopCount:
    layers: dict[str, int] = field(default_factory=dict)        # original layer name -> forward FLOPs/token
    layers_dense: dict[str, int] = field(default_factory=dict)  # same, if every sparse weight were dense
    density: dict[str, float] = field(default_factory=dict)
    attention: int = 0
    lm_head: int = 0
    n_embd: int = 0

    @property
    def forward(self) -> int:
        return sum(self.layers.values()) + self.attention + self.lm_head

    @property
    def forward_all_dense(self) -> int:
        return sum(self.layers_dense.values()) + self.attention + self.lm_head


def active_entries(module: nn.Module, attr: str, size: int, active: Optional[dict] = None) -> int:
    """Non-zero entries of `module.<attr>` (`size` entries): `active[(id(module), attr)]` when given, else its
    mask buffer's sum, else all of them. A mask partitioned across ranks leaves an empty buffer: refused."""
    if active is not None and (id(module), attr) in active:
        return active[(id(module), attr)]
    mask = getattr(module, f"{attr}_mask", None)
    if mask is None:
        return size
    if mask.numel() != size:
        raise ValueError(f"{type(module).__name__}.{attr}_mask holds {mask.numel()} of its {size} entries (masks "
                         f"partitioned across ranks); count with the engine's counts: active=engine.active_entries()")
    return int(mask.sum())


def count_flops(model: nn.Module, layer_names: list[str], seq_len: int, active: Optional[dict] = None) -> FlopCount:
    """Forward FLOPs per token, grouped by the dense model's layer names (a transformed layer's branches,
    factors and low-rank parts count towards the layer they replace). `active`: non-zero entries per sparse
    parameter (`SparseEngine.active_entries()`), read instead of the modules' mask buffers."""
    out = FlopCount(n_embd=model.config.n_embd)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for layer in layer_names:
        parts = [(m, "weight") for n, m in linears.items() if n == layer or n.startswith(layer + ".")]
        nnz, numel = _entries(parts, active)
        out.layers[layer], out.layers_dense[layer] = 2 * nnz, 2 * numel
        out.density[layer] = nnz / max(1, numel)
    for name, m in model.named_modules():  # MoE MLPs: router + the top_k experts a token visits (mean nnz)
        if hasattr(m, "batched_params"):
            E, k = m.cfg.num_experts, m.cfg.top_k
            nnz, numel = _entries([(m, attr) for attr in m.batched_params], active)
            router = m.router.weight.numel()
            out.layers[name] = 2 * (k * nnz // E + router)
            out.layers_dense[name] = 2 * (k * numel // E + router)
            out.density[name] = nnz / max(1, numel)
    head = linears.get("lm_head")
    out.lm_head = 2 * _size(head.weight) if head is not None else 0
    out.attention = 2 * 2 * seq_len * model.config.n_embd * model.config.n_layer
    return out


def _size(w: torch.Tensor) -> int:
    return getattr(w, "ds_numel", None) or w.numel()  # ZeRO-3 partitions the weight


def _entries(parts: list[tuple[nn.Module, str]], active: Optional[dict]) -> tuple[int, int]:
    """(non-zero, all) entries of the (module, attribute) weights."""
    nnz = numel = 0
    for m, attr in parts:
        size = _size(getattr(m, attr))
        numel += size
        nnz += active_entries(m, attr, size, active)
    return nnz, numel


def dense_count(cfg, shapes: dict[str, tuple[int, int]], seq_len: int) -> FlopCount:
    """The dense baseline's count from its config alone (no model is built)."""
    out = FlopCount(n_embd=cfg.n_embd)
    for name, (n_out, n_in) in shapes.items():
        out.layers[name] = out.layers_dense[name] = 2 * n_out * n_in
        out.density[name] = 1.0
    if cfg.moe is not None:
        hidden = cfg.moe.expert_hidden or cfg.mlp_hidden
        for i in range(cfg.n_layer):
            if cfg.moe.is_moe_layer(i):
                active = cfg.moe.top_k * 2 * cfg.n_embd * hidden + cfg.n_embd * cfg.moe.num_experts
                out.layers[f"blocks.{i}.mlp"] = out.layers_dense[f"blocks.{i}.mlp"] = 2 * active
                out.density[f"blocks.{i}.mlp"] = 1.0
    out.lm_head = 2 * cfg.n_embd * cfg.padded_vocab_size
    out.attention = 2 * 2 * seq_len * cfg.n_embd * cfg.n_layer
    return out


def training_flops(c: FlopCount, method: Optional[str], delta_t: int) -> float:
    """Training FLOPs per token: 3x forward for a dense model (method None), else what the method says."""
    if method is None:
        return 3.0 * c.forward
    return method_class(method)(None).training_flops(c.forward, c.forward_all_dense, delta_t)


def report(base: FlopCount, new: FlopCount, method: Optional[str], delta_t: int, seq_len: int) -> tuple[str, dict]:
    """A table of per-layer and total forward FLOPs, training FLOPs and ratios; and the same as a dict."""
    w = max([26] + [len(n) for n in base.layers])
    lines = [f"forward FLOPs per token at context {seq_len} (2 x non-zero weights; attention 4*T*C per layer)",
             f"{'layer':<{w}} {'dense MFLOP':>12} {'this MFLOP':>12} {'ratio':>7} {'density':>8}"]
    for name, flops in base.layers.items():
        mine = new.layers.get(name, 0)
        lines.append(f"{name:<{w}} {flops / 1e6:>12.4f} {mine / 1e6:>12.4f} {mine / flops:>7.3f} "
                     f"{new.density.get(name, 1.0):>8.3f}")
    w_base, w_new = sum(base.layers.values()), sum(new.layers.values())
    lines.append(f"{'all block projections':<{w}} {w_base / 1e6:>12.4f} {w_new / 1e6:>12.4f} {w_new / w_base:>7.3f}")
    grew = []
    for label, a, b in (("attention scores", base.attention, new.attention), ("LM head", base.lm_head, new.lm_head)):
        lines.append(f"{label:<{w}} {a / 1e6:>12.4f} {b / 1e6:>12.4f} {b / max(1, a):>7.3f}")
        if b > a:
            grew.append(f"{label} x{b / a:.3f} (width {base.n_embd} -> {new.n_embd})")
    ratio = new.forward / base.forward
    lines.append(f"{'total forward':<{w}} {base.forward / 1e6:>12.4f} {new.forward / 1e6:>12.4f} {ratio:>7.3f}")
    t_base, t_new = training_flops(base, None, delta_t), training_flops(new, method, delta_t)
    reads_dense_grad = method is not None and method_class(method).uses_dense_grad
    how = f"{method}, delta_t={delta_t}" if reads_dense_grad else (method or "dense")
    lines.append(f"{'training (' + how + ')':<{w}} {t_base / 1e6:>12.4f} {t_new / 1e6:>12.4f} {t_new / t_base:>7.3f}")
    if grew:
        lines.append("non-weight FLOPs that grew: " + "; ".join(grew))
    summary = {"forward_dense": base.forward, "forward": new.forward, "forward_ratio": ratio,
               "block_projection_ratio": w_new / w_base, "training_dense": t_base, "training": t_new,
               "training_ratio": t_new / t_base, "attention_ratio": new.attention / max(1, base.attention),
               "lm_head_ratio": new.lm_head / max(1, base.lm_head),
               "layers": {n: {"dense": base.layers[n], "this": new.layers.get(n, 0),
                              "density": new.density.get(n, 1.0)} for n in base.layers}}
    return "\n".join(lines), summary
