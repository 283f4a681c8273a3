"""A Hugging Face causal LM as a dstlm model: loading, the sparse-weight adapter and its manifest.

`HFCausalLM` wraps the transformers model (`.hf`) with what training asks of any dstlm model: `loss(x, y)`,
`sparse_params(include, exclude)` (which weights are sparse, each presented as an [out, in] matrix whatever
its storage), `unit_links()` for the dead-unit census and `manifest()` (what is sparse, what stays dense and
why). Names are the transformers model's own parameter names (`model.layers.0.mlp.up_proj.weight`).

Storage the adapter knows:
- `nn.Linear`: weight [out, in], as the rules want it;
- GPT-2's `Conv1D`: weight [in, out], presented transposed, so N:M groups and SRigL's fan-in run along the
  input (reduction) dimension and a row is an output unit;
- fused experts (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]; `is_transposed` variants [E, in, out]):
  each expert is its own sparse matrix with its own budget, masked in place in the fused tensor.
Everything else stays dense, with the reason in the manifest: embeddings, the LM head (tied or not), norms,
biases, routers and gates, and any other weight the adapter has no [out, in] reading of.
"""

from __future__ import annotations

import fnmatch
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dstlm.hf.source import MASKS_FILE, HFModelConfig
from dstlm.models.gpt import param_numel
from dstlm.sparse.masks import SparseParam

ROUTER_WORDS = ("router", "gate")
"""Last name component of a router / gate weight (Mixtral's `gate`, Qwen-MoE's `shared_expert_gate`); an
MLP's `gate_proj` is a projection, not a router, and is sparsified."""


@dataclass
class ManifestRow:
    name: str
    shape: tuple[int, ...]
    sparse: bool
    why: str
    """Layout for sparse weights (linear, conv1d [in,out], expert e of a fused tensor); the reason for dense ones."""


def is_router(name: str) -> bool:
    """A router / gate weight: its module's name is `gate`, `router`, or ends in `_gate` / `_router`."""
    last = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name.rsplit(".", 1)[-1]
    return last in ROUTER_WORDS or last.endswith(tuple("_" + w for w in ROUTER_WORDS))


