"""LoRA (peft) on a frozen sparse Hugging Face model, and a merge that keeps its zeros.

peft adds the adapters (`get_peft_model`: every base weight frozen, B initialised to zero) and saves them in its own
folder format. What dstlm adds:
- the base mask of every sparse weight as a `<weight>_mask` buffer on its module: the run's one-shot first masks,
  the masks file of a dstlm export, or the source's own zeros (`base_masks`);
- `MaskedLoRA`, a peft LoRA variant whose forward, merge and unmerge use M * (s B A) instead of s B A, so the
  adapter is trained through the mask and merges into exactly the base's zeros (peft.merge: masked). For
  peft.merge: post_mask the adapter trains plain and the variant is set only for the merge;
- small checkpoints: the adapter weights only, with the base masks bit-packed and a fingerprint of the base, so a
  resume or an export rebuilds the base from the source folder and refuses one that changed (`base_record`).

Cost of `masked` training: each adapted layer forms its [out, in] update M * (s B A) every forward and keeps it for
the backward (the memory of one dense gradient of that weight), where plain LoRA multiplies by A and B only.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils import transpose

from dstlm.hf.model import HFCausalLM, mask_buffers, register_packed_mask
from dstlm.hf.peft_config import PeftConfig

ADAPTER = "default"
"""peft's adapter name: one adapter per run."""


def base_mask(layer: LoraLayer):
    """The bool mask of the adapted weight (its storage layout), or None for a dense weight."""
    return getattr(layer.get_base_layer(), "weight_mask", None)


def masked_delta(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """M * (s B A) in the base weight's storage layout ([in, out] for GPT-2's Conv1D)."""
    delta = layer.get_delta_weight(adapter)
    mask = base_mask(layer)
    return delta if mask is None else delta * mask


class MaskedLoRA(LoraVariant):
    """W x + (M * s B A) x: the update passes through the base weight's mask (SQFT)."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs) -> None:
        pass

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        weight = transpose(masked_delta(module, active_adapter), module.fan_in_fan_out)
        return result + F.linear(module.lora_dropout[active_adapter](x), weight.to(x.dtype))


# -- the base and its masks ------------------------------------------------------------------------------
def base_masks(model: HFCausalLM) -> tuple[dict[str, torch.Tensor], str]:
    """{weight name: bool mask} of every sparse weight of the (not yet adapted) model, and where they came from.
    Masks already on the modules (a sparsity section's first masks, an export's masks file) are used as they are;
    otherwise every sparsifiable weight with zeros gets the mask of its non-zeros."""
    found = mask_buffers(model)
    if found:
        return found, "kept from the model" if _kept(model) else "the sparsity section's first masks"
    for row, _ in model._classify():
        if row.sparse:
            module_name, attr = row.name.rsplit(".", 1)
            module = model.hf.get_submodule(module_name)
            weight = getattr(module, attr)
            if bool((weight == 0).any()):
                module.register_buffer(f"{attr}_mask", weight.detach() != 0, persistent=True)
    return mask_buffers(model), "the source's zeros"


def _kept(model: HFCausalLM) -> bool:
    return any(getattr(m, "dstlm_keep_mask", False) for m in model.hf.modules())


def base_record(masks: dict[str, torch.Tensor], prints: dict[str, list[float]]) -> dict:
    """What a checkpoint keeps of the frozen base: its masks bit-packed, and the fingerprint of every base weight
    (`fingerprint`), which a resume or an export compares with the base it rebuilds."""
    from dstlm.sparse.bits import pack_mask

    return {"masks": {n: pack_mask(m) for n, m in masks.items()}, "fingerprint": prints}


@torch.no_grad()
def fingerprint(model: HFCausalLM) -> dict[str, list[float]]:
    """{base weight name: [float64 sum, sum of squares]} of every frozen weight (computed once: the base never
    changes during a run)."""
    out = {}
    for name, p in model.hf.named_parameters():
        if not p.requires_grad and ".lora_" not in name:
            w = p.detach().double()
            out[base_name(name)] = [float(w.sum()), float((w * w).sum())]
    return out


def base_name(name: str) -> str:
    """The base model's own name of a parameter of the adapted model (peft's prefix and `.base_layer` dropped)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def check_base(now: dict[str, list[float]], record: dict, source: str, where: str) -> None:
    """Refuse, in one line, a rebuilt base (fingerprint `now`) whose weights or masks are not those the adapter
    was trained on (`record`: `base_record`'s)."""
    for name, (total, squares) in record["fingerprint"].items():
        got = now.get(name)
        if got is None or abs(got[0] - total) > 1e-6 * (1 + abs(total)) or abs(got[1] - squares) > 1e-6 * (1 + squares):
            raise ValueError(f"{where}: the base weight {name} differs from the one its adapter was trained on; the "
                             f"model folder {source!r} changed since: restore it, or train the adapter again")


def restore_masks(model: HFCausalLM, record: dict) -> None:
    """The recorded masks on the (not yet adapted) model's modules, its weights zeroed off them."""
    with torch.no_grad():
        for name, packed in record["masks"].items():
            module, mask = register_packed_mask(model, name, packed)
            getattr(module, name.rsplit(".", 1)[1]).mul_(mask)


# -- adapters ----------------------------------------------------------------------------------------------
def default_targets(model: HFCausalLM, cfg: PeftConfig):
    if cfg.target_modules is not None:
        return cfg.target_modules
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    kind = model.hf.config.model_type
    if kind not in DEFAULTS:
        raise ValueError(f"peft.target_modules is unset and peft has no default for {kind!r} models; name the modules "
                         f"to adapt, e.g. peft.target_modules: [q_proj, v_proj] or 'all-linear'")
    return list(DEFAULTS[kind])


