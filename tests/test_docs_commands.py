"""The commands in README.md and docs/ run as written: every one is extracted from the bash blocks and accounted
for. `dstlm` command lines are parsed by dstlm's own command-line parser into the config they would run (recipe
files, option names, types and every config check); make targets, scripts and benchmark options must exist; and
the cheap ones run for real. The commands that train for minutes to hours are run by hand (docs/testing.md)."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path


from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# a synopsis, not a command: placeholders in capitals or <angle brackets>, optional parts in [brackets]
PLACEHOLDER = re.compile(r"(^|\s)(RECIPE|R\.yaml)\b|<[^>]+>|\s\[--|^\s*\[")


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of each command line of the bash blocks: continuations joined, comments dropped, leading
    VAR=value assignments dropped; synopses with placeholders left out."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"```(?:bash|sh)\n(.*?)```", text, re.S):
            first = text[:block.start()].count("\n") + 2
            lines = block.group(1).replace("\\\n", " ").splitlines()
            for i, line in enumerate(lines):
                argv = shlex.split(line, comments=True)
                while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                    argv.pop(0)
                if argv and not PLACEHOLDER.search(line.split("#")[0]):
                    found.append((f"{doc.relative_to(REPO)}:{first + i}", argv))
    return found


COMMANDS = commands()


def script_options(path: Path) -> set[str]:
    """The option strings a script's argparse parser declares (read from its source, nothing run)."""
    opts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            opts |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return opts


def recipe_of_run(config: str) -> str:
    """`runs/<name>/config.yaml` (what an earlier documented run saves) -> the recipe that makes run <name>, the
    config it saves; anything else as it is."""
    import yaml

    parts = Path(config).parts
    if len(parts) != 3 or parts[0] != "runs" or parts[2] != "config.yaml":
        return config
    makers = [str(r.relative_to(REPO)) for r in sorted((REPO / "recipes").glob("*.yaml"))
              if (yaml.safe_load(r.read_text()) or {}).get("name") == parts[1]]
    return makers[0] if makers else config


def dstlm_argv(argv: list[str]) -> list[str] | None:
    """The `dstlm` arguments a command line amounts to (a launcher's recipe and options as `dstlm fit`), or None.
    A run's saved config stands for the recipe that makes it (a fresh clone has no runs/ yet)."""
    if Path(argv[0]).name == "dstlm":
        return [recipe_of_run(a) if prev == "--config" else a for prev, a in zip(["", *argv[1:]], argv[1:])]
    if argv[0] == "launch/torchrun.sh":
        return ["fit", "--config", *argv[2:]]
    if argv[0] == "launch/torchrun_multinode.sh":
        return ["fit", "--config", *argv[1:]]
    return None


def check_other(argv: list[str]) -> str:
    """What is wrong with a command that is not a dstlm command line ('' if nothing)."""
    if argv[0] == "sudo":
        argv = argv[1:]
    if argv[0] == "export":
        return ""
    if argv[0] == "make":
        makefile = (REPO / "Makefile").read_text()
        targets = [a for a in argv[1:] if "=" not in a]
        variables = [a.split("=")[0] for a in argv[1:] if "=" in a]
        missing = [t for t in targets if not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
        missing += [v for v in variables if f"$({v})" not in makefile]
        return f"not in the Makefile: {missing}" if missing else ""
    if Path(argv[0]).name in ("python", "python3"):
        script = REPO / argv[1]
        if not script.is_file():
            return f"no script {argv[1]}"
        unknown = [a.split("=")[0] for a in argv[2:] if a.startswith("-")]
        unknown = [a for a in unknown if a not in script_options(script)]
        return f"{argv[1]} has no option {unknown}" if unknown else ""
    return f"not a command this test knows: {argv[0]} (teach it, or fix the doc)"


def parse_dstlm(args: list[str]) -> None:
    """Parse a dstlm command line as the command would, building (and so checking) its config; runs nothing."""
    from dstlm import cli, slurm

    sub, rest = args[0], args[1:]
    if sub in ("fit", "validate", "flops", "prune"):
        cli.parse_run(f"dstlm {sub}", rest, out=sub == "prune")
    elif sub == "slurm":
        slurm.render(rest, cli.parse_run)
    else:
        cli.function_parser(cli.HELP[sub]).parse_args(rest)


def problem(argv: list[str]) -> str:
    """What is wrong with a documented command line ('' if nothing)."""
    args = dstlm_argv(argv)
    if args is None:
        return check_other(argv)
    if "--print_config" in args:  # prints and exits: run for real below
        return ""
    try:
        parse_dstlm(args)
    except (Exception, SystemExit) as e:  # noqa: BLE001 (any failure to parse is the finding)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


def test_every_command_in_readme_and_docs_parses_into_what_it_would_run(monkeypatch):
    monkeypatch.chdir(REPO)  # the docs' paths are relative to the repository
    assert len(COMMANDS) >= 80 and {Path(a[0]).name for _, a in COMMANDS} >= {"dstlm", "python", "make"}
    bad = [f"{where}: {' '.join(argv)}\n  -> {p}" for where, argv in COMMANDS if (p := problem(argv))]
    assert not bad, "\n".join(bad)


def test_a_broken_command_is_caught(monkeypatch):
    """The check can fail: a misspelled option, a recipe that does not exist, a value of the wrong type, a
    benchmark option the script lacks, a make target that does not exist."""
    monkeypatch.chdir(REPO)
    broken = ["dstlm fit --config recipes/tiny-rigl.yaml --trainer.max_step 10",
              "dstlm fit --config recipes/no-such-recipe.yaml",
              "dstlm eval --checkpoint runs/x --tasks hellaswag --limit fifty",
              "launch/torchrun.sh 2 recipes/tiny-rigl.yaml --sparsity.method sett",
              ".venv/bin/python benchmarks/update_scale.py --no-such-option",
              "make no-such-target"]
    for line in broken:
        assert problem(shlex.split(line)), line


CHEAP = {"flops": "FLOPs", "slurm": "#SBATCH", "fit": "name: default"}  # subcommand -> what its output shows


def test_the_cheap_commands_run_as_written(tmp_path, monkeypatch):
    """The documented commands that take seconds run exactly as written (from a folder holding the recipes
    and configs, so nothing is written into the repository)."""
    import contextlib
    import io

    from dstlm.cli import main

    for name in ("recipes", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    cheap = [(w, a) for w, a in COMMANDS if (d := dstlm_argv(a)) and d[0] in CHEAP
             and (d[0] != "fit" or "--print_config" in d) and "--submit" not in d and "--gpus-per-node" not in d]
    assert len(cheap) >= 4, cheap
    for where, argv in cheap:
        args = dstlm_argv(argv)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                code = main(args)
            except SystemExit as e:  # --print_config prints, then exits as the command does
                code = e.code or 0
        assert code == 0 and CHEAP[args[0]] in out.getvalue(), (where, argv, out.getvalue()[-2000:])