class HFCausalLM(nn.Module):
    """A transformers causal LM (`self.hf`) with the dstlm model interface."""

    default_sparse_include = ["*"]

    def __init__(self, hf: nn.Module, source: HFModelConfig, pretrained: bool) -> None:
        super().__init__()
        self.hf = hf
        self.config = source
        """The source config (block_size: the longest sequence; as GPT.config is the GPT's)."""
        self.pretrained = pretrained
        """Weights came from a trained model: first masks default to magnitude (not random)."""

    # -- training interface ---------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=idx, use_cache=False).logits

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, with_aux: bool = True) -> torch.Tensor:
        """Mean next-token cross-entropy over targets != -100 (the targets are already shifted); an MoE model
        adds its router load-balancing loss (router_aux_loss_coef) unless with_aux is False."""
        aux = with_aux and getattr(self.hf.config, "router_aux_loss_coef", None) is not None
        out = self.hf(input_ids=idx, use_cache=False, **({"output_router_logits": True} if aux else {}))
        logits = out.logits
        flat = targets.reshape(-1)
        # the mean over counted targets, 0 (not nan) when none count, as dstlm's own loss
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=-100,
                             reduction="sum") / (flat != -100).sum().clamp_min(1)
        if aux and getattr(out, "aux_loss", None) is not None:
            return ce + self.hf.config.router_aux_loss_coef * out.aux_loss.to(ce.dtype)
        return ce

    def moe_layers(self) -> list:
        return []

    @contextmanager
    def calibration_context(self):
        """Experts run as transformers' per-expert loop (`eager`) for calibration forwards, so each expert's
        inputs can be seen (dstlm.sparse.calibration); the kernel the model had is restored after."""
        switch = getattr(self.hf, "_can_set_experts_implementation", lambda: False)()
        before = getattr(self.hf.config, "_experts_implementation", None) if switch else None
        if switch and before not in (None, "eager"):
            self.hf.set_experts_implementation("eager")
        try:
            yield
        finally:
            if switch and before not in (None, "eager"):
                self.hf.set_experts_implementation(before)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(param_numel(p) for p in self.hf.parameters())  # shared (tied) tensors once; ZeRO-3: whole size
        if non_embedding:
            n -= sum(param_numel(p) for p in self.hf.get_input_embeddings().parameters())
        return n

    # -- the sparse adapter ---------------------------------------------------------------------------
    def _tied_ids(self) -> set[int]:
        ids = set()
        for m in (self.hf.get_input_embeddings(), self.hf.get_output_embeddings()):
            if m is not None:
                ids.update(id(p) for p in m.parameters(recurse=False))
        return ids

    def _classify(self) -> list[tuple[ManifestRow, list[SparseParam]]]:
        """Every parameter of the model with its verdict (sparse with its matrices, or dense with the reason)."""
        from transformers.pytorch_utils import Conv1D

        out: list[tuple[ManifestRow, list[SparseParam]]] = []
        embeddings = self._tied_ids()
        seen: set[int] = set()
        for mod_name, module in self.hf.named_modules():
            for attr, p in module.named_parameters(recurse=False):
                name = f"{mod_name}.{attr}" if mod_name else attr
                shape = tuple(p.shape)
                if id(p) in seen:
                    continue
                seen.add(id(p))
                dense = None
                if id(p) in embeddings:
                    dense = "embedding / LM head"
                elif isinstance(module, nn.Embedding):
                    dense = "embedding"
                elif p.ndim < 2:
                    dense = "bias" if attr == "bias" else "norm / scale (1-D)"
                elif "norm" in type(module).__name__.lower():
                    dense = "norm"
                elif is_router(name):
                    dense = "router / gate"
                if dense:
                    out.append((ManifestRow(name, shape, False, dense), []))
                elif isinstance(module, nn.Linear) and attr == "weight":
                    out.append((ManifestRow(name, shape, True, "linear [out, in]"), [SparseParam(name, module, attr)]))
                elif isinstance(module, Conv1D) and attr == "weight":
                    out.append((ManifestRow(name, shape, True, "conv1d [in, out], used transposed"),
                                [SparseParam(name, module, attr, transposed=True)]))
                elif p.ndim == 3 and hasattr(module, "num_experts") and p.shape[0] == module.num_experts:
                    t = bool(getattr(module, "is_transposed", False))
                    layout = "[E, in, out], used transposed" if t else "[E, out, in]"
                    out.append((ManifestRow(name, shape, True, f"fused experts {layout}, one budget per expert"),
                                [SparseParam(f"{name}.{e}", module, attr, e, transposed=t)
                                 for e in range(p.shape[0])]))
                else:
                    out.append((ManifestRow(name, shape, False, f"no [out, in] reading of {type(module).__name__}."
                                                                f"{attr}"), []))
        return out

    def sparse_params(self, include: list[str], exclude: list[str]) -> list[SparseParam]:
        """The sparse matrices: sparsifiable weights whose names match an include pattern and no exclude
        pattern (a fused expert tensor is matched by its own name and by its matrices' `<name>.<e>`)."""
        chosen = [sp for row, sps in self._classify() if row.sparse for sp in sps
                  if _matches(sp.name, row.name, include) and not _matches(sp.name, row.name, exclude)]
        if not chosen:
            names = [row.name for row, _ in self._classify() if row.sparse][:3]
            raise ValueError(f"sparsity.include={include} (exclude={exclude}) matches no sparsifiable weight of "
                             f"{self.config.hf!r}; names look like {', '.join(names) or '(none)'}")
        return chosen

    def manifest(self, include: list[str], exclude: list[str]) -> list[ManifestRow]:
        """Every weight with its verdict under these patterns (dense ones say why)."""
        rows = []
        for row, sps in self._classify():
            if row.sparse and not any(_matches(sp.name, row.name, include) and
                                      not _matches(sp.name, row.name, exclude) for sp in sps):
                row = ManifestRow(row.name, row.shape, False, "not selected by sparsity.include / exclude")
            rows.append(row)
        return rows

    def unit_links(self) -> list[tuple[str, str]]:
        """(producer, consumer) pairs meeting in one hidden unit: MLP up/gate -> down (Llama family),
        GPT-2's c_fc -> c_proj, GPT-NeoX's dense_h_to_4h -> dense_4h_to_h, and attention value -> output
        projection when every head has its own values.
        Pairs whose shapes do not meet are dropped by the engine (links_between)."""
        names = {n for n, _ in self.hf.named_parameters()}
        pairs = []
        for n in names:
            for prod, cons in ((".mlp.up_proj.weight", ".mlp.down_proj.weight"),
                               (".mlp.gate_proj.weight", ".mlp.down_proj.weight"),
                               (".mlp.c_fc.weight", ".mlp.c_proj.weight"),
                               (".mlp.dense_h_to_4h.weight", ".mlp.dense_4h_to_h.weight"),
                               (".self_attn.v_proj.weight", ".self_attn.o_proj.weight")):
                if n.endswith(prod) and n[: -len(prod)] + cons in names:
                    pairs.append((n, n[: -len(prod)] + cons))
        return sorted(pairs)


