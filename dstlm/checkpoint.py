"""Load a trained dstlm model (and its tokenizer) from a checkpoint, without Lightning or the run config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from dstlm.data.tokenizer import EOS, TextTokenizer, tokenizer_from_json
from dstlm.safe_load import load_states, unsafe_globals
from dstlm.hf.source import HFModelConfig
from dstlm.build import build_model, model_transforms
from dstlm.models.gpt import GPTConfig
from dstlm.models.moe import without_placement
from dstlm.sparse.condensed import CondensedLinear, condense, condensed_layouts, rebuild_condensed
from dstlm.sparse.fragments import expected_files, saved_files, whole_masks_from
from dstlm.transforms.ift import SparseIFTConfig


@dataclass
class LoadedModel:
    model: nn.Module
    """dstlm's GPT, or an HFCausalLM for a Hugging Face model source"""
    tokenizer: TextTokenizer
    config: Union[GPTConfig, HFModelConfig]
    sparsity: Optional[dict]
    step: int
    path: str
    peft: Optional[dict] = None
    """The run's peft config (a LoRA run: `model.hf` is the peft model, its adapter not merged)."""


SPARSITY_IDENTITY = ("method", "sparsity", "distribution", "include", "exclude", "n", "m")
"""Sparsity fields that decide which weights are sparse and how many: a resume must keep them."""


def check_resume_compatible(saved: dict, model: Optional[GPTConfig] = None, sparsity: Optional[dict] = None,
                            ift: Optional[dict] = None, check_sparsity: bool = True, what: str = "checkpoint") -> None:
    """Refuse, in one line naming the first differing field, a checkpoint whose hyper-parameters (`saved`: its
    model / sparsity / ift dicts) do not fit this run's model config, sparsity and Sparse-IFT (as dicts). Where
    an expert is computed (model.moe.expert_parallel_size) does not change the weights and is not compared."""
    if model is not None and "model" in saved:
        for k, now in dataclasses.asdict(model).items():
            if k in saved["model"] and without_placement(saved["model"][k]) != without_placement(now):
                raise ValueError(f"{what} model.{k}={saved['model'][k]!r} but this run has model.{k}={now!r}; "
                                 f"use the checkpoint's model config")
    if not check_sparsity:
        return
    if saved.get("ift") != ift:
        raise ValueError(f"{what} has ift={saved.get('ift')!r} but this run has ift={ift!r}; resume with the same "
                         f"Sparse-IFT config")
    old = saved.get("sparsity")
    if "sparsity" in saved and (old is None) != (sparsity is None):
        kind = {True: "dense", False: "sparse"}
        raise ValueError(f"{what} is {kind[old is None]}{'' if old is None else ' (' + old['method'] + ')'} but this "
                         f"run is {kind[sparsity is None]}{'' if sparsity is None else ' (' + sparsity['method'] + ')'}"
                         f"; resume with the same sparsity config")
    if old and sparsity:
        for k in SPARSITY_IDENTITY:
            if _identity(k, old.get(k)) != _identity(k, sparsity.get(k)):
                raise ValueError(f"{what} was trained with sparsity.{k}={old.get(k)!r}, this run has "
                                 f"sparsity.{k}={sparsity.get(k)!r}; resume with the same sparsity config")


def _identity(key: str, value):
    """A sparsity field as resumes compare it: an unset include is the model's default, which checkpoints
    from before it could be unset wrote out as ["blocks.*"] (GPT names; other models have none such)."""
    return ["blocks.*"] if key == "include" and value is None else value


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A Lightning DeepSpeed checkpoint: a directory holding DeepSpeed's tag folder `checkpoint/`."""
    tag = Path(path) / "checkpoint"
    return tag.is_dir() and any(tag.glob("*model_states.pt"))


