"""Where dstlm finds its shipped assets, config fragments and caches."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
CORPUS_DIR = ASSETS_DIR / "corpus"
GPT2_TOKENIZER_DIR = ASSETS_DIR / "tokenizers" / "gpt2"
# The repository root (configs/, recipes/) when dstlm runs from a clone (editable install).
REPO_DIR = PACKAGE_DIR.parent


def configs_dir() -> Path:
    """Directory of the YAML config fragments (override with DSTLM_CONFIGS)."""
    return Path(os.environ.get("DSTLM_CONFIGS", REPO_DIR / "configs"))


def cache_dir() -> Path:
    """Cache for trained tokenizers and packed token blocks (override with DSTLM_CACHE)."""
    path = Path(os.environ.get("DSTLM_CACHE", REPO_DIR / ".cache" / "dstlm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def extensions_dir() -> Path:
    """Where compiled ops are built at first use (DeepSpeed's and dstlm's own): TORCH_EXTENSIONS_DIR, else the
    project's ignored cache."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", REPO_DIR / ".cache" / "torch_extensions"))


def prepare_deepspeed_env(cpu: bool) -> None:
    """Must run before deepspeed is imported (by training, or by checkpoint reading a ZeRO checkpoint): the CPU
    accelerator, op builds cached in the project."""
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))


def default_corpus_files() -> list[str]:
    return sorted(str(p) for p in CORPUS_DIR.glob("*.txt"))
