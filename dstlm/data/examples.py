"""Fine-tuning examples: prompt/completion and chat rows -> token rows whose loss counts the answers only.

Three kinds of .jsonl/.json rows (the conventions of TRL and the Hugging Face hub):

- prompt/completion strings, ``{"prompt": "Q: 2+2?\\nA:", "completion": " 4"}``: the text is prompt +
  completion (tokenized as one text, exactly as it is read at inference) followed by the end-of-text token;
  the completion's tokens and the end-of-text token count in the loss.
- prompt/completion conversations, ``{"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant",
  ...}]}``: rendered with the chat template; the assistant turns of the completion count.
- conversations, ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}``: rendered
  with the chat template; every assistant turn counts (what the template writes for it, its end-of-turn
  marker included, after the generation prompt that precedes it).

A token counts when its characters overlap a counted span of the text. Chat templates are rendered by
transformers' own renderer (the sandbox and filters of `apply_chat_template`), and a counted turn's span is
found by rendering the conversation up to it, with the generation prompt, and up to its end; a template that
does not render conversations prefix by prefix cannot be masked this way and is refused.

Rows are then laid out one example per row (padded; the padding never counts) or, with packing, whole examples
one after another (an example that does not fit the rest of a row starts the next one). An example longer than
a row is cut at the row's end; one whose counted tokens all fall beyond it is dropped. Both are reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

FORMATS = ("auto", "text", "prompt_completion", "messages")


@dataclass
class ExampleFields:
    """Which fields of a row hold what (data.prompt_field, ...)."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"


def file_kind(columns: Sequence[str], fmt: str, fields: ExampleFields, name: str) -> str:
    """'text', 'prompt_completion' or 'messages' for a file with these columns under data.format `fmt`."""
    if fmt == "auto":
        if fields.messages in columns:
            return "messages"
        if fields.prompt in columns and fields.completion in columns:
            return "prompt_completion"
        return "text"
    need = {"text": [fields.text], "prompt_completion": [fields.prompt, fields.completion],
            "messages": [fields.messages]}[fmt]
    missing = [f for f in need if f not in columns]
    if missing:
        raise ValueError(f"{name}: data.format={fmt!r} needs the field(s) {missing} but the rows have "
                         f"{list(columns)}; set data.format (or the data.*_field names) to match the file")
    return fmt


class ChatTemplate:
    """A Jinja chat template and the special tokens it may refer to, rendered as transformers renders it."""

    def __init__(self, source: str, special_tokens: Optional[dict] = None, name: str = "chat template") -> None:
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        self.name = name

    @classmethod
    def from_file(cls, path: str, special_tokens: Optional[dict] = None) -> "ChatTemplate":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"data.chat_template={path!r} is not a file; give a .jinja template file, "
                                    f"'auto' (the tokenizer's own) or 'none'")
        return cls(p.read_text(), special_tokens, str(p))

    def render(self, messages: list, add_generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], chat_template=self.source,
                                            add_generation_prompt=add_generation_prompt, **self.special_tokens)
        return rendered[0]

    def spans(self, messages: list, first_counted: int = 0) -> tuple[str, list[tuple[int, int]]]:
        """(rendered conversation, [(start, end) characters of every assistant turn from `first_counted` on])."""
        text = self.render(messages)
        spans = []
        for i in range(first_counted, len(messages)):
            if messages[i].get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ValueError(f"{self.name} does not render a conversation prefix by prefix (turn {i}), so the "
                                 f"assistant's tokens cannot be told apart; give data.chat_template a template "
                                 f"that does, or write the rows as prompt/completion strings")
            spans.append((len(before), len(upto)))
        return text, spans


@dataclass
class Example:
    text: str
    spans: list[tuple[int, int]]
    add_special_tokens: bool  # the tokenizer's own BOS etc. (plain text); a rendered template has its own
    append_eos: bool


