"""`dstlm` console script: subcommands are typed functions, parsed by jsonargparse.

    dstlm fit      --config recipes/default.yaml [--trainer.max_steps=100 ...] [--ckpt_path last|auto|PATH]
    dstlm validate --config recipes/default.yaml --ckpt_path last|PATH
    dstlm flops    --config RECIPE [--key value]   FLOPs per token vs the dense baseline (Sparse-IFT check)
    dstlm eval     --checkpoint PATH --tasks t1,t2 [--limit N] [--batch_size B] [--out results.json]
    dstlm export   --checkpoint PATH --out DIR     a Hugging Face model directory
    dstlm prune    --config RECIPE --out DIR       one-shot masks of a Hugging Face model source, exported
    dstlm report   --checkpoint PATH [--layer NAME] [--out DIR]   sparsity pictures of a checkpoint
    dstlm presets                                  list the model presets in configs/model/
    dstlm slurm    --config RECIPE --nodes N --gpus-per-node G [--submit]   a SLURM job (docs/slurm.md)

fit/validate/flops take every field of dstlm.training.config.RunConfig at the top level, as recipes write
them (`--print_config` prints the parsed config; each run saves the config that ran as runs/<name>/config.yaml,
which `dstlm fit --config` re-runs). The other subcommands take their function's parameters; the docstrings
are the help. Errors in user input end in one line: `dstlm: error: <what> ...`.
"""

from __future__ import annotations

import dataclasses
import sys
from argparse import ArgumentError
from typing import Callable, Optional

from jsonargparse import ArgumentParser, set_parsing_settings

from dstlm.cli_errors import one_line

set_parsing_settings(docstring_parse_attribute_docstrings=True)


def run_parser(prog: str, hf_first: bool = False) -> ArgumentParser:
    """The parser of a RunConfig: its fields at the top level, each section also loadable from a YAML file.
    `hf_first`: the model union lists the Hugging Face source first (see parse_run)."""
    from dstlm.training.config import RunConfig, RunConfigHFFirst

    if hf_first:
        RunConfig = RunConfigHFFirst  # noqa: N806

    parser = ArgumentParser(prog=prog, default_meta=False, exit_on_error=False, allow_abbrev=False,
                            description="Options are fields of RunConfig; YAML recipes set the same keys.")
    parser.add_argument("--config", action="config", help="A recipe YAML (recipes/*.yaml) or a run's config.yaml.")
    parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                        help="Resume (fit) or evaluate (validate) from 'last' or a checkpoint path; fit also takes "
                             "'auto': the newest complete checkpoint of the run if any (what a killed save left "
                             "is set aside), else from scratch, and nothing if the run has FINISHED.")
    parser.add_class_arguments(RunConfig, nested_key=None, sub_configs=True, fail_untyped=True)
    return parser


def parse_run(prog: str, argv: list[str], out: bool = False):
    """(RunConfig, ckpt_path) from the command line; the dataclasses validate themselves as they are built.
    With `out`, a required --out folder too: (RunConfig, out)."""
    from dstlm.training.config import RunConfig

    def parse(hf_first: bool):
        parser = run_parser(prog, hf_first)
        if out:
            parser.add_argument("--out", type=str, required=True, help="Output folder.")
        built = parser.instantiate(parser.parse_args(argv))
        cfg = RunConfig(**{f.name: built[f.name] for f in dataclasses.fields(RunConfig)})
        return cfg, (built.out if out else built.ckpt_path)

    # jsonargparse merges several `model.*` values (a recipe's, then --model.x, --model.y) only into the union
    # member it lists first, and silently drops the earlier values for the other one: list first the source
    # this command line asks for
    return parse(hf_first=_asks_for_hf(argv))


def _asks_for_hf(argv: list[str]) -> bool:
    """Whether the command line gives a Hugging Face model source: `--model.hf`, or a model section with an
    `hf` key, inline (`--model '{hf: D}'`), in a model file (`--model F`) or in a recipe (`--config F`, whose
    `model:` may itself name a model file)."""
    from pathlib import Path

    import yaml

    def section_has_hf(value, base: Path, depth: int = 0) -> bool:
        if isinstance(value, str) and depth < 2:  # a model file (relative to the file naming it) or inline YAML
            path = base / value
            try:
                value = yaml.safe_load(path.read_text() if path.is_file() else value)
            except (OSError, yaml.YAMLError):
                return False
            return section_has_hf(value, path.parent, depth + 1)
        return isinstance(value, dict) and "hf" in value

    hf = False
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key not in ("--model.hf", "--model", "--config"):
            continue
        value = value or (argv[i + 1] if i + 1 < len(argv) else "")
        if key == "--model.hf":
            hf = True
        elif key == "--model":
            hf = section_has_hf(value, Path.cwd())
        else:
            try:
                doc = yaml.safe_load(Path(value).read_text())
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(doc, dict) and "model" in doc:
                hf = section_has_hf(doc["model"], Path(value).parent)
    return hf


