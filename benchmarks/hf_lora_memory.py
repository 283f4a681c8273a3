"""What LoRA saves at a size where weights, not libraries, dominate memory: peak memory, time per step and
checkpoint size of full sparse fine-tuning against LoRA (masked and plain) on one Llama of ~100 M parameters.

The model is built from a config (random weights, saved as a folder; no download) and pruned one-shot to 50 % by
magnitude in each run; full fine-tuning is RigL 50 % (every weight trained, AdamW state for all), LoRA trains
r-8 adapters on every linear layer with the base frozen. Each variant is one `dstlm fit` process (peak resident
set of that process, so the libraries' ~1 GiB is in every figure; the model's own fp32 weights are printed
beside it).

    python benchmarks/hf_lora_memory.py [--hidden 1024] [--layers 8] [--steps 12] [--out runs/hf-lora-memory]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_finetune_table import REPO, sh  # noqa: E402
from hf_lora_table import run_facts  # noqa: E402

ONE_SHOT = ["--sparsity.method", "static", "--sparsity.sparsity", "0.5", "--sparsity.distribution", "uniform",
            "--sparsity.mask_init", "magnitude"]
VARIANTS = {
    "full sparse fine-tuning (RigL 50 %)": ["--sparsity", "configs/sparsity/rigl.yaml", "--sparsity.sparsity", "0.5",
                                            "--sparsity.distribution", "uniform", "--sparsity.mask_init",
                                            "magnitude", "--sparsity.delta_t", "5"],
    "LoRA masked": [*ONE_SHOT, "--peft", "configs/peft/lora.yaml", "--peft.merge", "masked"],
    "LoRA plain (post_mask / none)": [*ONE_SHOT, "--peft", "configs/peft/lora.yaml", "--peft.merge", "post_mask"],
}


def model_folder(out: Path, hidden: int, layers: int) -> tuple[Path, int]:
    folder = out / "base"
    if not (folder / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from dstlm.data.tokenizer import load_tokenizer
        from dstlm.hf.publish import save_tokenizer
        from dstlm.paths import default_corpus_files

        tok = load_tokenizer("bpe", default_corpus_files(), 4096)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                          num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                          vocab_size=tok.vocab_size, max_position_embeddings=256, tie_word_embeddings=False,
                          bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))
        save_tokenizer(tok, folder, 256)
    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return folder, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="runs/hf-lora-memory")
    a = p.parse_args()
    out = (REPO / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    folder, n = model_folder(out, a.hidden, a.layers)
    rows = []
    for name, opts in VARIANTS.items():
        tag = name.split(" (")[0].replace(" ", "-")
        if not (out / "runs" / tag / "summary.json").is_file():
            sh(["fit", "--data", "configs/data/shipped.yaml", "--model.hf", str(folder), "--name", tag, "--out_dir",
                str(out / "runs"), "--data.batch_size", "4", "--trainer.max_steps", str(a.steps),
                "--trainer.val_every_n_steps", str(a.steps), "--trainer.ckpt_every_n_steps", "0", "--eval", "null",
                "--trainer.progress_bar", "false", "--optim.warmup_steps", "2", *opts], out / "logs" / f"{tag}.log")
        rows.append((name, run_facts(out / "runs" / tag)))
    lines = [f"Llama {a.layers} x {a.hidden}: {n / 1e6:.1f} M parameters ({n * 4 / 2**30:.2f} GiB in fp32); "
             f"{a.steps} steps of 4 x 256 tokens; one process each.", "",
             "| variant | trainable params | peak memory (GiB) | s / step | checkpoint (MiB) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {f['trainable']:,} | {f['peak_gib']:.2f} | {f['s_per_step']:.2f} | {f['ckpt_mb']:.1f} |"
              for name, f in rows]
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
