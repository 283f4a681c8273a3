"""Load a trained dstlm model (and its tokenizer) from a checkpoint, without Lightning or the run config."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from dstlm.data.tokenizer import TextTokenizer, tokenizer_from_json
from dstlm.models.gpt import GPT, GPTConfig


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: TextTokenizer
    config: GPTConfig
    sparsity: Optional[dict]
    step: int
    path: str


def load_checkpoint(path: str | Path, expect: Optional[GPTConfig] = None) -> LoadedModel:
    """Model (eval mode, fp32, CPU) + tokenizer from a Lightning .ckpt written by `dstlm fit`.

    Mask buffers are kept as plain weights' zeros (pruned entries are exactly 0 in the saved weights).
    `expect`: a model config the checkpoint must match (refused with the first differing field).
    """
    p = Path(path)
    if p.is_dir():
        last = p / "checkpoints" / "last.ckpt" if (p / "checkpoints").is_dir() else p / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"checkpoint directory {str(p)!r} has no last.ckpt; pass a .ckpt file")
        p = last
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    if "model" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"{str(p)!r} is not a dstlm checkpoint (no model config inside); train it with `dstlm fit`")
    known = {f.name for f in fields(GPTConfig)}
    cfg = GPTConfig(**{k: v for k, v in hp["model"].items() if k in known})
    if expect is not None:
        for f in fields(GPTConfig):
            if getattr(expect, f.name) != getattr(cfg, f.name):
                raise ValueError(f"checkpoint model.{f.name}={getattr(cfg, f.name)!r} does not match the requested "
                                 f"model.{f.name}={getattr(expect, f.name)!r}")
    tok_json = (ckpt.get("dstlm") or {}).get("tokenizer")
    if not tok_json:
        raise ValueError(f"checkpoint {str(p)!r} carries no tokenizer; re-save it with this dstlm version")
    tokenizer = tokenizer_from_json(tok_json, name=str(p))
    model = GPT(cfg)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    masks = {k: v for k, v in state.items() if k.endswith("_mask")}
    weights = {k: v for k, v in state.items() if not k.endswith("_mask")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit model config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, mask in masks.items():  # keep masks visible on the loaded model (for reports / exports)
        module_name, attr = name.rsplit(".", 1)
        model.get_submodule(module_name).register_buffer(attr, mask.clone(), persistent=False)
    model.eval()
    return LoadedModel(model, tokenizer, cfg, hp.get("sparsity"), int(ckpt.get("global_step", 0)), str(p))
