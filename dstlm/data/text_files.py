"""Corpus files as text: the one place that turns a missing file, a directory or bytes that are not UTF-8 into
one line naming the file (and the line), before the tokenizer trainer or the packer reads it."""

from __future__ import annotations

from pathlib import Path


def corpus_file(f: str) -> Path:
    """`f` as a Path, if it is a readable file; else one line naming it and the fix."""
    path = Path(f)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"corpus file {f!r} {what}; fix data.files (or leave it empty for the shipped "
                                f"corpus)")
    return path


def read_utf8(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is refused with the file, line and offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: byte {data[e.start]:#04x} at offset {e.start} is not UTF-8; convert the "
                         f"file (e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix})") from None
