"""Export of a sparse fine-tuned Hugging Face model: a plain HF directory in the model's own architecture.

What `dstlm export` writes for a checkpoint whose model source is a Hugging Face model:
- the weights in the original architecture and layouts (Conv1D stays [in, out], fused experts stay fused),
  pruned entries exactly zero, loadable by a vanilla `AutoModelForCausalLM.from_pretrained(DIR)`;
- config.json with a `sparsity` block: method, pattern of each sparse weight, achieved sparsity per weight
  and overall, the weights left dense;
- `sparsity_masks.safetensors`: every mask bit-packed in its weight's storage order, so `model: {hf: DIR}`
  resumes sparse fine-tuning with exactly these masks (kept, never re-pruned);
- the tokenizer, and a model card (README.md) with the per-layer table, the recipe and any eval scores.
The export then verifies itself: it reloads the directory with transformers and checks every weight's zeros
against its mask, N:M groups when the method is N:M, and that the logits equal the trained model's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from dstlm.data.tokenizer import EOS, TextTokenizer
from dstlm.hf.model import mask_buffers
from dstlm.hf.source import MASKS_FILE
from dstlm.sparse.methods import METHODS, DSTMethod


class ExportCheckError(RuntimeError):
    pass


def save_tokenizer(tokenizer: TextTokenizer, out: Path, max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    eos = getattr(tokenizer, "eos", EOS)
    # a Hugging Face source keeps its own special tokens and chat template; dstlm's BPEs have one token for all
    special = {"bos_token": eos, "unk_token": eos, **getattr(tokenizer, "special_tokens", {}), "eos_token": eos}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer, model_max_length=max_length,
                                   clean_up_tokenization_spaces=False, **special)
    if getattr(tokenizer, "chat_template", None):
        fast.chat_template = tokenizer.chat_template
    fast.save_pretrained(str(out))


def logits_of(hf, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for `ids` in eval mode (no dropout), its training mode restored after."""
    was = hf.training
    hf.eval()
    logits = hf(input_ids=ids, use_cache=False).logits
    hf.train(was)
    return logits


def _method(sparsity: Optional[dict]) -> type[DSTMethod]:
    """The class of the run's method (the base class, whose answers are 'unstructured', for a dense run or a
    method this process has not registered)."""
    return METHODS.get((sparsity or {}).get("method", ""), DSTMethod)


def _pattern(method: str, sparsity: dict) -> str:
    return _method(sparsity).pattern(sparsity)


def sparsity_block(loaded, masks: dict[str, torch.Tensor]) -> dict:
    """The `sparsity` entry of config.json."""
    sp = loaded.sparsity or {}
    # masks the run kept from its source (a LoRA run on a pruned folder): the source's own block names them
    kept = {} if sp else ((loaded.config.raw_config() or {}).get("sparsity") or {})
    method = sp.get("method") or kept.get("method", "dense")
    params = dict(loaded.model.hf.named_parameters())
    per = {}
    total = zeros = 0
    for name, mask in masks.items():
        n, z = mask.numel(), int((~mask).sum())
        pattern = kept.get("sparse_weights", {}).get(name, {}).get("pattern") or _pattern(method, sp)
        per[name] = {"shape": list(params[name].shape), "sparsity": round(z / n, 6), "pattern": pattern}
        total, zeros = total + n, zeros + z
    dense = sorted(n for n, p in params.items() if n not in masks)
    block = {"format": "dstlm-masked-dense/1", "method": method, "target_sparsity": sp.get("sparsity"),
             "achieved_sparsity": round(zeros / max(1, total), 6), "sparse_weights": per, "ignored": dense,
             "masks_file": MASKS_FILE, "step": loaded.step}
    if loaded.peft:  # a LoRA run: how its adapter was trained and what the export did with it
        block["adapter"] = {k: loaded.peft[k] for k in ("method", "r", "alpha", "merge", "target_modules")}
    return block