def _is_chat(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def to_example(row: dict, kind: str, fields: ExampleFields, template: Optional[ChatTemplate], name: str) -> Example:
    """One row as text with the character spans whose tokens count in the loss."""
    if kind == "prompt_completion":
        prompt, completion = row[fields.prompt], row[fields.completion]
        if isinstance(prompt, str) and isinstance(completion, str):
            return Example(prompt + completion, [(len(prompt), len(prompt) + len(completion))], True, True)
        if _is_chat(prompt) and _is_chat(completion):
            text, spans = _need(template, name).spans(list(prompt) + list(completion), first_counted=len(prompt))
            return Example(text, spans, False, False)
        raise ValueError(f"{name}: a row's {fields.prompt!r} and {fields.completion!r} must both be strings or both "
                         f"lists of messages, got {type(prompt).__name__} and {type(completion).__name__}")
    messages = row[fields.messages]
    if not _is_chat(messages):
        raise ValueError(f"{name}: {fields.messages!r} must be a list of {{'role', 'content'}} messages, "
                         f"got {type(messages).__name__}")
    text, spans = _need(template, name).spans(list(messages))
    return Example(text, spans, False, False)


def _need(template: Optional[ChatTemplate], name: str) -> ChatTemplate:
    if template is None:
        raise ValueError(f"{name} holds conversations but the tokenizer has no chat template (or "
                         f"data.chat_template='none'); set data.chat_template to a .jinja file, or write the rows "
                         f"as prompt/completion strings")
    return template


def tokenize_example(tok, ex: Example) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, counted) of one example: a token counts when its characters overlap a counted span."""
    enc = tok.tokenizer.encode(ex.text, add_special_tokens=ex.add_special_tokens)
    ids = np.asarray(enc.ids, dtype=np.int64)
    offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    nonempty = offsets[:, 1] > offsets[:, 0]  # tokens the post-processor adds (BOS) cover no characters
    counted = np.zeros(len(ids), dtype=bool)
    for s, e in ex.spans:
        counted |= nonempty & (offsets[:, 0] < e) & (offsets[:, 1] > s)
    if ex.append_eos:
        ids = np.append(ids, tok.eos_id)
        counted = np.append(counted, True)
    return ids, counted


@dataclass
class RowStats:
    examples: int = 0
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0  # real (non-padding) tokens in the rows
    counted: int = 0  # targets that count in the loss
    notes: list = field(default_factory=list)


def lay_out(examples: Sequence[tuple[np.ndarray, np.ndarray]], block_size: int, pad_id: int,
            packing: bool) -> tuple[np.ndarray, np.ndarray, RowStats]:
    """(tokens (n, block_size + 1), counted (n, block_size + 1) bool, stats). Row position j's target flag is
    counted[j]: the inputs are row[:-1], the targets row[1:] (so position 0 never counts)."""
    width = block_size + 1
    stats = RowStats(examples=len(examples))
    rows_t: list[np.ndarray] = []
    rows_c: list[np.ndarray] = []
    cur_t, cur_c, used = np.full(width, pad_id, np.int64), np.zeros(width, bool), 0

    def flush():
        nonlocal cur_t, cur_c, used
        if used:
            rows_t.append(cur_t)
            rows_c.append(cur_c)
        cur_t, cur_c, used = np.full(width, pad_id, np.int64), np.zeros(width, bool), 0

    for ids, counted in examples:
        if len(ids) > width:
            stats.truncated += 1
            ids, counted = ids[:width], counted[:width]
        if not packing or used + len(ids) > width:
            flush()
        if not counted[1 if used == 0 else 0:].any():
            stats.dropped += 1  # nothing of the answer fits in a row (a row's first token is no one's target)
            continue
        cur_t[used: used + len(ids)] = ids
        cur_c[used: used + len(ids)] = counted
        used += len(ids)
        stats.tokens += len(ids)
    flush()
    tokens = np.stack(rows_t) if rows_t else np.zeros((0, width), np.int64)
    counted = np.stack(rows_c) if rows_c else np.zeros((0, width), bool)
    stats.rows = len(tokens)
    stats.counted = int(counted.sum())
    return tokens, counted, stats


def split_examples(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) example indices: a fixed pseudo-random val_fraction held out (the same for every run and
    seed, so runs compare on one validation set), each side in file order."""
    n_val = int(round(n * val_fraction))
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    held = np.random.default_rng(0).permutation(n)[:n_val]
    is_val = np.zeros(n, bool)
    is_val[held] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# -- reading rows ---------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """The rows of a .jsonl (one JSON object per line) or .json (a list of objects) file, exactly as written."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json data file must hold a list of rows; write one object per line "
                             f"to a .jsonl file instead")
        return rows
    rows = []
    for k, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{k}: not a JSON object ({e.msg}); fix the line") from None
    return rows