def _matches(matrix: str, param: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(matrix, p) or fnmatch.fnmatchcase(param, p) for p in patterns)


def format_manifest(rows: list[ManifestRow], densities: Optional[dict[str, float]] = None) -> str:
    """The manifest as text: sparse weights with shape, layout and target density; dense ones grouped by reason."""
    densities = densities or {}
    sparse = [r for r in rows if r.sparse]
    lines = [f"sparse weights ({len(sparse)}):"]
    for r in sparse:
        ds = [d for n, d in densities.items() if n == r.name or n.startswith(r.name + ".")]
        dens = f"density {sum(ds) / len(ds):.4f}" if ds else ""
        lines.append(f"  {r.name:<48} {str(list(r.shape)):>18}  {r.why:<44} {dens}")
    dense: dict[str, list[str]] = {}
    for r in rows:
        if not r.sparse:
            dense.setdefault(r.why, []).append(r.name)
    lines.append(f"dense weights ({sum(len(v) for v in dense.values())}):")
    for why, names in dense.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        lines.append(f"  {why}: {shown}")
    return "\n".join(lines)


# -- loading ------------------------------------------------------------------------------------------
def check_causal_lm(source: HFModelConfig, config) -> None:
    from transformers import AutoModelForCausalLM

    if type(config) not in AutoModelForCausalLM._model_mapping:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "none listed"
        raise ValueError(f"model.hf={source.hf!r} is a {config.model_type!r} model (architectures: {arch}) with no "
                         f"causal-LM head transformers knows; give a directory of a *ForCausalLM model")


def load_hf_config(source: HFModelConfig, config_dict: Optional[dict] = None):
    """The transformers config of the source (from `config_dict`, as checkpoints carry it, when given)."""
    from transformers import AutoConfig

    if config_dict is not None:
        cfg = dict(config_dict)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if source.local is None and _offline():
        raise ValueError(f"model.hf={source.hf!r} is not a local directory and HF_HUB_OFFLINE is set; give the "
                         f"folder save_pretrained wrote, or unset HF_HUB_OFFLINE to download it")
    try:
        return AutoConfig.from_pretrained(source.hf)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.hf={source.hf!r} is not a Hugging Face model directory ({str(e).splitlines()[0]}); "
                         f"give the folder save_pretrained wrote") from None


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def load_hf_model(source: HFModelConfig, config_dict: Optional[dict] = None, weights: bool = True,
                  partitioned=None) -> HFCausalLM:
    """The source as an HFCausalLM in fp32: pretrained weights (and the masks of a dstlm export, kept) unless
    `weights` is False or the source asks for a fresh initialisation (`from_config`). `partitioned`: the
    PartitionedBuild (trainer.zero_init) the model is being built under; the pretrained weights are then read
    slice by slice from the folder's safetensors files, each rank reading only the rows its partition holds."""
    from transformers import AutoModelForCausalLM

    config = load_hf_config(source, config_dict)
    check_causal_lm(source, config)
    config._attn_implementation = source.attn_implementation
    if weights and not source.from_config:
        if partitioned is not None:
            stored = StoredWeights(source)  # checked before the (slow) build of the architecture
            hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # placeholders, init partitioned
            stored.prefix = getattr(hf, "base_model_prefix", "")
            partitioned.load_slices(hf, stored.read, f"model.hf={source.hf!r}")
        else:
            hf = AutoModelForCausalLM.from_pretrained(source.hf, config=config, dtype=torch.float32)
        model = HFCausalLM(hf, source, pretrained=True)
        if source.local is not None and (source.local / MASKS_FILE).is_file():
            attach_saved_masks(model, source.local / MASKS_FILE, partitioned)
    else:
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = HFCausalLM(hf, source, pretrained=False)
    hf.train()
    return model


