"""`dstlm eval`: lm-evaluation-harness on dstlm checkpoints (or HF model directories), offline.

The ten shipped tasks are lm-eval task YAMLs in dstlm/eval/tasks/ whose documents are the dev subsets
in dstlm/assets/eval/; they override lm-eval's built-in tasks of the same names. Any other task name
goes to lm-eval's own registry (which usually needs network for its dataset).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from dstlm.paths import ASSETS_DIR, PACKAGE_DIR, cache_dir

TASK_TEMPLATES = PACKAGE_DIR / "eval" / "tasks"
EVAL_DATA = ASSETS_DIR / "eval"
SHIPPED_TASKS = sorted(p.stem for p in TASK_TEMPLATES.glob("*.yaml"))
# metric(s) to show per task in tables
MAIN_METRICS = {"lambada_openai": ["acc", "perplexity"], "wikitext": ["word_perplexity", "bits_per_byte"],
                "hellaswag": ["acc_norm"], "piqa": ["acc_norm"], "arc_easy": ["acc_norm"],
                "arc_challenge": ["acc_norm"], "openbookqa": ["acc_norm"], "winogrande": ["acc"], "boolq": ["acc"],
                "copa": ["acc"]}


def task_dir() -> Path:
    """The shipped task YAMLs with absolute data paths, materialised once per content version."""
    parts = sorted(TASK_TEMPLATES.glob("*"))
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in parts if p.is_file())
                            + str(EVAL_DATA).encode()).hexdigest()[:12]
    out = cache_dir() / "lm_eval_tasks" / digest
    if not (out / ".complete").exists():
        out.mkdir(parents=True, exist_ok=True)
        for p in parts:
            if p.is_file() and p.suffix in (".yaml", ".py"):
                (out / p.name).write_text(p.read_text().replace("@EVAL_DATA@", str(EVAL_DATA)))
        (out / ".complete").write_text("ok")
    return out


def task_manager(tasks: Sequence[str]):
    from lm_eval.tasks import TaskManager

    others = [t for t in tasks if t not in SHIPPED_TASKS]
    tm = TaskManager(include_path=str(task_dir()), include_defaults=bool(others))
    unknown = [t for t in others if t not in tm.all_tasks]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; shipped offline tasks: {', '.join(SHIPPED_TASKS)} "
                         f"(other names must be lm-eval tasks)")
    return tm


def build_lm(checkpoint: str, batch_size: int = 8, device: str = "cpu", condensed: bool = False):
    """An lm-eval LM for a dstlm .ckpt / run folder, or lm-eval's `hf` model for a Hugging Face directory."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    if path.is_dir() and (path / "config.json").is_file():
        from lm_eval.models.huggingface import HFLM

        if condensed:
            raise ValueError(f"--condensed applies to dstlm checkpoints; {checkpoint!r} is a Hugging Face model folder")

        return HFLM(pretrained=str(path), batch_size=batch_size, device=device, dtype="float32")
    from dstlm.eval.lm import DstlmLM

    return DstlmLM(checkpoint=str(path), batch_size=batch_size, device=device, condensed=condensed)


def evaluate(lm, tasks: Sequence[str], limit: Optional[int] = None, bootstrap_iters: int = 0) -> dict:
    """Run lm-eval's simple_evaluate on an LM instance; returns lm-eval's results dict.

    bootstrap_iters > 0 makes lm-eval report standard errors: closed-form for accuracies, bootstrapped (that
    many resamples, seeded) for perplexities. The resampling runs in this process: lm-eval's default worker
    pool would fork a training process with its model and data loaders."""
    import os

    import lm_eval

    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given; choose from: " + ", ".join(SHIPPED_TASKS))
    tm = task_manager(tasks)
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit,
                                       bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=0,
                                       numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def scores(results: dict, stderr: bool = False) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} without lm-eval's ',none' filter suffixes; with stderr=True also the standard
    errors lm-eval computed (as '<metric>_stderr'; absent when it computed none)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if filt != "none" or not isinstance(value, (int, float)):
                continue
            if stderr or not name.endswith("_stderr"):
                out[task][name] = float(value)
    return out


def format_table(table: dict[str, dict[str, float]]) -> str:
    """The main metric(s) of each task, with '± stderr' where the scores carry one."""
    lines = [f"{'task':<16} {'metric':<16} {'value':>10}", "-" * 44]
    for task, metrics in table.items():
        shown = [m for m in MAIN_METRICS.get(task, []) if m in metrics]
        shown = shown or [m for m in metrics if not m.endswith("_stderr")]
        for m in shown:
            v, err = metrics[m], metrics.get(f"{m}_stderr")
            line = f"{task:<16} {m:<16} " + (f"{v:>10.4f}" if math.isfinite(v) else f"{v!s:>10}")
            if err is not None and math.isfinite(err):
                line += f" ± {err:.4f}"
            lines.append(line)
    return "\n".join(lines)


def run_eval(checkpoint: str, tasks: Sequence[str], limit: Optional[int] = None, batch_size: int = 8,
             device: str = "cpu", out: Optional[str] = None, condensed: bool = False) -> dict:
    for t in tasks:  # fail fast, before loading a model
        if t not in SHIPPED_TASKS:
            task_manager(tasks)
            break
    lm = build_lm(checkpoint, batch_size, device, condensed)
    results = evaluate(lm, tasks, limit)
    if hasattr(lm, "timing"):
        results["dstlm_timing"] = dict(lm.timing)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2, default=str))
    return results