def write_masks(masks: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    from dstlm.sparse.bits import pack_mask

    save_file({f"{n}.packed": pack_mask(m.contiguous()).contiguous() for n, m in masks.items()}, str(path))


def model_card(loaded, block: dict, recipe: Optional[str], scores: Optional[dict]) -> str:
    lines = [f"# Sparse {loaded.model.hf.config.model_type} fine-tuned with dstlm", "",
             f"Method **{block['method']}**, achieved sparsity **{block['achieved_sparsity']:.4f}** over the "
             f"{len(block['sparse_weights'])} sparse weights (target {block['target_sparsity']}), "
             f"step {block['step']}.",
             "Pruned entries are stored as exact zeros in the original architecture: "
             "`AutoModelForCausalLM.from_pretrained` loads it as is. `sparsity_masks.safetensors` holds the masks "
             "(bit-packed), so dstlm resumes sparse training from this folder with `model: {hf: <this folder>}`.", "",
             "| weight | shape | sparsity | pattern |", "|---|---|---:|---|"]
    if "adapter" in block:
        a = block["adapter"]
        lines[2:2] = [f"Fine-tuned with a {a['method'].upper()} adapter (rank {a['r']}, alpha {a['alpha']:g}, on "
                      f"{a['target_modules'] or 'peft defaults'}) on the frozen sparse base, merge **{a['merge']}**: "
                      + {"masked": "trained through the base's masks and merged into exactly its zeros.",
                         "post_mask": "trained plainly, its update masked when merged (zeros kept; the masking "
                                      "changes the model the adapter was trained as).",
                         "none": "not merged; `adapter/` is a peft adapter folder to load onto this model "
                                 "(`peft.PeftModel.from_pretrained(model, '<this folder>/adapter')`)."}[a["merge"]],
                      ""]
    for name, e in block["sparse_weights"].items():
        lines.append(f"| {name} | {'x'.join(map(str, e['shape']))} | {e['sparsity']:.4f} | {e['pattern']} |")
    lines += ["", f"Dense (not sparsified): {len(block['ignored'])} weights — embeddings, LM head, norms, biases, "
                  f"routers/gates."]
    if scores:
        lines += ["", "## Scores", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in scores.items()]
    if recipe:
        lines += ["", "## Recipe (the run's config.yaml)", "", "```yaml", recipe.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _run_files(checkpoint: Optional[str]) -> tuple[Optional[str], Optional[dict]]:
    """The run's config.yaml and summary scores, when the checkpoint sits in a dstlm run folder."""
    if checkpoint is None:
        return None, None
    p = Path(checkpoint).resolve()
    for d in [p] + list(p.parents)[:3]:
        if (d / "config.yaml").is_file():
            summary = d / "summary.json"
            scores = None
            if summary.is_file():
                s = json.loads(summary.read_text())
                scores = {k: s[k] for k in ("val_loss", "val_ppl") if s.get(k) is not None}
                for task, metrics in (s.get("eval") or {}).items():
                    scores.update({f"{task} {m}": v for m, v in metrics.items() if not m.endswith("stderr")})
            return (d / "config.yaml").read_text(), scores
    return None, None


def export_hf_source(loaded, checkpoint: Optional[str], out: Path, also=None) -> Path:
    """Write and verify the export of a checkpoint whose model source is a Hugging Face model. `also(folder)`:
    writes and verifies more of the export (a LoRA adapter) before the folder replaces `out`."""
    model = loaded.model
    masks = mask_buffers(model)
    with torch.no_grad():
        params = dict(model.hf.named_parameters())
        for name, mask in masks.items():
            if bool((params[name][~mask] != 0).any()):
                raise ExportCheckError(f"{name} has non-zero weights at pruned entries in {checkpoint}; the "
                                       f"checkpoint breaks the mask invariant, export refused")
    block = sparsity_block(loaded, masks) if masks else None
    hf = model.hf
    if block is not None:
        hf.config.sparsity = block
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # the masks are buffers on the modules: leave them out of the weights file
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith("_mask")}
    hf.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    if hasattr(hf.config, "sparsity"):
        del hf.config.sparsity
    save_tokenizer(loaded.tokenizer, tmp, loaded.config.block_size)
    if masks:
        write_masks(masks, tmp / MASKS_FILE)
        recipe, scores = _run_files(checkpoint)
        (tmp / "README.md").write_text(model_card(loaded, block, recipe, scores))
    verify_export(model, masks, tmp, loaded.sparsity)
    if also is not None:
        also(tmp)
    if out.exists():  # replaced only once the new export is complete and verified
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


@torch.no_grad()
def verify_export(model, masks: dict[str, torch.Tensor], directory: Path, sparsity: Optional[dict]) -> None:
    """Reload `directory` with vanilla transformers: exact zeros where masked, N:M groups, equal logits."""
    from transformers import AutoModelForCausalLM

    re = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    got = dict(re.named_parameters())
    groups = _method(sparsity).groups(sparsity) if sparsity else None
    matrices = model.sparse_params(["*"], []) if groups else []
    for name, mask in masks.items():
        w = got[name]
        if bool((w[~mask] != 0).any()):
            raise ExportCheckError(f"export check: {name} reloads with non-zero weights at pruned entries")
        if groups:
            _check_nm(name, w, *groups, matrices)
    ids = torch.arange(min(16, model.config.block_size or 16)).remainder(re.config.vocab_size)[None, :]
    a = logits_of(model.hf, ids)
    b = re(input_ids=ids, use_cache=False).logits
    if not torch.equal(a, b):
        raise ExportCheckError(f"export check: reloaded logits differ from the trained model's "
                               f"(max |diff| {float((a - b).abs().max()):.3g})")


def _check_nm(name: str, w: torch.Tensor, n: int, m: int, matrices) -> None:
    """At most n non-zeros in every group of m consecutive inputs of every output row ([out, in] reading of
    each of the parameter's sparse matrices)."""
    for s in matrices:
        if s.name != name and not s.name.startswith(name + "."):
            continue
        v = s.view(w)
        if v.shape[1] % m or int(((v != 0).reshape(-1, m).sum(1) > n).sum()):
            raise ExportCheckError(f"export check: {s.name} breaks {n}:{m} (a group has more than {n} non-zeros)")
