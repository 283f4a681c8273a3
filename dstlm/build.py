"""The one way to build a model: `build_model(source, transforms)`, used by training, checkpoint loading,
evaluation, export and FLOP counts alike, so every rank and every reader rebuilds the same structure.

    source      what to build: a GPTConfig (dstlm's GPT / MoE) or an HFModelConfig (a Hugging Face causal LM,
                dstlm/hf/model.py: loaded with its pretrained weights, or its architecture freshly initialised)
    transforms  converters applied around the build (dstlm/transforms): config rewrites before it, module
                swaps after it; the model is initialised once, after all of them

The model packages know nothing of transforms or sparsity; this module is where they meet.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from dstlm.hf.source import HFModelConfig
from dstlm.models.gpt import GPT, GPTConfig
from dstlm.transforms import ModelTransform
from dstlm.transforms.ift import SparseIFT, SparseIFTConfig


ModelSource = Union[GPTConfig, HFModelConfig]


def check_transformable(source: ModelSource, ift: Optional[SparseIFTConfig]) -> None:
    """Refuse a transform the source cannot take (Sparse-IFT rewrites dstlm's own GPT layers)."""
    if ift is not None and isinstance(source, HFModelConfig):
        raise ValueError(f"ift.family={ift.family!r} rewrites dstlm's GPT layers and cannot transform the Hugging Face "
                         f"model {source.hf!r}; drop ift (DST methods work on HF models) or use a dstlm model")


def model_transforms(source: ModelSource, ift: Optional[SparseIFTConfig] = None) -> list[ModelTransform]:
    """The transforms a run config asks for, in the order they apply."""
    check_transformable(source, ift)
    return [SparseIFT(ift, source)] if ift is not None else []


def build_model(source: ModelSource, transforms: Sequence[ModelTransform] = (), hf_config: Optional[dict] = None,
                weights: bool = True, partitioned=None):
    """Build, transform and initialise. The random draws are those of building the transformed model directly
    (construction of every module in model order, then one reset_parameters), so seeded runs are unchanged by
    where a transform lives. A Hugging Face source is loaded (its weights unless `weights` is False; from the
    config a checkpoint carries, `hf_config`, when given; slice by slice under a partitioned build,
    `partitioned`: dstlm/training/zero/partitioned_build.py)."""
    if isinstance(source, HFModelConfig):
        from dstlm.hf.model import load_hf_model

        return load_hf_model(source, hf_config, weights, partitioned)
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
