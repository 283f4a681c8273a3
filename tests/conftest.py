"""Tiny configs shared by the tests: a 2-layer 32-wide GPT on a 150 kB slice of the shipped corpus."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # 2 workers on 2 cores: one thread each, or their threads spin on each other
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from dstlm.models.gpt import GPTConfig  # noqa: E402
from dstlm.paths import CORPUS_DIR  # noqa: E402
from dstlm.training.config import DataConfig, OptimConfig, RunConfig, TrainerConfig  # noqa: E402
import helpers.faults  # noqa: E402,F401 (the fault plug-in, for runs in this process; inert unless DSTLM_FAULT is set)

REPO = Path(__file__).resolve().parents[1]


_SHARED_ENV = "DSTLM_TEST_SHARED_DIR"


@pytest.fixture(scope="session", autouse=True)
def _shared_dir(tmp_path_factory) -> Path:
    """A folder of this pytest run for results that tests share (`shared_result`). Under pytest-xdist every
    worker has its own base temp folder inside the run's; the shared folder sits beside them, so workers share
    it, and a later pytest run never sees it."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    os.environ[_SHARED_ENV] = str(root)
    return root


def shared_result(key: str, make: Callable[[Path], None]) -> Path:
    """The folder in which `make(folder)` wrote the result named by `key`, made once per pytest run.

    Expensive, deterministic work (a reference training run) is keyed by everything that determines it; the first
    test that asks makes it, every later one (in any worker; a worker asking meanwhile waits on a file lock) reads
    the same folder. A `make` that raises leaves nothing behind, so the next test that asks tries again. Tests
    read shared folders and never change them."""
    root = Path(os.environ[_SHARED_ENV])
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                make(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            done.write_text(key)
    return folder


@pytest.fixture(scope="session")
def small_corpus(_shared_dir) -> list[str]:
    """Two documents: 100 kB of Shakespeare and 50 kB of Austen (one copy for every worker: the paths are part of
    the shared runs' keys)."""
    def make(d: Path) -> None:
        (d / "shakespeare.txt").write_text((CORPUS_DIR / "tinyshakespeare.txt").read_text()[:100_000])
        (d / "austen.txt").write_text((CORPUS_DIR / "austen-persuasion.txt").read_text()[:50_000])

    d = shared_result("small_corpus", make)
    return [str(d / "shakespeare.txt"), str(d / "austen.txt")]


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
def hf_dirs(small_corpus) -> dict:
    """Tiny GPT-2, Llama and Mixtral checkpoints saved as Hugging Face folders (BPE tokenizer of the corpus), one
    copy for every worker."""
    from dstlm.data.tokenizer import load_tokenizer
    from helpers.hf_models import save_tiny

    kinds = ("gpt2", "llama", "mixtral")

    def make(root: Path) -> None:
        tok = load_tokenizer("bpe", small_corpus, 512)
        for k in kinds:
            save_tiny(k, root / k, tok)

    root = shared_result(f"hf_dirs {small_corpus}", make)
    return {k: root / k for k in kinds}


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


# tests that must not run beside each other, as prefixes of their node ids: one SLURM at a time (fixed ports, one
# munged), so both SLURM files run on one worker, one after the other
ONE_WORKER = {"slurm": ("tests/test_slurm.py::", "tests/test_slurm_multinode.py::")}


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`make test` runs 2 workers): each test is its own unit of work, except the ONE_WORKER
    groups, each handed to one worker whole. Units go out largest first (xdist's scope scheduling), so a group
    starts at once instead of ending the run on one worker. (xdist's own xdist_group marker does not reach the
    scheduler with pytest 9.)"""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return next((g for g, prefixes in ONE_WORKER.items() if nodeid.startswith(prefixes)), nodeid)

    return Scheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, hand out the multi-process runs before the rest (each in collection order): a long test
    handed out last keeps one worker busy while the other has nothing left to do."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: 0 if item.get_closest_marker("dist") else 1)  # stable