def checkpoint_problem(path: str | Path) -> Optional[str]:
    """What is wrong with a checkpoint (a .ckpt file or a DeepSpeed directory), or None when it looks whole:
    every file a readable zip archive (torch.save's format: a truncated copy loses the archive's directory at
    the end) and, for DeepSpeed ZeRO-1/2/3, one optimizer-state file per rank 0..W-1. Reads archive
    directories, not tensors."""
    import re
    import zipfile

    p = Path(path)
    if p.is_file():
        files = [p]
    elif is_deepspeed_checkpoint(p):
        files = sorted((p / "checkpoint").glob("*.pt"))
        ranks = sorted(int(m.group(1)) for f in files if (m := re.search(r"zero_pp_rank_(\d+)_.*optim_states", f.name)))
        if ranks and ranks != list(range(len(ranks))):  # (ZeRO-0 keeps its optimizer in the model states)
            missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
            return f"the optimizer states of rank(s) {missing} are missing"
        masks = sorted(int(m.group(1)) for f in files if (m := re.search(r"dstlm_masks_rank_(\d+)\.pt$", f.name)))
        # partitioned masks: one file per rank, as many as rank 0 recorded (checkpoints before the marker: as
        # many as optimizer partitions)
        world = expected_files(p / "checkpoint") or (max(len(ranks), 1) if masks else None)
        if world is not None and masks != list(range(world)):
            missing = sorted(set(range(world)) - set(masks))
            return f"the mask fragments of rank(s) {missing or masks} are missing or extra"
    else:
        return "it is neither a .ckpt file nor a DeepSpeed checkpoint directory"
    for f in files:
        if f.stat().st_size == 0:
            return f"{os.path.basename(os.path.realpath(f))} is empty"
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{os.path.basename(os.path.realpath(f))} is truncated or corrupt ({e})"
        try:
            unsafe = unsafe_globals(f)
        except Exception as e:  # noqa: BLE001 (a pickle that cannot even be scanned)
            return f"{os.path.basename(os.path.realpath(f))} is not a torch checkpoint ({e})"
        if unsafe:
            return (f"{os.path.basename(os.path.realpath(f))} needs {', '.join(unsafe[:3])} to unpickle, which dstlm "
                    f"does not load (unpickling can run code); load it yourself if you trust its source")
    return None


def newest_readable(ckpt_dir: Path, first: Path) -> tuple[Optional[Path], list[str]]:
    """`first` (usually last.ckpt) if it is whole, else the newest whole step checkpoint of `ckpt_dir`; and a
    line per checkpoint passed over, saying why."""
    skipped = []
    candidates = [first] + sorted((c for c in ckpt_dir.glob("step*.ckpt")
                                   if c.resolve() != first.resolve()), key=lambda c: c.name, reverse=True)
    for c in candidates:
        problem = checkpoint_problem(c)
        if problem is None:
            return c, skipped
        skipped.append(f"{c} ({os.path.realpath(c)}) is unreadable: {problem}")
    return None, skipped


