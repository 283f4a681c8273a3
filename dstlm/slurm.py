"""`dstlm slurm`: render slurm/train.sbatch for a recipe (and submit it), so nobody hand-edits a template.

    dstlm slurm --config recipes/tiny-rigl.yaml --nodes 2 --gpus-per-node 8 --time 4:00:00 [--submit]
    dstlm slurm --config recipes/tiny-rigl.yaml --tasks-per-node 2 --time 0:30:00 [--trainer.strategy ddp ...]

Options after the slurm ones are `dstlm fit` options: checked here as `dstlm fit` would, and passed on to the
job. The script goes to <run>/slurm/train.sbatch (and the job's log to <run>/slurm/<job name>-<job id>.out).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

import yaml

from dstlm.paths import REPO_DIR
from dstlm.training.loop.callbacks import SAVE_TIMES

TEMPLATE = REPO_DIR / "slurm" / "train.sbatch"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dstlm slurm", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--nodes", type=int, default=1, help="nodes (trainer.num_nodes)")
    ap.add_argument("--gpus-per-node", type=int, default=0,
                    help="GPUs per node, one training process each; 0: the CPU profile")
    ap.add_argument("--tasks-per-node", type=int, default=None,
                    help="training processes per node (CPU profile; with GPUs it is --gpus-per-node)")
    ap.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per process (default 1 on the "
                                                                          "CPU profile, 8 with GPUs)")
    ap.add_argument("--time", default="4:00:00", help="time limit, SLURM's format (D-HH:MM:SS, H:MM:SS)")
    ap.add_argument("--partition", default=None)
    ap.add_argument("--job-name", default=None, help="default: dstlm-<run name>")
    ap.add_argument("--signal", default="USR2", help="preemption signal (not USR1: NCCL catches it)")
    ap.add_argument("--lead-time", type=int, default=300,
                    help="seconds before the time limit SLURM sends the signal; must exceed a checkpoint save")
    ap.add_argument("--max-retries", type=int, default=3, help="requeues after crashes in a row before giving up")
    ap.add_argument("--collective-timeout", type=int, default=600,
                    help="seconds a rank waits in a collective before failing (a dead rank ends the others)")
    ap.add_argument("--wait", type=int, default=120,
                    help="seconds srun lets the other tasks run after the first one exits (srun --wait)")
    ap.add_argument("--python", default=sys.executable, help="the Python with dstlm installed")
    ap.add_argument("--export", action="append", default=[], metavar="VAR=VALUE",
                    help="environment for the job (repeatable)")
    ap.add_argument("--out", default=None, help="where to write the script (default <run>/slurm/train.sbatch)")
    ap.add_argument("--submit", action="store_true", help="sbatch the script and print the job id")
    return ap


def _fail(msg: str):
    raise ValueError(msg)


def check_run_dir(run: Path, cfg_dict: dict) -> None:
    """A run folder belongs to one recipe: refuse to point a job at a folder whose saved config trains another
    model or sparsity (its checkpoints would be resumed into the wrong run)."""
    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    for key in ("model", "sparsity", "ift"):
        if saved.get(key) != cfg_dict.get(key):
            _fail(f"{run} holds a run of another recipe ({key} differs from {saved_path}); give this job its own "
                  f"--name, or remove {run} to start over")


def render(argv: list[str], parse_run) -> tuple[str, Path, argparse.Namespace, Path]:
    """(script text, script path, the slurm options, the run folder) for `dstlm slurm` + `dstlm fit` options;
    `parse_run(prog, argv)` is the command line's RunConfig parser (dstlm.cli.parse_run)."""
    from dataclasses import asdict

    ap = _parser()
    args, fit_argv = ap.parse_known_args(argv)
    if "--ckpt_path" in fit_argv:
        _fail("dstlm slurm always resumes with --ckpt_path auto; drop --ckpt_path")
    cfg, _ = parse_run("dstlm slurm", fit_argv)
    gpus = args.gpus_per_node
    if gpus < 0 or args.nodes < 1:
        _fail(f"--nodes={args.nodes} --gpus-per-node={gpus}: need at least 1 node and 0 or more GPUs")
    if gpus and args.tasks_per_node not in (None, gpus):
        _fail(f"--tasks-per-node={args.tasks_per_node} with --gpus-per-node={gpus}: one process per GPU; drop "
              f"--tasks-per-node")
    tasks = gpus or args.tasks_per_node or 1
    t = cfg.trainer
    if t.devices > 1 and t.devices != tasks:
        _fail(f"the recipe sets trainer.devices={t.devices} but the job runs {tasks} process(es) per node "
              f"(--gpus-per-node/--tasks-per-node); make them agree or drop trainer.devices from the recipe")
    if t.num_nodes > 1 and t.num_nodes != args.nodes:
        _fail(f"the recipe sets trainer.num_nodes={t.num_nodes} but --nodes={args.nodes}; make them agree")
    if gpus and t.accelerator == "cpu":
        _fail(f"--gpus-per-node={gpus} but the recipe sets trainer.accelerator=cpu; pass --trainer.accelerator "
              f"gpu (or use the CPU profile: --tasks-per-node N)")
    if args.signal.upper().removeprefix("SIG") in ("USR1", "TERM", "KILL"):
        _fail(f"--signal={args.signal}: USR1 is also caught by NCCL, TERM and KILL are SLURM's own; use USR2")
    from dstlm.training.assembly.build import run_dir

    run = run_dir(cfg).resolve()
    check_run_dir(run, asdict(cfg))
    saved = _measured_save_s(run)
    if saved is not None and args.lead_time < 2 * saved:
        warnings.warn(f"--lead-time={args.lead_time} s is less than twice the measured checkpoint save of this run "
                      f"({saved:.0f} s, {run / 'checkpoints' / SAVE_TIMES}); raise --lead-time so a preempted job "
                      f"can save before SLURM kills it", stacklevel=2)
    recipe = _recipe_path(fit_argv)
    cpus = args.cpus_per_task or (8 if gpus else 1)
    fill = {
        "JOB_NAME": args.job_name or f"dstlm-{cfg.name}", "NODES": str(args.nodes), "TASKS_PER_NODE": str(tasks),
        "CPUS_PER_TASK": str(cpus), "GPU_LINE": f"#SBATCH --gpus-per-node={gpus}" if gpus else "# (CPU profile)",
        "TIME": args.time, "PARTITION_LINE": f"#SBATCH --partition={args.partition}" if args.partition else "",
        "SIGNAL": args.signal.upper().removeprefix("SIG"), "LEAD_S": str(args.lead_time),
        "LOG_DIR": str(run / "slurm"), "WORKDIR": shlex.quote(str(Path.cwd())), "RECIPE": shlex.quote(recipe),
        "RUN_DIR": shlex.quote(str(run)), "MAX_RETRIES": str(args.max_retries),
        "COLLECTIVE_TIMEOUT_S": str(args.collective_timeout), "WAIT_S": str(args.wait),
        "PYTHON": shlex.quote(args.python),
        "EXPORTS": "\n".join(f"export {shlex.quote(e)}" for e in args.export),
        "FIT_ARGS": " ".join(shlex.quote(a) for a in _without_config(fit_argv)),
    }
    text = TEMPLATE.read_text()
    for k, v in fill.items():
        text = text.replace(f"%%{k}%%", v)
    if "%%" in text:
        _fail(f"{TEMPLATE} has a field this dstlm does not fill: {text[text.index('%%'):][:40]!r}")
    out = Path(args.out) if args.out else run / "slurm" / "train.sbatch"
    return text, out, args, run


