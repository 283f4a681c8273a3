"""The layering of docs/architecture.md, checked on the source: imports under dstlm/ form a DAG (function-level
imports included: a lazy import is still a dependency), the plain-torch core imports no training stack, and
the model files know nothing of sparsity, transforms or training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dstlm"
HEAVY = ("lightning", "pytorch_lightning", "deepspeed", "transformers", "lm_eval", "datasets", "tokenizers")


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module this file imports, at any depth of the file (absolute names). `from pkg import mod` is an
    edge to pkg.mod alone when mod is a module, else to pkg."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):  # TYPE_CHECKING imports count too
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                pkg = module_name(path).split(".")
                pkg = pkg[: len(pkg) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join(pkg + [node.module])
            subs = {f"{base}.{a.name}" for a in node.names}
            known = {m for m in subs if m in MODULE_FILES}
            out.update(known)
            if known != subs:
                out.add(base)
    return out


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}
MODULE_FILES = set(MODULES)
GRAPH = {m: {i for i in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_the_walk_sees_the_package():
    assert {"dstlm.sparse.engine", "dstlm.models.gpt", "dstlm.build", "dstlm.transforms.ift"} <= set(MODULES)
    assert "dstlm.sparse.methods" in GRAPH["dstlm.sparse.engine"]  # a known edge is found


def test_no_import_cycle_under_dstlm():
    cycle = find_cycle(GRAPH)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():  # the checker itself can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


DOC = PKG.parent / "docs" / "architecture.md"


def layer_table(text: str) -> list[list[str]]:
    """The layers of docs/architecture.md's table, bottom first: each a list of module names."""
    import re

    block = text.split("<!-- layers:", 1)[1].split("```", 2)[1]
    layers: list[list[str]] = []
    for line in block.splitlines()[1:]:
        names = [w for w in line.split() if re.fullmatch(r"dstlm(\.\w+)*", w)]
        if re.match(r"\d+\s", line):
            layers.append(names)
        elif names and layers:
            layers[-1] += names
    return layers[::-1]


LAYERS = layer_table(DOC.read_text())


def home(module: str, layers: list[list[str]]) -> tuple[int, str]:
    """(layer, the table's name that places `module`): the longest name matching it."""
    found = [(len(n), i, n) for i, names in enumerate(layers) for n in names
             if module == n or module.startswith(n + ".")]
    if not found:
        raise AssertionError(f"{module} is on no layer of docs/architecture.md's table; add it there")
    _, i, name = max(found)
    return i, name


def package(name: str) -> str:
    """A module's package for the same-layer rule: dstlm.hf for dstlm.hf.*, the module itself at the top."""
    parts = name.split(".")
    return ".".join(parts[:2])


def violations(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Imports that go up a layer, or across packages on one layer."""
    bad = []
    for m, deps in sorted(graph.items()):
        lm, nm = home(m, layers)
        for d in sorted(deps):
            ld, nd = home(d, layers)
            if ld > lm or (ld == lm and package(nm) != package(nd)):
                bad.append(f"{m} (layer {lm}) imports {d} (layer {ld})")
    return bad


def test_every_import_follows_the_layer_table():
    assert len(LAYERS) >= 8 and LAYERS[0][0] == "dstlm"
    bad = violations(GRAPH, LAYERS)
    assert not bad, bad


def test_the_layer_check_catches_a_planted_upward_import_on_every_layer():
    """One module of each layer made to import one of the layer above: each plant is reported. And one
    cross-package import on one layer (the sparse core importing the models)."""
    placed = {i: sorted(m for m in MODULES if home(m, LAYERS)[0] == i) for i in range(len(LAYERS))}
    for i in range(len(LAYERS) - 1):
        low, high = placed[i][0], placed[i + 1][0]
        planted = {m: set(d) for m, d in GRAPH.items()}
        planted[low].add(high)
        assert violations(planted, LAYERS) == [f"{low} (layer {i}) imports {high} (layer {i + 1})"]
    planted = {m: set(d) for m, d in GRAPH.items()}
    planted["dstlm.sparse.engine"].add("dstlm.models.gpt")
    assert violations(planted, LAYERS) == ["dstlm.sparse.engine (layer 1) imports dstlm.models.gpt (layer 1)"]


@pytest.mark.parametrize("layer, forbidden", [
    ("dstlm.sparse", HEAVY + ("dstlm.training", "dstlm.eval", "dstlm.hf", "dstlm.models", "dstlm.transforms")),
    ("dstlm.models", HEAVY + ("dstlm.sparse", "dstlm.transforms", "dstlm.training", "dstlm.eval", "dstlm.hf",
                              "dstlm.build")),
    ("dstlm.transforms", HEAVY + ("dstlm.training", "dstlm.eval", "dstlm.hf")),
])
def test_layers_import_only_what_they_may(layer, forbidden):
    bad = [(m, i) for m, p in MODULES.items() if m == layer or m.startswith(layer + ".")
           for i in imports_of(p) if any(i == f or i.startswith(f + ".") for f in forbidden)]
    assert not bad, f"{layer} imports {bad}"


def test_sparse_core_loads_without_the_training_stack():
    """Importing the whole sparse core pulls in none of the heavy libraries (checked in a fresh interpreter)."""
    code = ("import sys, dstlm.sparse, dstlm.sparse.engine, dstlm.sparse.methods, dstlm.sparse.flops, "
            "dstlm.sparse.rules; print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_sparse_core_functions_are_short():
    """No function in dstlm/sparse is longer than 40 lines (its docstring included); `make lint` holds their
    cyclomatic complexity to 12."""
    long = []
    for path in sorted((PKG / "sparse").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 40:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
