"""One-shot pruning of a Hugging Face model: the run's first masks (magnitude, Wanda, N:M) without training,
exported as a plain HF folder (`dstlm prune`). The masks are decided by the same code path `dstlm fit` takes at
step 0 (same engine, same calibration batches for Wanda), so a one-shot model is exactly where fine-tuning
from it would start."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dstlm.hf.source import HFModelConfig


def one_shot(cfg, out: str) -> Path:
    """Masks of `cfg` (a RunConfig with an HF model source and a sparsity config) applied to the pretrained
    weights and exported to `out`; returns the folder."""
    from dstlm.checkpoint import LoadedModel
    from dstlm.hf.publish import export_hf_source
    from dstlm.training.assembly.build import build

    if not isinstance(cfg.model, HFModelConfig):
        raise ValueError("dstlm prune works on a Hugging Face model source; set model.hf to a model folder")
    if cfg.sparsity is None:
        raise ValueError("dstlm prune needs a sparsity config (e.g. --sparsity configs/sparsity/static.yaml "
                         "--sparsity.mask_init wanda)")
    _, module, data = build(cfg, logger=False)
    data.prepare_data()
    data.setup("fit")
    module.configure_model()
    loaded = LoadedModel(module.model, data.tokenizer, cfg.model, dataclasses.asdict(module.effective_sparsity), 0,
                         "one-shot")
    return export_hf_source(loaded, None, Path(out))