def _measured_save_s(run: Path) -> Optional[float]:
    path = run / "checkpoints" / SAVE_TIMES
    try:
        return max(float(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return None


def _recipe_path(fit_argv: list[str]) -> str:
    for i, a in enumerate(fit_argv):
        if a == "--config" and i + 1 < len(fit_argv):
            return str(Path(fit_argv[i + 1]).resolve())
        if a.startswith("--config="):
            return str(Path(a.split("=", 1)[1]).resolve())
    _fail("dstlm slurm needs --config RECIPE (the job runs `dstlm fit --config RECIPE`)")


def _without_config(fit_argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in fit_argv:
        if skip:
            skip = False
        elif a == "--config":
            skip = True
        elif not a.startswith("--config="):
            out.append(a)
    return out


def main(argv: list[str], parse_run) -> int:
    text, out, args, run = render(argv, parse_run)
    (run / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM does not create the log's folder
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.chmod(0o755)
    if not args.submit:
        print(text)
        print(f"# written to {out}; submit with: sbatch {out}")
        return 0
    r = subprocess.run(["sbatch", "--parsable", str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(f"sbatch {out} failed: {r.stderr.strip()}")
    job = r.stdout.strip().split(";")[0]
    print(f"submitted job {job}: {out}; log {out.parent}/{args.job_name or 'dstlm-*'}-{job}.out")
    return 0
