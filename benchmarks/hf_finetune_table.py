"""The closed loop of sparse fine-tuning through the Hugging Face path, offline, on the shipped corpus.

For each architecture (Llama, GPT-2):
1. pretrain a tiny model of that architecture on the shipped corpus (`dstlm fit` with model.from_config) and
   export it: a plain HF folder, the "pretrained model" of the rest of the loop;
2. one-shot (no training, `dstlm prune`): magnitude and Wanda at 50 % (uniform) and at 2:4;
3. fine-tune from it (`dstlm fit` with model.hf): dense (the baseline), RigL 50 %, 2:4 (N:M regrown within
   groups) and RigL 80 %, first masks by magnitude, then `dstlm export`;
4. score every folder: validation loss / perplexity on the corpus' held-out split, lm-eval wikitext and
   lambada_openai through lm-eval's own `hf` model; for every fine-tuned run also through dstlm's lm-eval
   model on the training checkpoint, and report the largest difference between the two (should be ~0).

    python benchmarks/hf_finetune_table.py [--pretrain-steps 400] [--finetune-steps 150] [--limit 200]
                                           [--archs llama,gpt2] [--out runs/hf-table] [--doc docs/hf-finetune.md]

Every stage is skipped when its output exists (rerun to resume); the table is printed and, with --doc, written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCH = {  # ~2.5 M parameters each, the size of dstlm's tiny preset (4 x 192, vocab 4096, context 256)
    "llama": dict(model_type="llama", hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
                  rms_norm_eps=1e-5),
    "gpt2": dict(model_type="gpt2", n_embd=192, n_inner=768, n_layer=4, n_head=4, n_positions=256,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new"),
}
ONE_SHOT = {  # name: sparsity options of `dstlm prune`
    "magnitude-50": ["--sparsity.method", "static", "--sparsity.sparsity", "0.5", "--sparsity.distribution", "uniform",
                     "--sparsity.mask_init", "magnitude"],
    "wanda-50": ["--sparsity.method", "static", "--sparsity.sparsity", "0.5", "--sparsity.distribution", "uniform",
                 "--sparsity.mask_init", "wanda"],
    "magnitude-2:4": ["--sparsity.method", "nm", "--sparsity.mask_init", "magnitude"],
    "wanda-2:4": ["--sparsity.method", "nm", "--sparsity.mask_init", "wanda"],
}
FINE_TUNE = {  # name: sparsity options of `dstlm fit` (None: dense)
    "dense-ft": None,
    "rigl-50-ft": ["--sparsity", "configs/sparsity/rigl.yaml", "--sparsity.sparsity", "0.5",
                   "--sparsity.distribution", "uniform"],
    "nm-2:4-ft": ["--sparsity", "configs/sparsity/nm24.yaml"],
    "rigl-80-ft": ["--sparsity", "configs/sparsity/rigl.yaml", "--sparsity.sparsity", "0.8",
                   "--sparsity.distribution", "uniform"],
}
TASKS = ["wikitext", "lambada_openai"]


def sh(args: list[str], log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run([sys.executable, "-m", "dstlm.cli", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env=env)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): dstlm {' '.join(args)}; see {log}")
    print(f"  {time.perf_counter() - t0:6.0f} s  dstlm {' '.join(args[:1])} -> {log.stem}", flush=True)


def base_folder(arch: str, out: Path) -> Path:
    """The architecture's config with the shipped corpus' BPE tokenizer (no weights are read from it)."""
    folder = out / f"base-{arch}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoConfig

    from dstlm.data.tokenizer import load_tokenizer
    from dstlm.hf.publish import save_tokenizer
    from dstlm.paths import default_corpus_files

    tok = load_tokenizer("bpe", default_corpus_files(), 4096)
    spec = dict(ARCH[arch])
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=tok.vocab_size, bos_token_id=tok.eos_id,
                               eos_token_id=tok.eos_id, **spec)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(folder))
    save_tokenizer(tok, folder, 256)
    return folder


COMMON = ["--data", "configs/data/shipped.yaml", "--optim", "configs/optim/adamw.yaml", "--trainer.progress_bar",
          "false", "--trainer.ckpt_every_n_steps", "0", "--eval", "null"]


def val_loss(folder: Path) -> float:
    """Mean next-token loss of an HF folder on the corpus' held-out split (the blocks every run validates on)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dstlm.training.config import DataConfig
    from dstlm.training.loop.datamodule import LMDataModule

    data = LMDataModule(DataConfig(tokenizer=str(folder), block_size=256, batch_size=16, val_batches=8), seed=1337)
    data.setup("validate")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    total = n = 0.0
    with torch.no_grad():
        for x, y in data.val_dataloader():
            logits = model(input_ids=x, use_cache=False).logits
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            n += y.numel()
    return total / n


def lm_scores(target: str, limit: int) -> dict:
    from dstlm.eval.harness import run_eval, scores

    return scores(run_eval(target, TASKS, limit, 8, "cpu", None))


def flat(s: dict) -> dict:
    return {f"{t}/{m}": v for t, ms in s.items() for m, v in ms.items() if not m.endswith("stderr")}


def measure(name: str, folder: Path, out: Path, limit: int, checkpoint: Path | None = None) -> dict:
    cache = out / "scores" / f"{name}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    t0 = time.perf_counter()
    row = {"val_loss": val_loss(folder), "hf": flat(lm_scores(str(folder), limit))}
    if checkpoint is not None:
        row["dstlm"] = flat(lm_scores(str(checkpoint), limit))
        row["max_diff"] = max(abs(row["hf"][k] - row["dstlm"][k]) / max(1.0, abs(row["hf"][k])) for k in row["hf"])
    block = json.loads((folder / "config.json").read_text()).get("sparsity")
    row["sparsity"] = block["achieved_sparsity"] if block else 0.0
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row, indent=2))
    print(f"  {time.perf_counter() - t0:6.0f} s  scored {name}", flush=True)
    return row


