"""Make dstlm/assets/finetune/dialogue.jsonl: prompt/completion pairs of consecutive speeches from the shipped
Shakespeare corpus (the prompt is one speech and a cue naming who answers; the completion is the answer).

    .venv/bin/python benchmarks/make_dialogue_sft.py [--pairs 1500] [--out dstlm/assets/finetune/dialogue.jsonl]

Deterministic: the same corpus gives the same file. Speeches longer than --max-chars are cut at a line end.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]+|[A-Z][A-Z' ]+):$")


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) in order; a blank line ends a speech."""
    out, who, lines = [], None, []
    for line in text.splitlines() + [""]:
        m = SPEAKER.match(line.strip())
        if m and not lines:
            who = m.group(1)
        elif line.strip():
            if who is not None:
                lines.append(line.rstrip())
        else:
            if who is not None and lines:
                out.append((who, "\n".join(lines)))
            who, lines = None, []
    return out


def cut(speech: str, max_chars: int) -> str:
    kept, n = [], 0
    for line in speech.splitlines():
        if kept and n + len(line) > max_chars:
            break
        kept.append(line)
        n += len(line) + 1
    return "\n".join(kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1500)
    ap.add_argument("--max-chars", type=int, default=240)
    ap.add_argument("--out", default=str(ROOT / "dstlm" / "assets" / "finetune" / "dialogue.jsonl"))
    args = ap.parse_args()
    sp = speeches((ROOT / "dstlm" / "assets" / "corpus" / "tinyshakespeare.txt").read_text())
    rows = []
    for (a, sa), (b, sb) in zip(sp, sp[1:]):
        if a == b:
            continue
        rows.append({"prompt": f"{a}:\n{cut(sa, args.max_chars)}\n\n{b}:\n", "completion": cut(sb, args.max_chars)})
        if len(rows) == args.pairs:
            break
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} pairs -> {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
