"""`model: {hf: DIR}`: a Hugging Face causal LM as the model source (typed config; imports no transformers).

The directory is what `save_pretrained` writes (config.json, weights, tokenizer files); a hub name works only
when the machine is online and HF_HUB_OFFLINE is unset. The offline directory is the tested path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from dstlm.config_types import check_field_types

MASKS_FILE = "sparsity_masks.safetensors"
"""Sidecar of an exported sparse model: its masks, bit-packed, so sparse fine-tuning resumes from the export."""


@dataclass
class HFModelConfig:
    """A Hugging Face causal LM loaded with AutoModelForCausalLM."""

    hf: str = ""
    """A local model directory (config.json + weights), or a hub name when online (required; the empty
    default only lets the command line set it in any order with the other fields)."""
    block_size: Optional[int] = None
    """Longest sequence trained on (data.block_size must not exceed it). Unset: the model's own context length
    (max_position_embeddings / n_positions)."""
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"
    """Attention kernel transformers uses."""
    from_config: bool = False
    """Build the architecture of `hf` with freshly initialised weights instead of loading its weights (tests,
    pretraining an HF architecture)."""

    def __post_init__(self) -> None:
        check_field_types(self, "model")
        if not isinstance(self.hf, str) or not self.hf:
            raise ValueError(f"model.hf={self.hf!r} must name a Hugging Face model directory (or a hub name)")
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"model.block_size={self.block_size} must be positive")
        ctx = self.context_length()
        if self.block_size is None:
            self.block_size = ctx
        elif ctx is not None and self.block_size > ctx:
            raise ValueError(f"model.block_size={self.block_size} exceeds the context length {ctx} of {self.hf!r}; "
                             f"use model.block_size <= {ctx}")

    @property
    def local(self) -> Optional[Path]:
        p = Path(self.hf)
        return p if p.is_dir() else None

    def raw_config(self) -> Optional[dict]:
        """config.json of a local directory (None for a hub name)."""
        if self.local is None:
            return None
        path = self.local / "config.json"
        if not path.is_file():
            raise ValueError(f"model.hf={self.hf!r} has no config.json; it is not a Hugging Face model directory "
                             f"(give the folder save_pretrained wrote)")
        return json.loads(path.read_text())

    def context_length(self) -> Optional[int]:
        raw = self.raw_config() or {}
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            if isinstance(raw.get(key), int):
                return raw[key]
        return None

    @property
    def vocab_size(self) -> Optional[int]:
        raw = self.raw_config() or {}
        return raw.get("vocab_size")

    @property
    def moe(self) -> None:
        """dstlm's own MoE options do not apply (an HF MoE routes with its own code)."""
        return None


def is_hf_source(source) -> bool:
    return isinstance(source, HFModelConfig)