def fit(argv: list[str]) -> int:
    """train (or resume with --ckpt_path) a recipe"""
    cfg, ckpt = parse_run("dstlm fit", argv)  # before Lightning is imported: a bad option fails in seconds

    from lightning.pytorch.utilities import rank_zero_only

    from dstlm.training.assembly.run import fit as run_fit
    from dstlm.training.assembly.summary import format_summary
    from dstlm.training.resilience.preemption import EXIT_PREEMPTED

    summary = run_fit(cfg, ckpt_path=ckpt)
    if summary.get("finished") and "loss_png" not in summary:
        return 0  # --ckpt_path auto on a finished run: said so, nothing trained
    if rank_zero_only.rank == 0:
        print(format_summary(summary))
    if summary.get("preempted"):
        if rank_zero_only.rank == 0:
            print(f"dstlm: stopped at step {summary['preempted_at_step']} on the preemption signal, checkpointed; "
                  f"exit code {EXIT_PREEMPTED} (run again with --ckpt_path auto to go on)", flush=True)
        return EXIT_PREEMPTED
    return 0


def validate(argv: list[str]) -> int:
    """validation loss/perplexity of a checkpoint"""
    cfg, ckpt = parse_run("dstlm validate", argv)
    from dstlm.training.assembly.run import validate as run_validate

    for k, v in run_validate(cfg, ckpt).items():
        print(f"{k:<16} {v:.4f}")
    return 0


def flops(argv: list[str]) -> int:
    """FLOPs per token of a recipe's (sparse / Sparse-IFT) model vs its dense baseline"""
    from dstlm.training.assembly.summary import flops_report

    cfg, _ = parse_run("dstlm flops", argv)
    print(flops_report(cfg)[0])
    return 0


