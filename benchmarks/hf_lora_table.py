"""LoRA on sparse Hugging Face models against one-shot pruning and full sparse fine-tuning: the closed loop of
docs/hf-finetune.md (same pretrained models, same fine-tuning budget), extended with adapters.

For each architecture (Llama, GPT-2) and each sparsity (50 % unstructured, 2:4), from the pretrained model of
benchmarks/hf_finetune_table.py (made here if missing):
- one-shot only: magnitude pruning, no training (`dstlm prune`);
- full sparse fine-tuning: RigL 50 % / N:M 2:4, every weight trained (`dstlm fit`);
- LoRA masked: the same one-shot masks, base frozen, adapters trained through the masks, merged with the base's zeros;
- LoRA post_mask: plain LoRA from the same start, its update masked at the merge;
- LoRA plain merge: the post_mask run's adapter merged as peft does (`merge_and_unload`): its real density.
Columns: val loss, lm-eval (wikitext, lambada_openai through lm-eval's `hf` model on the exported folder), the
exported folder's density over the sparsifiable weights, trainable parameters, peak memory (process peak resident
set), time per optimizer step (run average), checkpoint size.

    python benchmarks/hf_lora_table.py [--pretrain-steps 300] [--finetune-steps 100] [--limit 100]
                                       [--archs llama,gpt2] [--out runs/hf-table] [--doc docs/hf-lora-table.md]

Shares its folder with hf_finetune_table.py (pass the same --out): what exists is reused; every stage is skipped
when its output exists (rerun to resume).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_finetune_table import COMMON, arguments, measure, pretrained, sh  # noqa: E402

SPARSITIES = {  # name: (one-shot options, full fine-tuning options)
    "50%": (["--sparsity.method", "static", "--sparsity.sparsity", "0.5", "--sparsity.distribution", "uniform",
             "--sparsity.mask_init", "magnitude"],
            ["--sparsity", "configs/sparsity/rigl.yaml", "--sparsity.sparsity", "0.5", "--sparsity.distribution",
             "uniform"]),
    "2:4": (["--sparsity.method", "nm", "--sparsity.mask_init", "magnitude"],
            ["--sparsity", "configs/sparsity/nm24.yaml"]),
}
LORA = ["--peft", "configs/peft/lora.yaml", "--peft.r", "8", "--optim.lr", "0.002"]
TUNE = ["--optim.warmup_steps", "10", "--optim.weight_decay", "0.0"]


def train(tag: str, pre: Path, out: Path, a, opts: list[str]) -> Path:
    """`dstlm fit` from the pretrained folder with `opts`, then `dstlm export`; returns the run folder."""
    run, folder = out / "runs" / tag, out / tag
    if not (folder / "config.json").is_file():
        sh(["fit", *COMMON, "--model.hf", str(pre), "--name", tag, "--out_dir", str(out / "runs"),
            "--trainer.max_steps", str(a.finetune_steps), "--trainer.val_every_n_steps", str(a.finetune_steps), *TUNE,
            *opts],
           out / "logs" / f"{tag}.log")
        sh(["export", "--checkpoint", str(run), "--out", str(folder)], out / "logs" / f"{tag}-export.log")
    return run


def plain_merge(run: Path, folder: Path) -> None:
    """peft's own merge of a run's adapter (no mask), saved as a plain folder: the density plain LoRA really has."""
    if (folder / "config.json").is_file():
        return
    from dstlm.checkpoint import load_checkpoint
    from dstlm.hf import lora
    from dstlm.hf.publish import save_tokenizer

    loaded = load_checkpoint(str(run))
    lora.merge(loaded.model, masked=False)
    hf = loaded.model.hf
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith("_mask")}
    hf.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    save_tokenizer(loaded.tokenizer, folder, loaded.config.block_size)


def density(folder: Path, names: list[str]) -> float:
    """Non-zero fraction of the named weights of an exported folder."""
    from safetensors import safe_open

    nz = total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for n in names:
            w = f.get_tensor(n)
            nz, total = nz + int((w != 0).sum()), total + w.numel()
    return nz / total


def run_facts(run: Path) -> dict:
    """Trainable parameters, peak memory, seconds per step and checkpoint size of a training run."""
    s = json.loads((run / "summary.json").read_text())
    tokens_per_step = s["train_tokens_seen"] / max(1, s["steps"])
    ckpt = (run / "checkpoints" / "last.ckpt").resolve()
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) if ckpt.is_dir() else ckpt.stat().st_size
    return {"trainable": (s.get("peft") or {}).get("trainable_params", s["params"]), "peak_gib": s["peak_memory_gib"],
            "s_per_step": tokens_per_step / s["tokens_per_s"], "ckpt_mb": size / 2**20}


def run_arch(arch: str, out: Path, a) -> dict[str, dict]:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    pre = pretrained(arch, out, a)
    rows = {}
    for sp, (one_shot, full) in SPARSITIES.items():
        key = sp.replace("%", "").replace(":", "")
        pruned = out / f"{arch}-lora-oneshot-{key}"
        if not (pruned / "config.json").is_file():
            sh(["prune", *COMMON, "--model.hf", str(pre), "--name", pruned.name, "--out_dir", str(out / "runs"),
                "--out", str(pruned), *one_shot], out / "logs" / f"{pruned.name}.log")
        names = list(json.loads((pruned / "config.json").read_text())["sparsity"]["sparse_weights"])
        runs = {"one-shot magnitude": (None, pruned),
                "full sparse fine-tuning": (train(f"{arch}-lora-full-{key}", pre, out, a,
                                                  [*full, "--optim.lr", "0.0006", "--sparsity.delta_t",
                                                   str(max(1, a.finetune_steps // 6)), "--sparsity.drop_fraction",
                                                   "0.1"]), None),
                "LoRA masked": (train(f"{arch}-lora-masked-{key}", pre, out, a,
                                      [*one_shot, *LORA, "--peft.merge", "masked"]), None),
                "LoRA post_mask": (train(f"{arch}-lora-post-{key}", pre, out, a,
                                         [*one_shot, *LORA, "--peft.merge", "post_mask"]), None)}
        plain = out / f"{arch}-lora-plain-{key}"
        plain_merge(out / "runs" / f"{arch}-lora-post-{key}", plain)
        runs["LoRA plain merge"] = (out / "runs" / f"{arch}-lora-post-{key}", plain)
        for name, (run, folder) in runs.items():
            folder = folder or out / run.name
            row = measure(folder.name, folder, out, a.limit)
            row["density"] = density(folder, names)
            row.update(run_facts(run) if run is not None else {"trainable": 0})
            rows[f"{sp} {name}"] = row
    return rows


def table(results: dict[str, dict[str, dict]], a) -> str:
    lines = [f"Pretraining {a.pretrain_steps} steps, then {a.finetune_steps} steps of fine-tuning (16 x 256 tokens "
             f"per step) on the shipped corpus; lm-eval through lm-eval's `hf` model on each exported folder (first "
             f"{a.limit} documents of lambada_openai, all 6 wikitext articles). Density: non-zero fraction of the "
             f"sparsifiable weights of the exported folder. LoRA: r 8, alpha 16, dropout 0.05 on every linear layer, "
             f"lr 2e-3; full fine-tuning lr 6e-4. Memory: the training process's peak resident set; time: per "
             f"optimizer step, run average.", "",
             "| arch | model | val loss | wikitext bits/byte | lambada ppl | density | trainable params | peak memory "
             "(GiB) | s / step | checkpoint (MiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, rows in results.items():
        for name, r in rows.items():
            h = r["hf"]
            facts = (f"{r['peak_gib']:.2f} | {r['s_per_step']:.3f} | {r['ckpt_mb']:.2f}" if "peak_gib" in r
                     else "- | - | -")
            lines.append(f"| {arch} | {name} | {r['val_loss']:.4f} | {h['wikitext/bits_per_byte']:.4f} "
                         f"| {h['lambada_openai/perplexity']:.4g} | {r['density']:.4f} | {r['trainable']:,} "
                         f"| {facts} |")
    return "\n".join(lines)


def write_doc(path: Path, table_text: str) -> None:
    """The table into `path` between its table markers, leaving the reading around them as it is (a new file
    gets the markers and the table only)."""
    start, end = "<!-- table: made by benchmarks/hf_lora_table.py -->", "<!-- /table -->"
    old = path.read_text() if path.is_file() else f"{start}\n{end}\n"
    if start not in old or end not in old:
        raise SystemExit(f"{path} has no table markers ({start} ... {end}); add them where the table goes")
    head, rest = old.split(start, 1)
    path.write_text(f"{head}{start}\n{table_text}\n{end}{rest.split(end, 1)[1]}")


def main() -> None:
    a, out = arguments(__doc__.split("\n")[0], 300, 100, 100)
    results = {arch: run_arch(arch, out, a) for arch in a.archs.split(",")}
    text = table(results, a)
    print(text)
    (out / "lora-table.md").write_text(text + "\n")
    if a.doc:
        write_doc(Path(a.doc), text)


if __name__ == "__main__":
    main()