def pretrained(arch: str, out: Path, a) -> Path:
    """The architecture pretrained on the shipped corpus and exported: out/pre-<arch> (made when missing)."""
    logs, runs, pre = out / "logs", out / "runs", out / f"pre-{arch}"
    logs.mkdir(parents=True, exist_ok=True)
    if not (pre / "config.json").is_file():
        sh(["fit", *COMMON, "--model.hf", str(base_folder(arch, out)), "--model.from_config", "true", "--name",
            f"pre-{arch}", "--out_dir", str(runs), "--trainer.max_steps", str(a.pretrain_steps),
            "--trainer.val_every_n_steps", str(a.pretrain_steps)], logs / f"pre-{arch}.log")
        sh(["export", "--checkpoint", str(runs / f"pre-{arch}"), "--out", str(pre)], logs / f"pre-{arch}-export.log")
    return pre


def run_arch(arch: str, out: Path, a) -> dict[str, dict]:
    logs, runs = out / "logs", out / "runs"
    pre = pretrained(arch, out, a)
    rows = {"pretrained (dense)": measure(f"{arch}-pretrained", pre, out, a.limit)}
    for name, opts in ONE_SHOT.items():
        folder = out / f"{arch}-{name.replace(':', '')}"
        if not (folder / "config.json").is_file():
            sh(["prune", *COMMON, "--model.hf", str(pre), "--name", f"{arch}-{name}", "--out_dir", str(runs),
                "--out", str(folder), *opts], logs / f"{arch}-{name.replace(':', '')}.log")
        rows[f"one-shot {name}"] = measure(f"{arch}-{name.replace(':', '')}", folder, out, a.limit)
    for name, opts in FINE_TUNE.items():
        tag = f"{arch}-{name.replace(':', '')}"
        folder, run = out / tag, runs / tag
        if not (folder / "config.json").is_file():
            extra = [] if opts is None else [*opts,
                                             "--sparsity.delta_t", str(max(1, a.finetune_steps // 6)),
                                             "--sparsity.drop_fraction", "0.1"]
            sh(["fit", *COMMON, "--model.hf", str(pre), "--name", tag, "--out_dir", str(runs),
                "--trainer.max_steps", str(a.finetune_steps), "--trainer.val_every_n_steps", str(a.finetune_steps),
                "--optim.lr", "0.0006", "--optim.warmup_steps", "10", "--optim.weight_decay", "0.0", *extra],
               logs / f"{tag}.log")
            sh(["export", "--checkpoint", str(run), "--out", str(folder)], logs / f"{tag}-export.log")
        rows[name] = measure(tag, folder, out, a.limit, checkpoint=run / "checkpoints" / "last.ckpt")
    return rows


def table(results: dict[str, dict[str, dict]], a) -> str:
    lines = [f"Pretraining {a.pretrain_steps} steps, fine-tuning {a.finetune_steps} steps (16 x 256 tokens per step) "
             f"on the shipped corpus; lm-eval: first {a.limit} documents of lambada_openai, all 6 wikitext articles; "
             f"scores of the exported folders through lm-eval's `hf` model. \"dstlm vs hf\": the largest relative "
             f"difference of any score between dstlm's lm-eval model on the training checkpoint and `hf` on the "
             f"export.", "",
             "| arch | model | sparsity | val loss | val ppl | wikitext bits/byte | wikitext word ppl | lambada acc "
             "| lambada ppl | dstlm vs hf |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, rows in results.items():
        for name, r in rows.items():
            h = r["hf"]
            diff = f"{r['max_diff']:.1e}" if "max_diff" in r else "-"
            ppl = math.exp(r["val_loss"])
            lines.append(f"| {arch} | {name} | {r['sparsity']:.3f} | {r['val_loss']:.4f} | {ppl:.1f} "
                         f"| {h['wikitext/bits_per_byte']:.4f} | {h['wikitext/word_perplexity']:.1f} "
                         f"| {h['lambada_openai/acc']:.3f} | {h['lambada_openai/perplexity']:.1f} | {diff} |")
    return "\n".join(lines)


def arguments(description: str, pretrain: int, finetune: int, limit: int):
    """The command line both closed-loop tables take: (arguments, the output folder)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--pretrain-steps", type=int, default=pretrain)
    p.add_argument("--finetune-steps", type=int, default=finetune)
    p.add_argument("--limit", type=int, default=limit, help="lambada_openai documents")
    p.add_argument("--archs", default="llama,gpt2")
    p.add_argument("--out", default="runs/hf-table")
    p.add_argument("--doc", default=None, help="write the table into this markdown file")
    a = p.parse_args()
    return a, (REPO / a.out) if not Path(a.out).is_absolute() else Path(a.out)


def main() -> None:
    a, out = arguments(__doc__.split("\n")[0], 400, 150, 200)
    results = {arch: run_arch(arch, out, a) for arch in a.archs.split(",")}
    text = table(results, a)
    print(text)
    (out / "table.md").write_text(text + "\n")
    if a.doc:
        Path(a.doc).write_text("# Sparse fine-tuning through the Hugging Face path: the closed loop\n\n"
                               "Made by `python benchmarks/hf_finetune_table.py "
                               f"--pretrain-steps {a.pretrain_steps} --finetune-steps {a.finetune_steps} "
                               f"--limit {a.limit}`.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
