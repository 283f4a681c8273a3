"""`dstlm` console script: one dispatcher for every subcommand.

    dstlm fit      --config recipes/default.yaml [--trainer.max_steps=100 ...] [--ckpt_path last|PATH]
    dstlm validate --config recipes/default.yaml --ckpt_path last|PATH
    dstlm eval     --checkpoint PATH --tasks t1,t2 [--limit N] [--batch-size B] [--out results.json]
    dstlm export   --checkpoint PATH --out DIR     a Hugging Face model directory
    dstlm flops    --config RECIPE [--key value]   FLOPs per token vs the dense baseline (Sparse-IFT check)
    dstlm presets                                  list the model presets in configs/model/
    dstlm report   --checkpoint PATH [--layer NAME] [--out DIR]   sparsity pictures of a checkpoint

Every fit/validate option is a field of dstlm.training.config.RunConfig; `--print_config` prints the
resolved YAML and exits. Errors in user input end in one line: `dstlm: error: <what> ...`.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

from argparse import ArgumentError

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

set_parsing_settings(docstring_parse_attribute_docstrings=True)


def run_parser(prog: str) -> ArgumentParser:
    from dstlm.training.config import RunConfig

    parser = ArgumentParser(prog=prog, default_meta=False, exit_on_error=False, allow_abbrev=False,
                            description="Options are fields of RunConfig; YAML recipes set the same keys.")
    parser.add_argument("--config", action=ActionConfigFile, help="A recipe YAML (recipes/*.yaml).")
    parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                        help="Resume (fit) or evaluate (validate) from 'last' or a checkpoint path.")
    parser.add_class_arguments(RunConfig, "run", as_group=True, sub_configs=True, instantiate=False)
    return parser


def _parse_run(prog: str, argv: list[str]):
    from dstlm.training.config import RunConfig

    # Recipes and overrides address fields without the internal "run." prefix.
    argv = [a if not a.startswith("--") or a.split("=")[0] in ("--config", "--ckpt_path", "--print_config", "--help")
            else "--run." + a[2:] for a in argv]
    parser = run_parser(prog)
    if "--help" in argv or "-h" in argv:
        # show the options as users type them (without the internal "run." prefix)
        text = parser.format_help().replace("--run.", "--").replace("[--run CONFIG]", "")
        print(text.replace("run.", ""))
        sys.exit(0)
    print_config = "--print_config" in argv
    argv = [a for a in argv if a != "--print_config"]
    # recipes are written without the "run:" level; nest them under it
    argv = _nest_configs(argv)
    ns = parser.parse_args(argv)
    run_ns = ns.run
    yaml_text = parser.dump(ns)
    cfg = _build(RunConfig, run_ns)
    import yaml as _yaml

    resolved = _yaml.safe_load(yaml_text)["run"]
    resolved_text = _yaml.safe_dump(resolved, sort_keys=False)
    if print_config:
        print(resolved_text, end="")
        sys.exit(0)
    return cfg, ns.ckpt_path, resolved_text


def _nest_configs(argv: list[str]) -> list[str]:
    """Turn `--config FILE` into a nested `--run FILE` so recipe keys need no prefix."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            out += ["--run", argv[i + 1]]
            i += 2
            continue
        if a.startswith("--config="):
            out += ["--run", a.split("=", 1)[1]]
        else:
            out.append(a)
        i += 1
    return out


def _build(cls, ns):
    """Instantiate nested dataclasses from a jsonargparse namespace (their __post_init__ validates)."""
    import dataclasses

    values = {}
    for f in dataclasses.fields(cls):
        if not hasattr(ns, f.name):
            continue
        v = getattr(ns, f.name)
        ftype = f.type if not isinstance(f.type, str) else cls.__annotations__[f.name]
        sub = _dataclass_type(cls, f.name)
        if sub is not None and v is not None:
            v = _build(sub, v)
        elif hasattr(v, "as_dict"):
            v = v.as_dict()
        if isinstance(v, dict):
            v.pop("__path__", None)
        values[f.name] = tuple(v) if isinstance(v, list) and "tuple" in str(ftype) else v
    return cls(**values)


def _dataclass_type(cls, name: str):
    import dataclasses
    import typing

    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is typing.Union:  # Optional[SomeConfig]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else hint
    return hint if dataclasses.is_dataclass(hint) else None


def cmd_fit(argv: list[str]) -> int:
    from dstlm.training.run import fit, format_summary

    cfg, ckpt, resolved = _parse_run("dstlm fit", argv)
    summary = fit(cfg, ckpt_path=ckpt, config_yaml=resolved)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        print(format_summary(summary))
    return 0


