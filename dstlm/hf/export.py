"""Export a dstlm GPT to a Hugging Face model directory (config, safetensors, tokenizer).

The GPT maps exactly onto existing architectures, so `AutoModelForCausalLM.from_pretrained(DIR)` gives
the same logits:
- RoPE models -> GPTNeoXForCausalLM (sequential residual, full rotary, rotate-half convention, tanh-GELU
  MLP, fused query_key_value laid out per head as [q_h; k_h; v_h]);
- learned positions -> GPT2LMHeadModel (Conv1D weights are [in, out], fused c_attn = [q | k | v]).
Biases and LayerNorm shifts the dstlm model does not have (bias=False) are exported as zeros. Sparse
weights are exported as dense tensors with exact zeros at pruned entries.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dstlm.hf.publish import save_tokenizer
from dstlm.hf.source import HFModelConfig
from dstlm.models.gpt import GPT


def _zeros_like_bias(linear: torch.nn.Linear, n: int) -> torch.Tensor:
    return linear.bias.detach().clone() if linear.bias is not None else torch.zeros(n)


def _ln(ln: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    w = ln.weight.detach().clone()
    b = ln.bias.detach().clone() if ln.bias is not None else torch.zeros_like(w)
    return w, b


def to_gpt_neox(model: GPT):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    c = model.config
    hs = c.n_embd // c.n_head
    cfg = GPTNeoXConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        intermediate_size=c.mlp_hidden, hidden_act="gelu_pytorch_tanh", max_position_embeddings=c.block_size,
        rotary_pct=1.0, rotary_emb_base=c.rope_base, layer_norm_eps=1e-5, use_parallel_residual=False,
        attention_bias=True, tie_word_embeddings=c.tie_embeddings, hidden_dropout=0.0, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, torch_dtype="float32",
    )
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": c.rope_base, "partial_rotary_factor": 1.0}
    hf = GPTNeoXForCausalLM(cfg).eval()
    sd: dict[str, torch.Tensor] = {"gpt_neox.embed_in.weight": model.wte.weight.detach()[: c.vocab_size].clone()}
    for i, blk in enumerate(model.blocks):
        p = f"gpt_neox.layers.{i}."
        a = blk.attn
        q, k, v = (m.weight.detach().view(c.n_head, hs, c.n_embd) for m in (a.q_proj, a.k_proj, a.v_proj))
        sd[p + "attention.query_key_value.weight"] = torch.cat([q, k, v], dim=1).reshape(3 * c.n_embd, c.n_embd)
        qb, kb, vb = (_zeros_like_bias(m, c.n_embd).view(c.n_head, hs) for m in (a.q_proj, a.k_proj, a.v_proj))
        sd[p + "attention.query_key_value.bias"] = torch.cat([qb, kb, vb], dim=1).reshape(-1)
        sd[p + "attention.dense.weight"] = a.out_proj.weight.detach().clone()
        sd[p + "attention.dense.bias"] = _zeros_like_bias(a.out_proj, c.n_embd)
        sd[p + "mlp.dense_h_to_4h.weight"] = blk.mlp.fc_in.weight.detach().clone()
        sd[p + "mlp.dense_h_to_4h.bias"] = _zeros_like_bias(blk.mlp.fc_in, c.mlp_hidden)
        sd[p + "mlp.dense_4h_to_h.weight"] = blk.mlp.fc_out.weight.detach().clone()
        sd[p + "mlp.dense_4h_to_h.bias"] = _zeros_like_bias(blk.mlp.fc_out, c.n_embd)
        sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"] = _ln(blk.ln_1)
        sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"] = _ln(blk.ln_2)
    sd["gpt_neox.final_layer_norm.weight"], sd["gpt_neox.final_layer_norm.bias"] = _ln(model.ln_f)
    sd["lm_head.weight"] = model.lm_head.weight.detach()[: c.vocab_size].clone()
    _load(hf, sd)
    return hf


def to_gpt2(model: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    cfg = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.mlp_hidden, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None,
    )
    hf = GPT2LMHeadModel(cfg).eval()
    sd: dict[str, torch.Tensor] = {"transformer.wte.weight": model.wte.weight.detach()[: c.vocab_size].clone(),
                                   "transformer.wpe.weight": model.wpe.weight.detach().clone()}
    for i, blk in enumerate(model.blocks):
        p = f"transformer.h.{i}."
        a = blk.attn
        sd[p + "attn.c_attn.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().T.clone()
        sd[p + "attn.c_attn.bias"] = torch.cat([_zeros_like_bias(m, c.n_embd) for m in (a.q_proj, a.k_proj, a.v_proj)])
        sd[p + "attn.c_proj.weight"] = a.out_proj.weight.detach().T.clone()
        sd[p + "attn.c_proj.bias"] = _zeros_like_bias(a.out_proj, c.n_embd)
        sd[p + "mlp.c_fc.weight"] = blk.mlp.fc_in.weight.detach().T.clone()
        sd[p + "mlp.c_fc.bias"] = _zeros_like_bias(blk.mlp.fc_in, c.mlp_hidden)
        sd[p + "mlp.c_proj.weight"] = blk.mlp.fc_out.weight.detach().T.clone()
        sd[p + "mlp.c_proj.bias"] = _zeros_like_bias(blk.mlp.fc_out, c.n_embd)
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = _ln(blk.ln_1)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = _ln(blk.ln_2)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = _ln(model.ln_f)
    sd["lm_head.weight"] = model.lm_head.weight.detach()[: c.vocab_size].clone()
    _load(hf, sd)
    return hf


def _load(hf, sd: dict[str, torch.Tensor]) -> None:
    own = hf.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith(".attn.bias") and not k.endswith(".masked_bias")]
    missing = [k for k in missing if not (hf.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise RuntimeError(f"export mapping misses HF weights: {missing[:4]}")
    hf.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=False)


def to_hf(model: GPT):
    """The equivalent transformers model (GPTNeoX for RoPE, GPT-2 for learned positions)."""
    return to_gpt_neox(model) if model.config.pos_emb == "rope" else to_gpt2(model)


def export(checkpoint: str, out_dir: str) -> Path:
    """Write a Hugging Face model directory for a dstlm checkpoint; returns the directory."""
    from dstlm.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    if isinstance(loaded.config, HFModelConfig) and loaded.peft:  # merged by its policy, or beside the base
        from dstlm.hf.lora_export import export_adapter_run

        return export_adapter_run(loaded, checkpoint, Path(out_dir))
    if isinstance(loaded.config, HFModelConfig):  # back to the model's own architecture, masks and card
        from dstlm.hf.publish import export_hf_source

        return export_hf_source(loaded, checkpoint, Path(out_dir))
    if loaded.config.moe is not None:
        raise ValueError(f"{checkpoint!r} is a Mixture-of-Experts model; no Hugging Face architecture computes its "
                         f"GELU experts with capacity-limited routing, so it is not exported: score it with "
                         f"`dstlm eval {checkpoint}` instead")
    from dstlm.sparse.condensed import CondensedLinear

    if any(isinstance(m, CondensedLinear) for m in loaded.model.modules()):
        raise ValueError(f"{checkpoint!r} holds condensed layers (written by `dstlm export --condensed`); export the "
                         f"training checkpoint it came from instead")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from dstlm.transforms.ift import fold_to_dense

    hf = to_hf(fold_to_dense(loaded.model))  # Sparse-IFT layers folded into the dense layers they compute
    hf.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(loaded.tokenizer, out, loaded.config.block_size)
    return out
