"""Export of a LoRA run by its merge policy (`peft.merge`): folded into the sparse base, or written beside it as a
peft adapter folder; each verified against the adapter model's logits before the folder replaces the old one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from dstlm.hf.lora import merge, unload
from dstlm.hf.publish import ExportCheckError, export_hf_source, logits_of

MERGE_TOLERANCE = 1e-4
"""Largest |logit difference| allowed between a masked merge and the adapter model it folds (float rounding)."""


@torch.no_grad()
def export_adapter_run(loaded, checkpoint: Optional[str], out: Path) -> Path:
    """Export a peft run's checkpoint by its merge policy: `masked` / `post_mask` fold M * (s B A) into the base
    (the same zeros; `masked` must then give the adapter model's logits), `none` writes the sparse base plus
    `adapter/`, a peft adapter folder that must give the adapter model's logits once loaded onto the export."""
    model, policy = loaded.model, loaded.peft["merge"]
    ids = torch.arange(min(16, model.config.block_size or 16))[None, :]
    adapted = logits_of(model.hf, ids)
    if policy == "none":
        staged = out.with_name(out.name + ".adapter.partial")  # peft saves it from the adapted model, before unload
        if staged.exists():
            shutil.rmtree(staged)
        model.hf.save_pretrained(str(staged))
        unload(model)
        return export_hf_source(loaded, checkpoint, out, also=lambda d: _place_adapter(staged, d, ids, adapted))
    merge(model, masked=True)
    diff = float((logits_of(model.hf, ids) - adapted).abs().max())
    if policy == "masked" and diff > MERGE_TOLERANCE:
        raise ExportCheckError(f"export check: the masked merge changed the logits by {diff:.3g} (more than "
                               f"{MERGE_TOLERANCE}); the adapter was not trained through these masks")
    if policy == "post_mask":
        print(f"dstlm export: peft.merge=post_mask: masking the update at the merge moved the logits by up to "
              f"{diff:.3g} (the val loss of both: docs/hf-lora.md)")
    return export_hf_source(loaded, checkpoint, out)


def _place_adapter(staged: Path, folder: Path, ids: torch.Tensor, adapted: torch.Tensor) -> None:
    """`folder/adapter`: peft's own adapter folder; loaded onto the exported base it must give `adapted`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    staged.rename(folder / "adapter")
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    again = PeftModel.from_pretrained(base, str(folder / "adapter"))
    diff = float((logits_of(again, ids) - adapted).abs().max())
    if diff > MERGE_TOLERANCE:
        raise ExportCheckError(f"export check: the adapter loaded onto the exported base through peft changes the "
                               f"logits by {diff:.3g}")