class StoredWeights:
    """The safetensors weights of a local model folder (one file or an index of shards), read a flat range of
    one tensor at a time: only the rows that hold the range are read from disk."""

    def __init__(self, source: HFModelConfig) -> None:
        import json

        from safetensors import safe_open

        folder = source.local
        if folder is None:
            raise ValueError(f"model.hf={source.hf!r} with trainer.zero_init=true: a partitioned build reads the "
                             f"weights from a local folder; download it first (save_pretrained) and give its path")
        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        if index.is_file():
            self.files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif single.is_file():
            with safe_open(str(single), "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise ValueError(f"model.hf={source.hf!r} has no safetensors weights (model.safetensors or its index), "
                             f"which trainer.zero_init=true reads slice by slice; re-save the model with "
                             f"save_pretrained (safetensors) or drop zero_init")
        self._open: dict[Path, object] = {}
        self.prefix = ""  # the model's base_model_prefix: files saved from the bare base model lack it

    def read(self, name: str, start: int, length: int) -> Optional[torch.Tensor]:
        """Entries start..start+length of tensor `name`, flat, or None when the files have no such tensor. A name
        under the base model (`transformer.h.0...`) is also looked up without its prefix (`h.0...`), as
        from_pretrained does: the original GPT-2 files are stored that way."""
        if name not in self.files and self.prefix and name.startswith(self.prefix + "."):
            name = name[len(self.prefix) + 1:]
        path = self.files.get(name)
        if path is None:
            return None
        if path not in self._open:
            from safetensors import safe_open

            self._open[path] = safe_open(str(path), "pt")
        part = self._open[path].get_slice(name)
        shape = part.get_shape()
        if len(shape) < 2:
            return part[:].reshape(-1)[start:start + length]
        cols = math.prod(shape[1:])
        first, end = start // cols, -(-(start + length) // cols)  # the rows that hold the range
        rows = part[first:end].reshape(-1)
        return rows[start - first * cols: start - first * cols + length]


def mask_buffers(model: HFCausalLM) -> dict[str, torch.Tensor]:
    """{parameter name: bool mask in the weight's storage shape} of every mask buffer (`<attr>_mask`) on the
    model's modules."""
    out = {}
    for mod_name, module in model.hf.named_modules():
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf_name.endswith("_mask") and buf.dtype == torch.bool:
                attr = buf_name[: -len("_mask")]
                out[f"{mod_name}.{attr}" if mod_name else attr] = buf
    return out


def register_packed_mask(model: HFCausalLM, name: str, packed: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """Parameter `name`'s bit-packed mask unpacked to its storage shape and registered as `<attr>_mask` on its
    module; returns (module, mask)."""
    from dstlm.sparse.bits import unpack_bits

    module_name, attr = name.rsplit(".", 1)
    module = model.hf.get_submodule(module_name)
    p = getattr(module, attr)
    mask = unpack_bits(packed, p.numel()).reshape(p.shape).clone()
    module.register_buffer(f"{attr}_mask", mask, persistent=True)
    return module, mask


def attach_saved_masks(model: HFCausalLM, path: Path, partitioned=None) -> None:
    """Masks of a dstlm export, registered on their modules and marked to be kept as the initial masks. Under a
    partitioned build (`partitioned`) the weights are checked on this rank's slice."""
    from safetensors.torch import load_file

    packed = load_file(str(path))
    params = dict(model.hf.named_parameters())
    for key, bits in packed.items():
        name = key[: -len(".packed")] if key.endswith(".packed") else key
        if name not in params:
            raise ValueError(f"{path} has a mask for {name!r}, which {model.config.hf!r} does not have; the mask "
                             f"file belongs to another model")
        p = params[name]
        module, mask = register_packed_mask(model, name, bits)
        module.dstlm_keep_mask = True
        held = partitioned.local_values(p) if partitioned is not None else None
        if held is not None:
            start, values = held
            off = ~mask.reshape(-1)[start:start + values.numel()]
        else:
            values, off = p.detach(), ~mask
        if bool((values[off] != 0).any()):
            raise ValueError(f"{path}: {name} has non-zero weights where its mask is off; the weights and the mask "
                             f"file do not belong together")