def resolve_checkpoint(path: str | Path) -> Path:
    """A .ckpt file, a DeepSpeed checkpoint directory, or a run folder (-> its last checkpoint)."""
    p = Path(path)
    if p.is_dir() and not is_deepspeed_checkpoint(p):
        last = p / "checkpoints" / "last.ckpt" if (p / "checkpoints").is_dir() else p / "last.ckpt"
        if not (last.is_file() or is_deepspeed_checkpoint(last)):
            raise FileNotFoundError(f"checkpoint directory {str(p)!r} has no last.ckpt; pass a .ckpt file")
        p = last
    if not (p.is_file() or is_deepspeed_checkpoint(p)):
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return p


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint as one dict (Lightning's layout: state_dict, hyper_parameters, global_step, callbacks...).

    A DeepSpeed ZeRO checkpoint directory (stages 1-3, any world size) is consolidated to fp32 on the fly:
    weights from the sharded optimizer states, everything else from rank 0's client state.
    """
    p = resolve_checkpoint(path)
    problem = checkpoint_problem(p)
    if problem is not None:
        raise ValueError(f"checkpoint {p} is unreadable: {problem}")
    if p.is_file():
        return torch.load(p, map_location="cpu", weights_only=True)
    from dstlm.paths import prepare_deepspeed_env

    prepare_deepspeed_env(cpu=not torch.cuda.is_available())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = p / "checkpoint"
    states = sorted(tag.glob("*mp_rank_00_model_states.pt"))  # ZeRO-1/2: mp_rank_00_..., ZeRO-3: zero_pp_rank_0_...
    ckpt = load_states(states[0])  # DeepSpeed's own reader below unpickles freely: checkpoint_problem vetted it
    ckpt = {k: v for k, v in ckpt.items() if k not in ("module", "optimizer", "lr_scheduler")}
    ckpt["state_dict"] = dict(get_fp32_state_dict_from_zero_checkpoint(str(p), tag="checkpoint"))
    if saved_files(tag):  # masks partitioned across the ranks (sparsity.partition_masks): joined whole
        ckpt["state_dict"].update({f"model.{k}_mask": m for k, m in whole_masks_from(tag).items()})
    return ckpt


def consolidate_checkpoint(path: str | Path, out_file: str | Path) -> Path:
    """Write a DeepSpeed ZeRO checkpoint (or any checkpoint) as one Lightning .ckpt file, atomically."""
    ckpt = read_checkpoint(path)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)
    return out


def load_checkpoint(path: str | Path, expect: Optional[GPTConfig] = None) -> LoadedModel:
    """Model (eval mode, fp32, CPU) + tokenizer from a checkpoint written by `dstlm fit`: a Lightning .ckpt,
    a DeepSpeed checkpoint directory (consolidated on the fly) or a run folder (its last checkpoint).

    Mask buffers are kept as plain weights' zeros (pruned entries are exactly 0 in the saved weights).
    `expect`: a model config the checkpoint must match (refused with the first differing field).
    """
    p = resolve_checkpoint(path)
    ckpt = read_checkpoint(p)
    hp = ckpt.get("hyper_parameters", {})
    if "model" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"{str(p)!r} is not a dstlm checkpoint (no model config inside); train it with `dstlm fit`")
    extra = ckpt.get("dstlm") or {}
    if "hf" in hp["model"]:  # a Hugging Face model source: rebuilt from the architecture the checkpoint carries
        cfg = HFModelConfig(**hp["model"])
        if "hf_config" not in extra:
            raise ValueError(f"checkpoint {str(p)!r} of the Hugging Face model {cfg.hf!r} carries no architecture; "
                             f"re-save it with this dstlm version")
        if hp.get("peft"):  # the adapter only: the frozen base comes from its folder
            from dstlm.hf.lora import load_adapter

            model = load_adapter(cfg, hp["peft"], extra, ckpt["state_dict"], str(p))
            return _loaded(model, ckpt, cfg, hp, str(p))
        model = build_model(cfg, hf_config=extra["hf_config"], weights=False)
    else:
        known = {f.name for f in dataclasses.fields(GPTConfig)}
        cfg = GPTConfig(**{k: v for k, v in hp["model"].items() if k in known})
        if expect is not None:
            check_resume_compatible({"model": dataclasses.asdict(cfg)}, expect, check_sparsity=False)
        ift = SparseIFTConfig(**hp["ift"]) if hp.get("ift") else None
        model = build_model(cfg, model_transforms(cfg, ift))  # the same (Sparse-IFT) structure as in training
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if extra.get("condensed"):  # written by `dstlm export --condensed`: those layers are stored condensed
        rebuild_condensed(model, extra["condensed"], state)
    masks = {k: v for k, v in state.items() if k.endswith("_mask")}
    weights = {k: v for k, v in state.items() if not k.endswith("_mask")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (getattr(cfg, "tie_embeddings", False) and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit model config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, mask in masks.items():  # keep masks visible on the loaded model (for reports / exports)
        module_name, attr = name.rsplit(".", 1)
        model.get_submodule(module_name).register_buffer(attr, mask.clone(), persistent=False)
    return _loaded(model, ckpt, cfg, hp, str(p))


def _loaded(model: nn.Module, ckpt: dict, cfg, hp: dict, path: str) -> LoadedModel:
    """The LoadedModel of a checkpoint whose model is built and loaded: its tokenizer read, eval mode."""
    extra = ckpt.get("dstlm") or {}
    tok_json = extra.get("tokenizer")
    if not tok_json:
        raise ValueError(f"checkpoint {path!r} carries no tokenizer; re-save it with this dstlm version")
    tokenizer = tokenizer_from_json(tok_json, name=path, eos=extra.get("eos") or EOS,
                                    chat_template=extra.get("chat_template"),
                                    special_tokens=extra.get("special_tokens"))
    model.eval()
    return LoadedModel(model, tokenizer, cfg, hp.get("sparsity"), int(ckpt.get("global_step", 0)), path,
                       hp.get("peft"))


def export_condensed(path: str | Path, out_dir: str | Path) -> tuple[Path, dict[str, str]]:
    """Write `out_dir/model.ckpt`: the checkpoint's model for inference, its constant-fan-in layers stored
    condensed (weights and indices of active entries only; `dstlm eval --checkpoint` reads it like any
    checkpoint). Returns the file and what happened to each masked layer."""
    loaded = load_checkpoint(path)
    outcome = condense(loaded.model)
    if not any(v.startswith("condensed") for v in outcome.values()):
        why = "; ".join(f"{k}: {v}" for k, v in list(outcome.items())[:2]) or "it has no masks (a dense run)"
        raise ValueError(f"nothing in {loaded.path!r} can be condensed ({why}); train with sparsity.method: srigl "
                         f"(constant fan-in) or nm")
    ckpt = read_checkpoint(path)
    state = {f"model.{k}": v for k, v in loaded.model.state_dict().items()}
    for name, module in loaded.model.named_modules():  # masks of the layers kept dense travel with them
        if getattr(module, "weight_mask", None) is not None and not isinstance(module, CondensedLinear):
            state[f"model.{name}.weight_mask"] = module.weight_mask
    slim = {"hyper_parameters": ckpt.get("hyper_parameters", {}), "global_step": ckpt.get("global_step", 0),
            "state_dict": state, "dstlm": {**(ckpt.get("dstlm") or {}), "condensed": condensed_layouts(loaded.model)}}
    out = Path(out_dir) / "model.ckpt"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(slim, tmp)
    tmp.replace(out)
    return out, outcome