def first_row_columns(path: Path) -> list[str]:
    """The fields of a JSON-lines file's first row (of a .json file's first element)."""
    if path.suffix == ".json":
        rows = read_rows(path)
        return list(rows[0]) if rows else []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                return list(row) if isinstance(row, dict) else []
    return []


def _drop_nones(value):
    """Arrow-backed datasets give every message every key seen in any message (None where absent); templates
    test `'key' in message`, so the Nones go."""
    if isinstance(value, list):
        return [_drop_nones(v) for v in value]
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    return value


def dataset_rows(ds) -> list[dict]:
    return [_drop_nones(r) for r in ds.to_list()]


# -- building the token rows -------------------------------------------------------------------------------
def example_arrays(sources: Sequence[tuple[str, str, list[dict]]], tok, template: Optional[ChatTemplate],
                   fields: ExampleFields, block_size: int, val_fraction: float, packing: bool,
                   dtype) -> tuple[dict[str, np.ndarray], dict]:
    """({train, val, train_counted, val_counted}, meta) from (name, kind, rows) sources."""
    examples = []
    for name, kind, rows in sources:
        for k, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"{name}: row {k + 1} is a {type(row).__name__}, not an object")
            examples.append(tokenize_example(tok, to_example(row, kind, fields, template, f"{name} (row {k + 1})")))
    if not examples:
        raise ValueError(f"no fine-tuning examples in {', '.join(n for n, _, _ in sources)}; add rows")
    train_idx, val_idx = split_examples(len(examples), val_fraction)
    arrays, meta = {}, {"examples": len(examples), "packing": packing}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        tokens, counted, stats = lay_out([examples[i] for i in idx], block_size, tok.eos_id, packing)
        arrays[split] = tokens.astype(dtype)
        arrays[f"{split}_counted"] = counted
        meta[split] = {"examples": stats.examples, "rows": stats.rows, "truncated": stats.truncated,
                       "dropped": stats.dropped, "tokens": stats.tokens, "counted": stats.counted}
        if stats.examples and not stats.rows:
            raise ValueError(f"all {stats.examples:,} {split} examples were dropped: not one answer token fits in "
                             f"data.block_size={block_size} after its prompt; raise data.block_size (and the "
                             f"model's context) or shorten the prompts")
    meta["train_tokens"], meta["val_tokens"] = meta["train"]["tokens"], meta["val"]["tokens"]
    return arrays, meta


def describe(meta: dict, block_size: int) -> str:
    """One line on what the examples became."""
    t, v = meta["train"], meta["val"]
    width = block_size * max(1, t["rows"])
    line = (f"data: {meta['examples']:,} fine-tuning examples ({t['examples']:,} train, {v['examples']:,} val) -> "
            f"{t['rows']:,} + {v['rows']:,} rows of {block_size} tokens, "
            f"{'packed' if meta['packing'] else 'one example per row'}; {100 * t['counted'] / width:.1f} % of train "
            f"targets count in the loss")
    cut = t["truncated"] + v["truncated"]
    dropped = t["dropped"] + v["dropped"]
    if cut or dropped:
        line += (f"; {cut:,} examples cut at the row's end, {dropped:,} of them dropped (no answer token fits): raise "
                 f"data.block_size to keep them")
    return line