def cmd_validate(argv: list[str]) -> int:
    from dstlm.training.run import validate

    cfg, ckpt, _ = _parse_run("dstlm validate", argv)
    results = validate(cfg, ckpt)
    for k, v in results.items():
        print(f"{k:<16} {v:.4f}")
    return 0


def cmd_flops(argv: list[str]) -> int:
    cfg, _, _ = _parse_run("dstlm flops", argv)
    from dstlm.training.run import flops_report

    text, _ = flops_report(cfg)
    print(text)
    return 0


def cmd_presets(argv: list[str]) -> int:
    from dstlm.models import GPT, available_presets, load_preset

    import torch

    for name in available_presets():
        cfg = load_preset(name)
        with torch.device("meta"):
            n = GPT(cfg).num_params(non_embedding=False)
        print(f"{name:<12} {cfg.n_layer:>3} layers  {cfg.n_embd:>5} wide  {cfg.n_head:>3} heads  "
              f"ctx {cfg.block_size:>5}  vocab {cfg.vocab_size:>6}  {n / 1e6:8.1f} M params")
    return 0


def cmd_report(argv: list[str]) -> int:
    import argparse

    from dstlm.report import report

    ap = argparse.ArgumentParser(prog="dstlm report", description="PNG of per-layer density and one layer's mask.")
    ap.add_argument("--checkpoint", required=True, help="a .ckpt file of a sparse run")
    ap.add_argument("--layer", default=None, help="weight name for the mask heat-map (default: the first)")
    ap.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/report)")
    args = ap.parse_args(argv)
    from pathlib import Path

    out = args.out or str(Path(args.checkpoint).resolve().parent / "report")
    s = report(args.checkpoint, out, args.layer)
    print(f"global sparsity {s['global_sparsity']:.4f} over {len(s['layers'])} layers")
    for name, info in s["layers"].items():
        ablated = f"  ablated rows {info['ablated_rows']}" if info["ablated_rows"] else ""
        print(f"  {name:<40} density {info['density']:.4f}{ablated}")
    print(f"wrote {s['density_png']}\nwrote {s['mask_png']}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="dstlm eval", description="lm-evaluation-harness scores of a checkpoint.")
    ap.add_argument("--checkpoint", required=True, help="a dstlm .ckpt, a run folder, or a Hugging Face model folder")
    ap.add_argument("--tasks", required=True, help="comma-separated task names (see --list)")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write lm-eval's results JSON here")
    args = ap.parse_args(argv)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size={args.batch_size} must be positive")
    from dstlm.eval.harness import format_table, run_eval, scores

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = run_eval(args.checkpoint, tasks, args.limit, args.batch_size, args.device, args.out)
    print(format_table(scores(results)))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_export(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="dstlm export", description="Write a Hugging Face model directory.")
    ap.add_argument("--checkpoint", required=True, help="a dstlm .ckpt, a DeepSpeed checkpoint directory or a run folder")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    from dstlm.hf.export import export

    out = export(args.checkpoint, args.out)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "fit": (cmd_fit, "train (or resume with --ckpt_path) a recipe"),
    "validate": (cmd_validate, "validation loss/perplexity of a checkpoint"),
    "presets": (cmd_presets, "list the model size presets"),
    "eval": (cmd_eval, "lm-evaluation-harness scores of a checkpoint (offline tasks shipped)"),
    "flops": (cmd_flops, "FLOPs per token of a recipe's (sparse / Sparse-IFT) model vs its dense baseline"),
    "export": (cmd_export, "write a Hugging Face model directory (config, safetensors, tokenizer)"),
    "report": (cmd_report, "PNG of per-layer density and a mask heat-map of a sparse checkpoint"),
}


def usage() -> str:
    lines = ["usage: dstlm <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`dstlm <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dstlm: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import logging

    # Lightning's start-up banner (GPU/TPU availability, tips) is noise on the console; warnings stay.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # lm-eval announces that the shipped offline tasks override its online ones: expected, not news
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        return COMMANDS[name][0](rest)
    except (ValueError, OSError, KeyError, ArgumentError) as err:
        if "DSTLM_TRACEBACK" in __import__("os").environ:
            raise
        lines = [ln.strip(" -") for ln in str(err).strip().splitlines() if ln.strip()]
        msg = lines[-1] if lines else type(err).__name__
        msg = msg.replace('"run.', '"').replace("run.", "")  # internal prefix of the option names
        print(f"dstlm: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
