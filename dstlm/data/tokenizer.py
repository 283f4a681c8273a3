"""Tokenizers: the shipped GPT-2 BPE, a byte-level BPE trained on the corpus (cached), or a file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import Tokenizer
from tokenizers.implementations import ByteLevelBPETokenizer

from dstlm.data.text_files import corpus_file, read_utf8
from dstlm.paths import GPT2_TOKENIZER_DIR, cache_dir

EOS = "<|endoftext|>"


class TextTokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with an end-of-text id.

    Byte-level BPE without prefix space, so decode(encode(text)) == text for any string.
    """

    def __init__(self, tokenizer: Tokenizer, name: str, eos: str = EOS, chat_template: Optional[str] = None,
                 special_tokens: Optional[dict] = None) -> None:
        self.tokenizer = tokenizer
        self.name = name
        eos_id = tokenizer.token_to_id(eos)
        if eos_id is None:
            raise ValueError(f"tokenizer {name!r} has no {eos!r} token; add it as a special token")
        self.eos = eos
        self.eos_id = eos_id
        self.chat_template = chat_template
        """A Hugging Face tokenizer folder's Jinja chat template (None: it has none)."""
        self.special_tokens = dict(special_tokens or {"eos_token": eos})
        """The named special tokens of a Hugging Face tokenizer_config.json (bos_token, eos_token, ...)."""

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json (loadable by `tokenizers` and transformers) into `directory`."""
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path


def _files_digest(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def train_bpe(files: Sequence[str], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE trained on `files`; cached by (content digest, vocab size)."""
    if vocab_size < 257:
        raise ValueError(f"data.vocab_size={vocab_size} is too small for byte-level BPE; use at least 257")
    for f in files:  # the trainer reads the files itself, and fails on a bad one without naming it
        read_utf8(corpus_file(f))
    key = f"bpe-v{vocab_size}-{_files_digest(files)}"
    path = cache_dir() / "tokenizers" / f"{key}.json"
    if not path.is_file():
        bpe = ByteLevelBPETokenizer(add_prefix_space=False)
        bpe.train(files=list(files), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                  show_progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks may train concurrently: never share a tmp file
        bpe.save(str(tmp))
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return TextTokenizer(Tokenizer.from_file(str(path)), key)


def load_tokenizer(spec: str, files: Sequence[str] = (), vocab_size: int = 4096) -> TextTokenizer:
    """Resolve `spec`:

    - "gpt2": the GPT-2 BPE shipped with dstlm (vocab 50257);
    - "bpe": byte-level BPE with `vocab_size` trained on `files` (cached);
    - a path to tokenizer.json, or to a directory holding tokenizer.json or vocab.json + merges.txt.
    """
    if spec == "gpt2":
        bpe = ByteLevelBPETokenizer(str(GPT2_TOKENIZER_DIR / "vocab.json"), str(GPT2_TOKENIZER_DIR / "merges.txt"),
                                    add_prefix_space=False)
        return TextTokenizer(bpe._tokenizer, "gpt2")
    if spec == "bpe":
        if not files:
            raise ValueError("data.tokenizer='bpe' needs corpus files to train on")
        return train_bpe(files, vocab_size)
    path = Path(spec)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            hf = hf_tokenizer_config(path)
            if hf is not None:  # a Hugging Face model folder: its own end-of-text token and chat template
                return TextTokenizer(Tokenizer.from_file(str(path / "tokenizer.json")), str(path), **hf)
            path = path / "tokenizer.json"
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            bpe = ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"), add_prefix_space=False)
            return TextTokenizer(bpe._tokenizer, str(path))
    if path.is_file():
        return TextTokenizer(Tokenizer.from_file(str(path)), str(path))
    raise FileNotFoundError(
        f"data.tokenizer={spec!r} not found; use 'gpt2', 'bpe', a tokenizer.json file, or a directory with "
        f"tokenizer.json or vocab.json + merges.txt"
    )


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def hf_tokenizer_config(directory: Path) -> Optional[dict]:
    """{eos, chat_template, special_tokens} of a Hugging Face tokenizer folder (None: no tokenizer_config.json).

    The chat template is the folder's chat_template.jinja, else tokenizer_config.json's `chat_template` (a
    string, or a list of named templates of which the one named "default")."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    special = {}
    for key in SPECIAL_TOKENS:
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    template = cfg.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    if "eos_token" not in special:
        return None
    return {"eos": special["eos_token"], "chat_template": template, "special_tokens": special}


def tokenizer_from_json(text: str, name: str = "checkpoint", eos: str = EOS, chat_template: Optional[str] = None,
                        special_tokens: Optional[dict] = None) -> TextTokenizer:
    """A tokenizer from its serialized tokenizer.json text (as embedded in dstlm checkpoints)."""
    return TextTokenizer(Tokenizer.from_str(text), name, eos, chat_template, special_tokens)


def tokenizer_fingerprint(tok: TextTokenizer) -> str:
    """Stable digest of a tokenizer's full definition (for cache keys and checkpoint checks)."""
    return hashlib.sha256(json.dumps(json.loads(tok.tokenizer.to_str()), sort_keys=True).encode()).hexdigest()[:16]
