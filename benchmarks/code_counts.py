"""Size and complexity of the package: files and lines per package, the longest function, and the highest
cyclomatic complexity (ruff's C901 count, the one `make lint` enforces).

    python benchmarks/code_counts.py [DIR]      # DIR: a dstlm source folder (default: this checkout's)
"""

from __future__ import annotations

import ast
import collections
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def counts(root: Path) -> dict:
    packages: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    longest = (0, "")
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        key = rel.parts[0] + "/" if len(rel.parts) > 1 else "(top-level modules)"
        text = path.read_text()
        packages[key][0] += 1
        packages[key][1] += len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > longest[0]:
                    longest = (n, f"{rel}:{node.lineno} {node.name}")
    ruff = ROOT / ".venv" / "bin" / "ruff"
    out = subprocess.run([str(ruff), "check", "--select", "C901", "--config", "lint.mccabe.max-complexity=0",
                          "--output-format", "concise", str(root)], capture_output=True, text=True).stdout
    found = _complexities(out, root)
    return {"packages": dict(packages), "longest": longest, "complexities": found}


def _complexities(ruff_output: str, root: Path) -> list[tuple[int, str]]:
    out = []
    for line in ruff_output.splitlines():
        m = re.match(r"(\S+?):(\d+):\d+: C901 `(\w+)` is too complex \((\d+) > 0\)", line)
        if m:
            out.append((int(m.group(4)), f"{Path(m.group(1)).resolve().relative_to(root)}:{m.group(2)} {m.group(3)}"))
    return sorted(out, reverse=True)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "dstlm"
    c = counts(root.resolve())
    for key, (files, lines) in sorted(c["packages"].items()):
        print(f"{key:<22} {files:>3} files {lines:>6} lines")
    print(f"{'total':<22} {sum(v[0] for v in c['packages'].values()):>3} files "
          f"{sum(v[1] for v in c['packages'].values()):>6} lines")
    print(f"longest function: {c['longest'][0]} lines, {c['longest'][1]}")
    top = c["complexities"][:3]
    print("highest complexity: " + "; ".join(f"{n} {where}" for n, where in top))
    print(f"functions above 15: {sum(1 for n, _ in c['complexities'] if n > 15)}")


if __name__ == "__main__":
    main()
