"""The one way to build a model: `build_model(source, transforms)`, used by training, checkpoint loading,
evaluation, export and FLOP counts alike, so every rank and every reader rebuilds the same structure.

    source      what to build: a GPTConfig (dstlm's GPT / MoE); further sources (Hugging Face) plug in here
    transforms  converters applied around the build (dstlm/transforms): config rewrites before it, module
                swaps after it; the model is initialised once, after all of them

The model packages know nothing of transforms or sparsity; this module is where they meet.
"""

from __future__ import annotations

from typing import Optional, Sequence

from dstlm.models.gpt import GPT, GPTConfig
from dstlm.transforms import ModelTransform
from dstlm.transforms.ift import SparseIFT, SparseIFTConfig


def model_transforms(source: GPTConfig, ift: Optional[SparseIFTConfig] = None) -> list[ModelTransform]:
    """The transforms a run config asks for, in the order they apply."""
    return [SparseIFT(ift, source)] if ift is not None else []


def build_model(source: GPTConfig, transforms: Sequence[ModelTransform] = ()) -> GPT:
    """Build, transform and initialise. The random draws are those of building the transformed model directly
    (construction of every module in model order, then one reset_parameters), so seeded runs are unchanged by
    where a transform lives."""
    if not isinstance(source, GPTConfig):
        raise TypeError(f"model source {source!r} is not supported; give a GPTConfig (model: in the run config)")
    cfg = source
    for t in transforms:
        cfg = t.transform_config(cfg)
    model = GPT(cfg, init=False)
    for t in transforms:
        t.transform_model(model)
    model.reset_parameters()
    return model
