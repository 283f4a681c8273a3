"""Tiny Hugging Face causal LMs built from configs (offline) and saved as model folders with a BPE tokenizer
trained on the test corpus: GPT-2 (Conv1D weights), Llama (GQA, gated MLP) and Mixtral (fused experts)."""

from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("gpt2", "llama", "mixtral")


def hf_config(kind: str, vocab: int, ctx: int = 64):
    from transformers import GPT2Config, LlamaConfig, MixtralConfig

    none = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=vocab, n_positions=ctx,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **none)
    if kind == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=ctx,
                           tie_word_embeddings=False, **none)
    if kind == "mixtral":
        return MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=ctx,
                             num_local_experts=4, num_experts_per_tok=2, **none)
    raise ValueError(kind)


def save_tiny(kind: str, out: Path, tokenizer, seed: int = 0, ctx: int = 64) -> Path:
    """A randomly initialised tiny model of `kind` (context `ctx`) saved to `out` with `tokenizer` (a dstlm
    TextTokenizer)."""
    from transformers import AutoModelForCausalLM

    from dstlm.hf.export import save_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind, tokenizer.vocab_size, ctx))
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out, ctx)
    return out


if __name__ == "__main__":  # python tests/helpers/hf_models.py KIND OUT FILE [FILE ...]
    import sys

    from dstlm.data.tokenizer import load_tokenizer

    save_tiny(sys.argv[1], Path(sys.argv[2]), load_tokenizer("bpe", sys.argv[3:], 512))