def prune(argv: list[str]) -> int:
    """one-shot masks (magnitude / wanda / N:M) of a Hugging Face model, exported without training"""
    from dstlm.hf.oneshot import one_shot

    cfg, out = parse_run("dstlm prune", argv, out=True)
    print(f"wrote {one_shot(cfg, out)} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def slurm(argv: list[str]) -> int:
    """write (and with --submit, sbatch) a SLURM job for a recipe: preemption-safe, auto-resuming"""
    from dstlm.slurm import _parser, main

    if argv in (["-h"], ["--help"]):
        _parser().print_help()
        print("\nEvery other option is a `dstlm fit` option (--config RECIPE, --trainer.strategy ..., see "
              "`dstlm fit --help`).")
        return 0
    return main(argv, parse_run)


# -- subcommands on a checkpoint: typed functions, their parameters are the options ------------------------
def eval_checkpoint(checkpoint: str, tasks: str, limit: Optional[int] = None, batch_size: int = 8,
                    device: str = "cpu", out: Optional[str] = None, condensed: bool = False) -> int:
    """lm-evaluation-harness scores of a checkpoint (offline tasks shipped).

    Args:
        checkpoint: a dstlm .ckpt, a run folder, a DeepSpeed checkpoint directory or a Hugging Face model folder
        tasks: task names, comma-separated (hellaswag,piqa)
        limit: documents per task (default: all)
        batch_size: sequences per scoring batch
        device: cpu or cuda
        out: write lm-eval's results JSON here
        condensed: compute SRigL / N:M layers condensed (active weights only; same scores, faster on the CPU)
    """
    from dstlm.eval.harness import format_table, run_eval, scores

    if batch_size <= 0:
        raise ValueError(f"--batch_size={batch_size} must be positive")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    results = run_eval(checkpoint, names, limit, batch_size, device, out, condensed)
    print(format_table(scores(results)))
    timing = results.get("dstlm_timing") or {}
    for what, tokens, seconds in (("scored", "scored_tokens", "scoring_s"), ("generated", "generated_tokens",
                                                                             "generation_s")):
        if timing.get(tokens):
            print(f"{what} {timing[tokens]} tokens in {timing[seconds]:.2f} s of model time "
                  f"({timing[tokens] / max(timing[seconds], 1e-9):.0f} tokens/s)")
    if out:
        print(f"wrote {out}")
    return 0


def export(checkpoint: str, out: str, condensed: bool = False) -> int:
    """write a Hugging Face model directory (config, safetensors, tokenizer), or with --condensed true a
    dstlm checkpoint for inference whose constant-fan-in layers are stored condensed

    Args:
        checkpoint: a dstlm .ckpt, a DeepSpeed checkpoint directory or a run folder
        out: output directory
        condensed: store SRigL / N:M layers as active weights + input indices (out/model.ckpt; run with
            dstlm eval --checkpoint out/model.ckpt), others as they are
    """
    if condensed:
        from dstlm.checkpoint import export_condensed

        path, outcome = export_condensed(checkpoint, out)
        for name, what in outcome.items():
            print(f"  {name:<40} {what}")
        done = sum(v.startswith("condensed") for v in outcome.values())
        print(f"wrote {path} ({done} of {len(outcome)} sparse layers condensed; dstlm eval --checkpoint {path})")
        return 0
    from dstlm.hf.export import export as hf_export

    print(f"wrote {hf_export(checkpoint, out)} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def report(checkpoint: str, layer: Optional[str] = None, out: Optional[str] = None) -> int:
    """PNG of per-layer density and a mask heat-map of a sparse checkpoint

    Args:
        checkpoint: a .ckpt file of a sparse run
        layer: weight name for the mask heat-map (default: the first)
        out: output folder (default: <checkpoint folder>/report)
    """
    from pathlib import Path

    from dstlm.report import report as draw

    s = draw(checkpoint, out or str(Path(checkpoint).resolve().parent / "report"), layer)
    print(f"global sparsity {s['global_sparsity']:.4f} over {len(s['layers'])} layers")
    for name, info in s["layers"].items():
        ablated = f"  ablated rows {info['ablated_rows']}" if info["ablated_rows"] else ""
        print(f"  {name:<40} density {info['density']:.4f}{ablated}")
    c = s["unit_census"]
    if c["units"]:
        print(f"hidden units: {c['dead']} of {c['units']} dead (no consumer weight left: "
              f"{100 * c['dead_unit_frac']:.1f} %), {c['orphans']} orphan (no producer weight); "
              f"{100 * c['wasted_weight_frac']:.1f} % of the linked layers' active weights sit in them")
        for name, row in c["links"].items():
            if row["dead"] or row["orphans"]:
                print(f"  {name:<62} dead {row['dead']:>5}  orphan {row['orphans']:>5}  of {row['units']}")
    sp = s["mask_spread"]
    print(f"spread of the active weights: fan-in CV {sp['fan_in_cv']:.3f}, fan-out CV {sp['fan_out_cv']:.3f} "
          f"(std / mean of the per-row and per-column counts, mean over layers; a random mask: ~0.1-0.2)")
    print(f"wrote {s['density_png']}\nwrote {s['mask_png']}")
    return 0


def presets() -> int:
    """list the model size presets"""
    import torch

    from dstlm.build import build_model
    from dstlm.models import available_presets, load_preset

    for name in available_presets():
        cfg = load_preset(name)
        with torch.device("meta"):
            n = build_model(cfg).num_params(non_embedding=False)
        print(f"{name:<12} {cfg.n_layer:>3} layers  {cfg.n_embd:>5} wide  {cfg.n_head:>3} heads  "
              f"ctx {cfg.block_size:>5}  vocab {cfg.vocab_size:>6}  {n / 1e6:8.1f} M params")
    return 0


def function_command(fn: Callable[..., int]) -> Callable[[list[str]], int]:
    """A subcommand from a typed function: jsonargparse reads its signature and docstring."""

    def run(argv: list[str]) -> int:
        ns = function_parser(fn).parse_args(argv)
        return fn(**{k: ns[k] for k in ns.keys()})

    return run


def function_parser(fn: Callable[..., int]) -> ArgumentParser:
    """The parser of a typed-function subcommand: its parameters are the options."""
    parser = ArgumentParser(prog=f"dstlm {name_of[fn]}", description=fn.__doc__.split("\n")[0],
                            default_meta=False, exit_on_error=False, allow_abbrev=False)
    parser.add_function_arguments(fn, fail_untyped=True)
    return parser


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "fit": fit, "validate": validate, "presets": function_command(presets), "eval": function_command(eval_checkpoint),
    "flops": flops, "export": function_command(export), "report": function_command(report), "prune": prune,
    "slurm": slurm,
}
name_of = {presets: "presets", eval_checkpoint: "eval", export: "export", report: "report"}
HELP = {"fit": fit, "validate": validate, "presets": presets, "eval": eval_checkpoint, "flops": flops,
        "export": export, "report": report, "prune": prune, "slurm": slurm}


def usage() -> str:
    lines = ["usage: dstlm <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {fn.__doc__.strip().splitlines()[0]}" for name, fn in HELP.items()]
    lines += ["", "`dstlm <command> --help` lists a command's options."]
    return "\n".join(lines)


def close_process_group() -> None:
    """After a command that succeeded on every rank: a process that exits with its gloo process group still
    alive can abort at interpreter shutdown ('terminate called without an active exception', SIGABRT: gloo's
    worker threads outlive Python; seen once in CI after a finished ZeRO-2 run). Not after an error: a rank
    that failed alone would wait for the others in the teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _say_error(text: str) -> None:
    """The one-line error, line end included, in one write: `print` writes the text and the newline separately,
    and two ranks failing together on one pipe then interleave into 'msgmsg\n\n' (seen in CI)."""
    sys.stderr.write(f"dstlm: error: {text}\n")
    sys.stderr.flush()


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _say_error(f"unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
        return 2
    import logging
    import os

    # Lightning's start-up banner (GPU/TPU availability, tips) is noise on the console; warnings stay.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # lm-eval announces that the shipped offline tasks override its online ones: expected, not news
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        code = COMMANDS[name](rest)
        close_process_group()
        return code
    except (ValueError, TypeError, OSError, KeyError, ArgumentError) as err:
        if "DSTLM_TRACEBACK" in os.environ:
            raise
        _say_error(one_line(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
