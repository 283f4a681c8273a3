"""Tiny configs shared by the tests: a 2-layer 32-wide GPT on a 150 kB slice of the shipped corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from dstlm.models.gpt import GPTConfig  # noqa: E402
from dstlm.paths import CORPUS_DIR  # noqa: E402
from dstlm.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> list[str]:
    """Two documents: 100 kB of Shakespeare and 50 kB of Austen."""
    d = tmp_path_factory.mktemp("corpus")
    a = d / "shakespeare.txt"
    a.write_text((CORPUS_DIR / "tinyshakespeare.txt").read_text()[:100_000])
    b = d / "austen.txt"
    b.write_text((CORPUS_DIR / "austen-persuasion.txt").read_text()[:50_000])
    return [str(a), str(b)]


def tiny_run(out_dir, files, **over) -> RunConfig:
    """A RunConfig that trains in seconds; keyword groups override fields: model={...}, trainer={...}."""
    model = dict(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32)
    data = dict(files=files, tokenizer="bpe", vocab_size=512, block_size=32, batch_size=8, val_batches=2)
    optim = dict(lr=3e-3, warmup_steps=2)
    trainer = dict(max_steps=6, val_every_n_steps=3, log_every_n_steps=1, ckpt_every_n_steps=0,
                   progress_bar=False, accelerator="cpu")
    model.update(over.pop("model", {}))
    data.update(over.pop("data", {}))
    optim.update(over.pop("optim", {}))
    trainer.update(over.pop("trainer", {}))
    return RunConfig(name=over.pop("name", "t"), out_dir=str(out_dir), model=GPTConfig(**model),
                     data=DataConfig(**data), optim=OptimConfig(**optim), trainer=TrainerConfig(**trainer), **over)


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`dstlm ARGV` in this process: (exit code, stderr). An exception escaping main() propagates (a traceback is
    a failure of every bad-input test)."""
    import contextlib
    import io

    from dstlm.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    return code, err.getvalue()


def error_line(stderr: str) -> str:
    """The one `dstlm: error:` line of a failed command (asserting there is exactly one)."""
    lines = [line for line in stderr.splitlines() if line.startswith("dstlm: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory, small_corpus) -> dict:
    """Tiny GPT-2, Llama and Mixtral checkpoints saved as Hugging Face folders (BPE tokenizer of the corpus)."""
    from dstlm.data.tokenizer import load_tokenizer
    from helpers.hf_models import save_tiny

    tok = load_tokenizer("bpe", small_corpus, 512)
    root = tmp_path_factory.mktemp("hf")
    return {k: save_tiny(k, root / k, tok) for k in ("gpt2", "llama", "mixtral")}


@pytest.fixture(autouse=True)
def _no_leaked_rendezvous_env():
    """In-process Lightning/DeepSpeed runs export MASTER_PORT & co and keep their store listening; a later
    subprocess inheriting them would try to bind the same port. Restore the environment after each test."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