def add_adapters(model: HFCausalLM, cfg: PeftConfig, masked: bool) -> None:
    """Wrap `model.hf` in a peft model with one LoRA adapter (base frozen); with `masked`, trained through the
    base masks. One line for a target that matches nothing, is no linear layer, or is narrower than the rank."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = default_targets(model, cfg)
    conv1d = any(isinstance(m, Conv1D) for m in model.hf.modules())
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none",
                        fan_in_fan_out=conv1d)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's fan_in_fan_out notices for mixed Linear / Conv1D models
            model.hf = get_peft_model(model.hf, config)
    except ValueError as e:
        odd = _unsupported(model, config)
        why = (f"matches {odd[0]} ({odd[1]}), which LoRA here does not adapt (linear and GPT-2 Conv1D layers only; "
               f"fused experts are not)") if odd else str(e).splitlines()[0]
        raise ValueError(f"peft.target_modules={targets!r}: {why} (in {model.config.hf!r}); name linear layers, "
                         f"e.g. {_linear_examples(model)}") from None
    for name, layer in lora_layers(model):
        _check_layer(name, layer, cfg, targets, model)
        if masked:
            layer.lora_variant[ADAPTER] = MaskedLoRA()


def _unsupported(model: HFCausalLM, config) -> Optional[tuple[str, str]]:
    """The first module the targets match that is no linear layer: (name, type)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    for name, module in model.hf.named_modules():
        if name and check_target_module_exists(config, name) and not isinstance(module, (torch.nn.Linear, Conv1D)):
            return name, type(module).__name__
    return None


def _check_layer(name: str, layer: LoraLayer, cfg: PeftConfig, targets, model: HFCausalLM) -> None:
    from transformers.pytorch_utils import Conv1D

    base = layer.get_base_layer()
    if not isinstance(base, (torch.nn.Linear, Conv1D)):
        raise ValueError(f"peft.target_modules={targets!r} matches {base_name(name)} ({type(base).__name__}), which "
                         f"LoRA here does not adapt (linear and GPT-2 Conv1D layers only; fused experts are not); "
                         f"name linear layers, e.g. {_linear_examples(model)}")
    narrow = min(layer.in_features, layer.out_features)
    if cfg.r > narrow:
        raise ValueError(f"peft.r={cfg.r} exceeds the smaller dimension of {base_name(name)} ({layer.in_features} in, "
                         f"{layer.out_features} out); use peft.r <= {narrow}")


def _linear_examples(model: HFCausalLM) -> str:
    from transformers.pytorch_utils import Conv1D

    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.hf.named_modules()
                    if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not model.hf.get_output_embeddings()})
    return "[" + ", ".join(names[:4]) + "]"


def lora_layers(model: HFCausalLM) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in model.hf.named_modules() if isinstance(m, LoraLayer)]


def prepare(model: HFCausalLM, cfg: PeftConfig) -> tuple[dict[str, torch.Tensor], str]:
    """The base masks (see `base_masks`), then the adapters; refuses `masked` on a base without zeros."""
    masks, origin = base_masks(model)
    if not masks and cfg.merge in ("masked", "post_mask"):
        raise ValueError(f"peft.merge={cfg.merge} keeps a sparse base's zeros, but {model.config.hf!r} has no mask and "
                         f"no zeros; prune it first (dstlm prune, or a sparsity section in this run) or use "
                         f"peft.merge=none")
    add_adapters(model, cfg, masked=cfg.merge == "masked")
    return masks, origin


def merge(model: HFCausalLM, masked: bool) -> None:
    """Fold the adapter into the base weights (through the masks when `masked`, else plainly, as peft's own
    merge_and_unload) and drop peft's wrapper: `model.hf` is the plain transformers model again."""
    for _, layer in lora_layers(model):
        if masked:
            layer.lora_variant[ADAPTER] = MaskedLoRA()
        else:
            layer.lora_variant.pop(ADAPTER, None)
    with torch.no_grad():
        model.hf = model.hf.merge_and_unload()


def unload(model: HFCausalLM) -> None:
    """Drop the adapter without merging: `model.hf` is the base model again."""
    model.hf = model.hf.unload()


# -- reading a peft run's checkpoint -----------------------------------------------------------------------
def load_adapter(source, peft: dict, extra: dict, state: dict, path: str) -> HFCausalLM:
    """The adapted model of a peft checkpoint: the base read from its folder (the architecture the checkpoint
    carries), the recorded masks applied and the base checked against the recorded fingerprint, then the adapter
    (unmerged) with the checkpoint's weights."""
    from dstlm.hf.model import load_hf_model

    record = extra.get("peft")
    if record is None:
        raise ValueError(f"checkpoint {path!r} of a peft run carries no record of its base; re-save it with this "
                         f"dstlm version")
    if source.local is None:
        raise ValueError(f"checkpoint {path!r} holds a LoRA adapter whose base, model.hf={source.hf!r}, is not a local "
                         f"folder here; the base is read from it: put the folder back at that path")
    model = load_hf_model(source, extra.get("hf_config"))
    restore_masks(model, record)
    cfg = PeftConfig(**peft)
    add_adapters(model, cfg, masked=cfg.merge == "masked")
    check_base(fingerprint(model), record, source.hf, f"checkpoint {path!r}")
    adapter = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(adapter, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable - set(adapter):
        raise ValueError(f"checkpoint {path!r}: its adapter does not fit peft={peft!r} (missing "
                         f"{sorted(trainable - set(adapter))[:2]}, unexpected {unexpected[:2]})")
    return model
