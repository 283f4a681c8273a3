"""Per-rank peak memory of sparse vs dense fine-tuning of a Hugging Face model under ZeRO-3 on 2 ranks (CPU).

Builds a Llama-architecture model (random weights, saved as an HF folder with the shipped corpus' tokenizer),
then runs `dstlm fit` on 2 ranks (torchrun, gloo, DeepSpeed ZeRO-3) twice from it: dense, and RigL at
--sparsity with a mask update every 2 steps (so the update's peak is inside the run). Each run is launched
from its own wrapper process, whose RUSAGE_CHILDREN peak is the largest resident set any rank reached
(torchrun waits for its workers, so their peaks reach it). Prints both peaks and their ratio (goal <= 1.15).

    python benchmarks/hf_zero3_memory.py [--hidden 512] [--layers 6] [--steps 6] [--sparsity 0.8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def base_model(out: Path, hidden: int, layers: int) -> Path:
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dstlm.data.tokenizer import load_tokenizer
    from dstlm.hf.publish import save_tokenizer
    from dstlm.paths import default_corpus_files

    tok = load_tokenizer("bpe", default_corpus_files(), 4096)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=tok.vocab_size,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.eos_id,
                      eos_token_id=tok.eos_id)
    model = LlamaForCausalLM(cfg)
    print(f"model: Llama {layers} x {hidden}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    model.save_pretrained(str(out))
    save_tokenizer(tok, out, 256)
    return out


def peak_kb(name: str, model: Path, out: Path, steps: int, sparse: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    cmd = [sys.executable, "-c", WRAP, sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", "-m", "dstlm.cli", "fit", "--model.hf", str(model), "--name", name,
           "--out_dir", str(out / "runs"), "--data", "configs/data/shipped.yaml", "--data.batch_size", "4",
           "--data.block_size", "128", "--eval", "null", "--trainer.devices", "2",
           "--trainer.strategy", "deepspeed_stage_3", "--trainer.max_steps", str(steps),
           "--trainer.val_every_n_steps", str(steps), "--trainer.ckpt_every_n_steps", "0",
           "--trainer.progress_bar", "false", "--optim.lr", "0.0003", *sparse]
    log = out / f"{name}.log"
    with log.open("w") as f:
        r = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    (out / f"{name}.stdout").write_text(r.stdout)
    if r.returncode:
        raise SystemExit(f"{name} failed ({r.returncode}); see {log}")
    return int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("MAXRSS_KB")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--out", default="runs/hf-zero3-memory")
    a = p.parse_args()
    out = REPO / a.out
    out.mkdir(parents=True, exist_ok=True)
    model = base_model(out / "base", a.hidden, a.layers)
    dense = peak_kb("dense", model, out, a.steps, [])
    sparse = peak_kb("rigl", model, out, a.steps, ["--sparsity", "configs/sparsity/rigl.yaml", "--sparsity.sparsity",
                                                   str(a.sparsity), "--sparsity.delta_t", "2"])
    gib = 1 / 2**20
    print(f"ZeRO-3, 2 ranks (CPU): largest per-rank peak resident set, dense {dense * gib:.3f} GiB, "
          f"RigL {a.sparsity:g} {sparse * gib:.3f} GiB; ratio sparse/dense {sparse / dense:.3f} (goal <= 1.15)")


if __name__ == "__main__":
    main()
