"""One line for every error a user's input causes: the field, what is wrong, and the fix.

A config dataclass's own check arrives wrapped in jsonargparse's union and nesting errors; a value of the wrong
type arrives as jsonargparse's indented report, which for a field inside a union section (model, sparsity, ift,
model.moe) nests one report per union member. `one_line` finds dstlm's own message in the exception chain, or
else reads jsonargparse's report down to the one field at fault (`explain_parse_error`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

HINT = "fix it in the recipe or on the command line (`dstlm fit --help` lists every field)"


def one_line(err: BaseException) -> str:
    """The message a user needs, on one line: the outermost exception in err's chain that dstlm's own code
    raised, else jsonargparse's report read down to the field, else err's own message."""
    chain = [err]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    ours = [e for e in chain if isinstance(e, (ValueError, OSError, KeyError)) and _raised_in_dstlm(e)]
    chosen = ours[0] if ours else err
    text = chosen.args[0] if isinstance(chosen, KeyError) and chosen.args else str(chosen)
    if not ours:
        text = explain_parse_error(str(text)) or text
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip()) or type(err).__name__


def _raised_in_dstlm(e: BaseException) -> bool:
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(str(Path(__file__).resolve().parent) + "/")


# -- jsonargparse's reports ----------------------------------------------------------------------------------
_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_UNKNOWN = re.compile(r"^Option '([^']+)' is not accepted")
_GROUP = re.compile(r"^Group '([^']+)' does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: --([^=\s]+)")
_EXPECTED = re.compile(r"^Expected an? (.+?)\. Got value: (.*)$")
_TYPE_NAMES = {"<class 'int'>": "an integer", "<class 'float'>": "a number", "<class 'bool'>": "true or false",
               "<class 'str'>": "a string", "<class 'list'>": "a list", "<class 'dict'>": "a mapping",
               "<class 'NoneType'>": "null"}


def _type_name(text: str) -> str:
    text = text.strip()
    if text.startswith("typing.Literal["):
        return "one of " + text[len("typing.Literal["):-1]
    if text.startswith("tuple with"):
        return "a list of " + text[len("tuple with "):].replace("elements", "numbers")
    return _TYPE_NAMES.get(text, text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _items(lines: list[str], marker: str) -> list[list[str]]:
    """The blocks of `lines` that start with a line beginning (after spaces) with `marker`: that line's rest and
    every following line indented deeper than it."""
    out = []
    for i, line in enumerate(lines):
        if line.strip().startswith(marker):
            block, depth = [line.strip()[len(marker):]], _indent(line)
            for follow in lines[i + 1:]:
                if follow.strip() and _indent(follow) <= depth:
                    break
                block.append(follow)
            out.append(block)
    return out


def _explain(lines: list[str]) -> Optional[tuple[list[str], str]]:
    """(path below this point, what is wrong) from one level of jsonargparse's report."""
    lines = [line for line in lines if line.strip()]
    if not lines:
        return None
    head = lines[0].strip()
    m = _KEY.match(head)
    if m:
        below = _explain(([m.group(2)] if m.group(2) else []) + lines[1:])
        return ([m.group(1)] + below[0], below[1]) if below else ([m.group(1)], "has a value of the wrong type")
    for pattern in (_UNKNOWN, _UNRECOGNIZED):
        m = pattern.match(head)
        if m:
            return [m.group(1)], "is not a field of this section; check the spelling"
    m = _GROUP.match(head)
    if m:
        return [m.group(1), m.group(2)], "is not a field of this section; check the spelling"
    m = _EXPECTED.match(head)
    if m:
        return [], f"expected {_type_name(m.group(1))}, got {m.group(2)!r}"
    # a union: one report per member; the member that got furthest (a field inside it) is the one meant
    problems = _items(lines, "- Problem with given class_path ")
    if problems:
        def depth(block: list[str]) -> int:
            text = "\n".join(block)
            return 2 if "Parser key" in text else 1 if "Expected" in text else 0
        best = max(problems, key=depth)  # max keeps the first of equals: the member listed first
        return _explain(best[1:])
    given = [line.strip()[len("Given value: "):] for line in lines if line.strip().startswith("Given value: ")]
    expected = [_type_name(line.strip()[len("- Expected a "):]) for line in lines
                if line.strip().startswith("- Expected a ") and "path but" not in line and "dot import" not in line]
    if any("Expected a dot import path string" in line for line in lines):
        return [], f"expected a mapping of its fields, got {given[-1] if given else 'a string'!r}"
    if expected:
        return [], f"expected {' or '.join(expected)}, got {given[-1] if given else 'another value'!r}"
    text = " ".join(line.strip() for line in lines)
    return ([], text) if len(text) < 300 else None  # a report of its own (a config file that includes itself)


def explain_parse_error(text: str) -> Optional[str]:
    """'<field path>: <what is wrong>; <fix>' from jsonargparse's report, or None if it is not one."""
    if not any(marker in text for marker in ("Parser key", "is not accepted", "does not accept option",
                                             "unrecognized arguments")):
        return None
    found = _explain(text.splitlines())
    if found is None or not found[0]:
        return None
    path, what = found
    if what.startswith("is not a field"):
        return f"{'.'.join(path)} {what} (`dstlm fit --help` lists every field)"
    return f"{'.'.join(path)}: {what}; {HINT}"
