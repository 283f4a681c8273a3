"""Tokenize documents and pack them into fixed-length blocks cached on disk.

Every document ends with the end-of-text token. The last `val_fraction` of each document's tokens is
held out for validation, so both splits see every source and never overlap. Each split is one token
stream cut into blocks of `block_size + 1` tokens with stride `block_size`: block i gives inputs
tokens[i*T : i*T+T] and targets shifted by one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from dstlm.data.text_files import corpus_file, read_utf8
from dstlm.data.tokenizer import TextTokenizer, tokenizer_fingerprint
from dstlm.models.lm_loss import IGNORE_INDEX
from dstlm.paths import cache_dir


def load_documents(files: Sequence[str] = (), hf_dataset: Optional[str] = None, hf_split: str = "train",
                   text_field: str = "text") -> list[str]:
    """Documents as strings: each .txt file is one document; each row of a .jsonl/.json file is one document
    (its `text_field`); or rows of a Hugging Face dataset by name (through `datasets`). Empty documents are
    skipped; bytes that are not UTF-8, a line that is not JSON, a row without the field or with a non-text value
    end in one line naming the file and the line."""
    if hf_dataset:
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset(hf_dataset, split=hf_split, cache_dir=str(cache_dir() / "datasets"))
        return [t for t in ds[text_field] if t]
    docs: list[str] = []
    for f in files:
        path = corpus_file(f)
        text = read_utf8(path)
        if path.suffix in (".jsonl", ".json"):
            docs.extend(_texts_of_rows(path, text, text_field))
        elif text:
            docs.append(text.replace("\r\n", "\n").replace("\r", "\n"))  # as Python's text mode reads it
    if files and not docs:
        raise ValueError(f"data.files hold no text ({', '.join(map(str, files))}: empty, or only empty rows); give "
                         f"files with text, or leave data.files empty for the shipped corpus")
    return docs


def _texts_of_rows(path: Path, text: str, field: str) -> list[str]:
    """The `field` of every row of a .jsonl file (one object per line) or .json file (a list of objects)."""
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json corpus must hold a list of rows; or write one object per line to a "
                             f".jsonl file")
        numbered = list(enumerate(rows, 1))
        where = "row"
    else:
        numbered = []
        for k, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((k, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{k}: not a JSON object ({e.msg}); fix the line") from None
        where = "line"
    out = []
    for k, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{k}: {where} {k} is a {type(row).__name__}, not an object with a {field!r} "
                             f"field")
        if field not in row:
            raise ValueError(f"{path}:{k}: {where} {k} has no field {field!r} (it has {sorted(row)[:8]}); fix the "
                             f"row or set data.text_field")
        value = row[field]
        if value is None or value == "":
            continue  # an empty document
        if not isinstance(value, str):
            raise ValueError(f"{path}:{k}: {where} {k}'s {field!r} is a {type(value).__name__}, not text; fix the row")
        out.append(value)
    return out


def split_and_stream(token_docs: Sequence[Sequence[int]], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents into a train and a validation stream (tail of each document held out)."""
    train, val = [], []
    for ids in token_docs:
        n_val = int(round(len(ids) * val_fraction))
        train.append(np.asarray(ids[: len(ids) - n_val], dtype=np.int64))
        val.append(np.asarray(ids[len(ids) - n_val:], dtype=np.int64))
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(train), cat(val)


def pack(stream: np.ndarray, block_size: int) -> np.ndarray:
    """Cut a token stream into (n_blocks, block_size + 1) rows, consecutive rows sharing one token."""
    n = (len(stream) - 1) // block_size
    if n <= 0:
        return np.zeros((0, block_size + 1), dtype=stream.dtype)
    idx = np.arange(n)[:, None] * block_size + np.arange(block_size + 1)[None, :]
    return stream[idx]


@dataclass
class PackedSplits:
    train: np.ndarray  # (n_train, block_size + 1)
    val: np.ndarray  # (n_val, block_size + 1)
    n_tokens: dict
    train_counted: Optional[np.ndarray] = None  # (n_train, block_size + 1) bool: target counts (None: all)
    val_counted: Optional[np.ndarray] = None


def cached_splits(key_parts: list, make: Callable[[], tuple[dict[str, np.ndarray], dict]]) -> PackedSplits:
    """The arrays `make` returns ({train, val[, train_counted, val_counted]}, meta), cached under
    .cache/dstlm/packed/<digest of key_parts>/ (computed once, memory-mapped after)."""
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    out = cache_dir() / "packed" / key
    if not (out / "meta.json").is_file():
        arrays, meta = make()
        out.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            tmp = out / f"{name}.{os.getpid()}.npy"  # ranks may build concurrently: never share a tmp file
            np.save(tmp, array)
            tmp.replace(out / f"{name}.npy")
        meta = {**meta, "arrays": sorted(arrays)}
        tmp = out / f"meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(out / "meta.json")  # meta written last marks the cache complete
    meta = json.loads((out / "meta.json").read_text())
    arrays = {name: np.load(out / f"{name}.npy", mmap_mode="r") for name in meta.get("arrays", ["train", "val"])}
    return PackedSplits(arrays["train"], arrays["val"], meta, arrays.get("train_counted"), arrays.get("val_counted"))


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.int32


def build_packed(docs_key: str, docs_loader, tok: TextTokenizer, block_size: int, val_fraction: float) -> PackedSplits:
    """Packed train/val blocks of plain-text documents (every target counts)."""
    def make():
        docs = docs_loader()
        token_docs = [ids + [tok.eos_id] for ids in tok.encode_batch(docs)]
        train, val = split_and_stream(token_docs, val_fraction)
        dtype = token_dtype(tok.vocab_size)
        arrays = {"train": pack(train, block_size).astype(dtype), "val": pack(val, block_size).astype(dtype)}
        return arrays, {"train_tokens": int(len(train)), "val_tokens": int(len(val)), "documents": len(docs)}

    return cached_splits([docs_key, tokenizer_fingerprint(tok), block_size, val_fraction], make)


class BlockDataset(torch.utils.data.Dataset):
    """Item i -> (inputs (T,), targets (T,)) as int64 tensors from a packed block array; targets that do not
    count (`counted` False: prompts, padding) are -100. Item (i, n) -> (inputs, targets, n): the batch sampler
    passes each micro-batch the number of counted targets in its whole optimizer step (see LMModule)."""

    def __init__(self, blocks: np.ndarray, counted: Optional[np.ndarray] = None) -> None:
        self.blocks = blocks
        self.counted = counted

    def __len__(self) -> int:
        return len(self.blocks)

    def targets_counted(self) -> Optional[np.ndarray]:
        """Counted targets per item (None: every target counts)."""
        return None if self.counted is None else np.asarray(self.counted[:, 1:]).sum(axis=1)

    def __getitem__(self, key):
        i, n = key if isinstance(key, tuple) else (key, None)
        row = torch.from_numpy(np.asarray(self.blocks[i], dtype=np.int64))
        x, y = row[:-1], row[1:]
        if self.counted is not None:
            y = y.masked_fill(~torch.from_numpy(np.array(self.counted[i][1:], dtype=bool)), IGNORE_INDEX)
        return (x, y) if n is None else (x, y, n)
