"""FLOPs per token of a Hugging Face causal LM (masks included) and of its dense self, with the conventions of
dstlm.sparse.flops: 2 FLOPs per non-zero weight per token for every matrix a token multiplies, attention
scores 4 * T * (heads x head_dim) per layer at context T, embedding lookups free.

What a token multiplies, read from the model's own modules:
- every `nn.Linear` and GPT-2 `Conv1D` weight, sparse or dense (projections, routers and gates, shared
  experts), and the 2-D weight of a router module, counted once per token; its non-zeros from the
  `<weight>_mask` buffer dstlm registers;
- fused expert tensors ([E, ...], one matrix per expert): a token visits `top_k` of the E experts, so it costs
  2 * top_k * (non-zeros of all experts) / E, the mean over experts (as dstlm's own MoE count);
- the LM head, once (tied or not), always dense.
Attention is counted as full T x T (no causal discount, no sliding window): the MFU convention, and what
torch's FLOP counter sees of an eager forward (the tests compare with it).
"""

from __future__ import annotations

import torch.nn as nn

from dstlm.hf.model import is_router
from dstlm.sparse.flops import FlopCount, active_entries

TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")


def _attr(config, names: tuple[str, ...]):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return None


def attention_width(config) -> tuple[int, int]:
    """(layers, heads x head_dim) of a transformers config (GPT-2's n_head/n_embd map onto these names)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, hidden = text.num_hidden_layers, text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return layers, heads * head_dim


def hf_flop_counts(model, seq_len: int, active=None) -> tuple[FlopCount, FlopCount]:
    """(dense baseline, this model) forward FLOPs per token of an HFCausalLM at context `seq_len`, per weight.
    `active`: non-zero entries per sparse parameter (`SparseEngine.active_entries()`), instead of mask buffers."""
    from transformers.pytorch_utils import Conv1D

    hf = model.hf
    text = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    head = hf.get_output_embeddings()
    skip = {id(p) for p in hf.get_input_embeddings().parameters()}
    if head is not None:
        skip.update(id(p) for p in head.parameters())
    layers, width = attention_width(hf.config)
    this, base = FlopCount(n_embd=width), FlopCount(n_embd=width)
    seen: set[int] = set()
    for mod_name, module in hf.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            shape = tuple(getattr(p, "ds_shape", None) or p.shape)  # ZeRO-3 partitions the weight
            if id(p) in seen or id(p) in skip or len(shape) < 2:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{attr}" if mod_name else attr
            numel = getattr(p, "ds_numel", None) or p.numel()
            nnz = active_entries(module, attr, numel, active)
            if attr == "weight" and (isinstance(module, (nn.Linear, Conv1D)) or (len(shape) == 2 and is_router(name))):
                visits, experts = 1, 1  # routers may be their own modules (Mixtral's TopKRouter: F.linear)
            elif len(shape) == 3 and hasattr(module, "num_experts") and shape[0] == module.num_experts:
                visits, experts = _attr(text, TOP_K_KEYS), shape[0]
                if visits is None:
                    raise ValueError(f"{name}: fused experts, but the config names no top-k ({', '.join(TOP_K_KEYS)})"
                                     f"; FLOPs per token cannot be counted for {type(hf).__name__}")
            else:
                continue  # no matrix product per token (e.g. a positional table)
            this.layers[name] = 2 * visits * nnz // experts
            this.layers_dense[name] = base.layers[name] = base.layers_dense[name] = 2 * visits * numel // experts
            this.density[name], base.density[name] = nnz / max(1, numel), 1.0
    if head is not None:
        w = head.weight
        this.lm_head = base.lm_head = 2 * (getattr(w, "ds_numel", None) or w.numel())
    this.attention = base.attention = 2 * 2 * seq_len * width * layers
    return base, this
