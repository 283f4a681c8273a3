"""`peft:` in a run config: LoRA (through the `peft` library) on a Hugging Face source, with a merge policy that
says what happens to the sparse base's zeros (typed config; imports no peft or transformers).

    merge: masked     the update is trained through the base weight's mask, W + M * (s B A), and merges with
                      exactly the base's zeros (as SQFT, Munoz et al. 2024)
    merge: post_mask  plain LoRA training; the update is masked when it is merged (its cost: docs/hf-lora.md)
    merge: none       plain LoRA, kept apart: the export is the sparse base plus a peft adapter folder

The base weights are frozen. Their mask is a sparsity section's one-shot step in the same run (its first masks),
else the masks a dstlm export carries (`dstlm prune`, `dstlm export`), else the source's own zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from dstlm.config_types import check_field_types

MERGE_POLICIES = ("masked", "post_mask", "none")


@dataclass
class PeftConfig:
    """LoRA adapters on a frozen (sparse) Hugging Face model."""

    method: Literal["lora"] = "lora"
    """The adapter type (LoRA; peft's LoraConfig)."""
    r: int = 8
    """Rank of each adapter (B: [out, r], A: [r, in])."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: Optional[Union[list[str], str]] = None
    """Modules that get an adapter: names or name suffixes (['q_proj', 'v_proj']), a regular expression (one
    string), or 'all-linear'. Unset: peft's default for the architecture (GPT-2: c_attn; Llama: q_proj, v_proj)."""
    merge: Literal["masked", "post_mask", "none"] = "masked"
    """What the export does with the adapter: masked (trained through the mask, merged with the base's zeros),
    post_mask (plain training, masked at the merge) or none (exported as a separate peft adapter)."""

    def __post_init__(self) -> None:
        check_field_types(self, "peft")
        if self.r < 1:
            raise ValueError(f"peft.r={self.r} must be a positive rank; e.g. peft.r: 8")
        if self.alpha <= 0:
            raise ValueError(f"peft.alpha={self.alpha} must be positive; e.g. peft.alpha: 16 (twice the rank)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"peft.dropout={self.dropout} must be in [0, 1); e.g. peft.dropout: 0.05")
        targets = self.target_modules
        if targets is not None and (not targets or (isinstance(targets, list) and not all(targets))):
            raise ValueError(f"peft.target_modules={targets!r} names no module; give names such as [q_proj, v_proj], "
                             f"'all-linear', or leave it unset for peft's default")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def describe(self) -> str:
        targets = self.target_modules if self.target_modules is not None else "peft's default"
        return (f"LoRA r={self.r} alpha={self.alpha:g} dropout={self.dropout:g} on {targets}, merge={self.merge}")
