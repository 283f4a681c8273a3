"""Multi-seed study of DST methods: train a grid of cells x seeds with `dstlm fit`, then one table and plots.

    .venv/bin/python benchmarks/study.py [--spec benchmarks/studies/quality.yaml] [--budget cpu]
        [--groups main,reclaim] [--cells rigl-90,dense] [--seeds 1,2,3] [--jobs 2] [--report-only]
        [--out-dir runs/study] [--docs docs/study]

The spec (YAML) names a base recipe, an eval config, seeds, budgets (overrides such as steps and batch, and
the delta_t every sparse cell gets) and cells (a sparsity config file and overrides; `of: <cell>` starts from
another cell; `delta_t_scale` scales the budget's delta_t). Runs go to OUT_DIR/<budget>/<cell>-s<seed>; a run
whose summary.json exists is not redone, so an interrupted study resumes where it stopped and new seeds or
cells add to it. Each finished run's small records (summary.json, flops.json, the CSV metrics) are also copied
to ARCHIVE/<budget>/<run> (default docs/study/runs, committed): a run found there counts as done and enters
the report, so results outlive the machine that trained them. --jobs runs that many trainings side by side,
each with cores/jobs threads (or --threads; two 1-thread runs on 2 cores give ~15 % more tokens/s than one
2-thread run). At the end (or with --report-only) it writes DOCS/<spec>-<budget>.md (mean ± std over seeds of
val loss and perplexity, lm-eval scores with their standard errors, total training FLOPs, the dead-unit
census, and for each `of:` cell its difference from the cell it varies) and PNG plots of val loss against
tokens and against training FLOPs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EVAL_SHOWN = [("hellaswag", "acc_norm"), ("arc_easy", "acc_norm"), ("lambada_openai", "acc"),
              ("wikitext", "bits_per_byte")]


@dataclass
class Cell:
    name: str
    sparsity: str | None = None  # a configs/sparsity file, or None (inherit the recipe's / dense via args)
    args: list[str] = field(default_factory=list)
    delta_t_scale: float = 1.0
    of: str | None = None


def load_spec(path: Path) -> tuple[dict, dict[str, Cell]]:
    spec = yaml.safe_load(path.read_text())
    raw = spec["cells"]
    cells: dict[str, Cell] = {}

    def resolve(name: str, seen: tuple = ()) -> Cell:
        if name in cells:
            return cells[name]
        if name not in raw:
            raise SystemExit(f"cell {name!r} is not in {path}; cells: {', '.join(raw)}")
        if name in seen:
            raise SystemExit(f"cells {' -> '.join(seen + (name,))} form a cycle of `of:` in {path}")
        entry = raw[name] or {}
        unknown = set(entry) - {"sparsity", "args", "delta_t_scale", "of"}
        if unknown:
            raise SystemExit(f"cell {name!r}: unknown keys {sorted(unknown)}; use sparsity, args, delta_t_scale, of")
        if entry.get("of"):
            base = resolve(entry["of"], seen + (name,))
            cell = Cell(name, entry.get("sparsity", base.sparsity), base.args + list(entry.get("args", [])),
                        base.delta_t_scale * entry.get("delta_t_scale", 1.0), entry["of"])
        else:
            cell = Cell(name, entry.get("sparsity"), list(entry.get("args", [])), entry.get("delta_t_scale", 1.0))
        cells[name] = cell
        return cell

    for name in raw:
        resolve(name)
    return spec, cells


def fit_command(spec: dict, budget: dict, cell: Cell, seed: int, out_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "dstlm.cli", "fit", "--config", str(ROOT / spec["recipe"]),
           f"--name={cell.name}-s{seed}", f"--out_dir={out_dir}", f"--seed={seed}",
           "--trainer.progress_bar=false", "--trainer.ckpt_every_n_steps=0",
           "--ckpt_path=auto"]  # a run stopped part way (killed, or failed after its last save) goes on from there
    if spec.get("eval"):
        cmd.append(f"--eval={ROOT / spec['eval']}")
    cmd += budget.get("args", [])
    if cell.sparsity:
        cmd.append(f"--sparsity={ROOT / cell.sparsity}")
    dense = "--sparsity=null" in cell.args
    if not dense and budget.get("delta_t"):
        cmd.append(f"--sparsity.delta_t={max(1, round(budget['delta_t'] * cell.delta_t_scale))}")
    return cmd + cell.args


def run_one(cmd: list[str], run_dir: Path, threads: int) -> tuple[Path, float, int]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    return run_dir, time.time() - start, rc


# ---------------------------------------------------------------------------------------------- report


def val_curve(run: Path) -> list[tuple[int, float]]:
    """(step, val loss) from the run's CSV log."""
    out = []
    for path in sorted((run / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("val/loss"):
                    out.append((int(float(row["step"])), float(row["val/loss"])))
    return sorted(set(out))


def logged(run: Path, column: str) -> list[tuple[int, float]]:
    """(step, value) of one column of the run's CSV log."""
    out = []
    for path in sorted((run / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(column):
                    out.append((int(float(row["step"])), float(row[column])))
    return sorted(set(out))


def density_log(run: Path) -> list[tuple[int, float]]:
    return logged(run, "sparsity/density")


def max_dead_at_updates(run: Path) -> float | None:
    """The most dead units the census found at any mask update of the run (None: not logged)."""
    values = [v for _, v in logged(run, "sparsity/dead_units")]
    return max(values) if values else None


def training_flops(run: Path, summary: dict) -> tuple[float, list[tuple[int, float]]]:
    """Total training FLOPs of the run and the cumulative FLOPs at each step boundary. Per token: the run's
    training FLOPs at fit start (flops.json: forward + backward, plus the dense-gradient reads of RigL-like
    rules), scaled step by step by how the block projections' density moved since (GMP prunes as it goes;
    other rules keep their budget)."""
    fl = json.loads((run / "flops.json").read_text())
    steps = summary["steps"]
    tok_per_step = summary["train_tokens_seen"] / max(1, steps)
    block_dense = sum(v["dense"] for v in fl["layers"].values())
    start_ratio = fl["block_projection_ratio"]
    fwd0 = fl["forward"]
    log = density_log(run) if summary.get("sparsity_method") == "gmp" else []
    total, cum, i, ratio = 0.0, [(0, 0.0)], 0, start_ratio
    for step in range(steps):
        while i < len(log) and log[i][0] <= step:
            ratio = log[i][1]
            i += 1
        fwd = fwd0 - block_dense * (start_ratio - ratio)
        total += tok_per_step * fl["training"] * fwd / fwd0
        cum.append((step + 1, total))
    return total, cum


@dataclass
class Result:
    cell: Cell
    seeds: list[int]
    runs: list[Path]
    summaries: list[dict]

    def values(self, key) -> list[float]:
        return [key(s) for s in self.summaries]


def mean_std(xs: list[float], fmt: str) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)} ± {format(statistics.stdev(xs), fmt.lstrip('+'))}"


def eval_cell(r: Result, task: str, metric: str) -> str:
    vals = [s["eval"][task][metric] for s in r.summaries if s.get("eval", {}).get(task, {}).get(metric) is not None]
    errs = [s["eval"][task].get(f"{metric}_stderr") for s in r.summaries if s.get("eval", {}).get(task)]
    errs = [e for e in errs if isinstance(e, (int, float)) and math.isfinite(e)]
    if not vals:
        return "-"
    text = f"{statistics.mean(vals):.3f}"
    return text + (f" ({statistics.mean(errs):.3f})" if errs else "")


ARCHIVED = ("summary.json", "flops.json", "logs/version_*/metrics.csv")


def archive_run(run: Path, archive: Path) -> Path:
    """Copy a finished run's records (what the report reads) to archive/<run name>."""
    dest = archive / run.name
    for pattern in ARCHIVED:
        for src in run.glob(pattern):
            target = dest / src.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    return dest


def finished(name: str, out_dir: Path, archive: Path | None) -> Path | None:
    """The directory holding run `name`'s records: the run itself, else its archived copy (None: not run)."""
    for root in (out_dir, archive):
        if root is not None and (root / name / "summary.json").is_file():
            return root / name
    return None


def collect(out_dir: Path, cells: list[Cell], seeds: list[int], archive: Path | None = None) -> list[Result]:
    results = []
    for cell in cells:
        runs, summaries, have = [], [], []
        for seed in seeds:
            run = finished(f"{cell.name}-s{seed}", out_dir, archive)
            if run is not None:
                runs.append(run)
                summaries.append(json.loads((run / "summary.json").read_text()))
                have.append(seed)
        if runs:
            results.append(Result(cell, have, runs, summaries))
    return results


def report(spec_name: str, budget_name: str, results: list[Result], docs: Path, command: str,
           panels: dict[str, list[str]] | None = None, note: str = "") -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    by_name = {r.cell.name: r for r in results}
    dense = by_name.get("dense")
    dense_loss = statistics.mean(dense.values(lambda s: s["val_loss"])) if dense else None
    flops = {r.cell.name: [training_flops(run, s) for run, s in zip(r.runs, r.summaries)] for r in results}
    dense_flops = statistics.mean(f[0] for f in flops["dense"]) if dense else None
    s0 = results[0].summaries[0]
    lines = [f"# Study `{spec_name}`, budget `{budget_name}`", "",
             f"Regenerate: `{command}`", "", *([note, ""] if note else []),
             f"Each row: mean ± sample std over the seeds listed (n); {s0['steps']} optimizer steps, "
             f"{s0['train_tokens_seen']:,} training tokens per run. lm-eval: first 100 documents per task, mean "
             "over seeds with the mean lm-eval standard error of one run in brackets. Training FLOPs: whole run, "
             "forward + backward (+ the dense gradients RigL-like rules read at updates), GMP integrated over its "
             "pruning. Dead units: hidden units no active consumer weight reads, at the end (mean over seeds; in "
             "brackets the most any seed had at any mask update), and the share of the linked layers' active "
             "weights they hold at the end. Spread: the coefficient of variation of the masks' per-row (fan-in) "
             "and per-column (fan-out) counts at the end, mean over layers and seeds (a random mask: ~0.1-0.2).", "",
             "| cell | method | sparsity | n | val loss | Δ vs dense | val ppl | "
             + " | ".join(f"{t} {m}" for t, m in EVAL_SHOWN)
             + " | train TFLOP | FLOPs vs dense | updates | dead units | wasted | spread in / out |",
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(EVAL_SHOWN) + "---:|---:|---:|---:|---:|---:|"]
    for r in results:
        loss = r.values(lambda s: s["val_loss"])
        delta = f"{statistics.mean(loss) - dense_loss:+.4f}" if dense_loss is not None else "-"
        f = statistics.mean(x[0] for x in flops[r.cell.name])
        census = [s.get("unit_census") for s in r.summaries if s.get("unit_census")]
        peaks = [p for p in (max_dead_at_updates(run) for run in r.runs) if p is not None]
        dead = (f"{statistics.mean(c['dead'] for c in census):.1f} / {census[0]['units']}" if census else "-")
        if peaks:
            dead += f" (max {max(peaks):.0f})"
        wasted = f"{100 * statistics.mean(c['wasted_weight_frac'] for c in census):.1f} %" if census else "-"
        spreads = [s["mask_spread"] for s in r.summaries if s.get("mask_spread")]
        spread = (f"{statistics.mean(x['fan_in_cv'] for x in spreads):.2f} / "
                  f"{statistics.mean(x['fan_out_cv'] for x in spreads):.2f}" if spreads else "-")
        sp = r.summaries[0].get("sparsity")
        lines.append(
            f"| {r.cell.name} | {r.summaries[0].get('sparsity_method', 'dense')} | "
            f"{0 if sp is None else format(sp, '.3f')} | {len(r.runs)} | {mean_std(loss, '.4f')} | {delta} | "
            f"{mean_std(r.values(lambda s: s['val_ppl']), '.2f')} | "
            + " | ".join(eval_cell(r, t, m) for t, m in EVAL_SHOWN)
            + f" | {f / 1e12:.4g} | {f / dense_flops if dense_flops else float('nan'):.3f} | "
            f"{statistics.mean(r.values(lambda s: s.get('mask_updates', 0))):.0f} | {dead} | {wasted} | {spread} |")
    pairs = [(r, by_name[r.cell.of]) for r in results if r.cell.of and r.cell.of in by_name]
    if pairs:
        lines += ["", "## Each variant against the cell it varies (paired by seed)", "",
                  "Δ = variant − base per seed, mean ± std over the seeds both have; dead units base → variant.", "",
                  "| variant | base | n | Δ val loss | Δ val ppl | dead units | wasted |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for var, base in pairs:
            common = sorted(set(var.seeds) & set(base.seeds))
            if not common:
                continue
            v = {seed: s for seed, s in zip(var.seeds, var.summaries)}
            b = {seed: s for seed, s in zip(base.seeds, base.summaries)}
            dl = [v[k]["val_loss"] - b[k]["val_loss"] for k in common]
            dp = [v[k]["val_ppl"] - b[k]["val_ppl"] for k in common]

            def dead(sums):
                c = [s["unit_census"] for s in sums if s.get("unit_census")]
                if not c:
                    return float("nan"), float("nan")
                return statistics.mean(x["dead"] for x in c), 100 * statistics.mean(x["wasted_weight_frac"] for x in c)
            (bd, bw), (vd, vw) = dead([b[k] for k in common]), dead([v[k] for k in common])
            lines.append(f"| {var.cell.name} | {base.cell.name} | {len(common)} | {mean_std(dl, '+.4f')} | "
                         f"{mean_std(dp, '+.2f')} | {bd:.1f} → {vd:.1f} | {bw:.1f} % → {vw:.1f} % |")
    stem = f"{spec_name}-{budget_name}"
    pngs = plot(results, flops, docs, stem, panels)
    lines += ["", *[f"![{p.stem}]({p.name})" for p in pngs]]
    out = docs / f"{stem}.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def plot(results: list[Result], flops: dict, docs: Path, stem: str, panels: dict[str, list[str]] | None) -> list[Path]:
    """Val loss (mean over seeds, band = min..max) against tokens and against training FLOPs: one panel per
    entry of the spec's `panels` (default: one panel with every cell that is not a variant of another)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r.cell.name: r for r in results}
    panels = {k: [by_name[n] for n in v if n in by_name] for k, v in (panels or {}).items()}
    # default: the cells that vary no other (all of them when only variants were run, e.g. `--cells x-reclaim`)
    panels = {k: v for k, v in panels.items() if v} or {"": [r for r in results if not r.cell.of] or results}
    if not any(panels.values()):
        return []
    colours = {r.cell.name: plt.get_cmap("tab20")(i % 20) for i, r in enumerate(results)}
    outs = []
    for xkind in ("tokens", "flops"):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5), sharey=True, squeeze=False)
        for ax, (title, rows) in zip(axes[0], panels.items()):
            for r in rows:
                curves = [dict(val_curve(run)) for run in r.runs]
                steps = sorted(set.intersection(*(set(c) for c in curves)))
                if not steps:
                    continue
                mean = [statistics.mean(c[k] for c in curves) for k in steps]
                lo = [min(c[k] for c in curves) for k in steps]
                hi = [max(c[k] for c in curves) for k in steps]
                if xkind == "tokens":
                    per_step = r.summaries[0]["train_tokens_seen"] / r.summaries[0]["steps"]
                    xs = [k * per_step / 1e6 for k in steps]
                else:
                    cums = [dict(f[1]) for f in flops[r.cell.name]]
                    xs = [statistics.mean(c[k] for c in cums) / 1e12 for k in steps]
                ax.plot(xs, mean, "-", label=f"{r.cell.name} (n={len(r.runs)})", color=colours[r.cell.name])
                if len(curves) > 1:
                    ax.fill_between(xs, lo, hi, color=colours[r.cell.name], alpha=0.12)
            ax.set_xlabel("training tokens (M)" if xkind == "tokens" else "training FLOPs (TFLOP)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("validation loss (nats/token)")
        finals = [statistics.mean(r.values(lambda s: s["val_loss"])) for rows in panels.values() for r in rows]
        axes[0][0].set_ylim(min(finals) - 0.1, min(finals) + 1.2)
        fig.suptitle(f"{stem}: val loss vs {'tokens' if xkind == 'tokens' else 'training FLOPs'} "
                     "(mean over seeds, band = min..max)")
        fig.tight_layout()
        path = docs / f"{stem}-loss-vs-{xkind}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        outs.append(path)
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="benchmarks/studies/quality.yaml")
    ap.add_argument("--budget", default=None, help="a budget of the spec (default: gpu with CUDA, else cpu)")
    ap.add_argument("--groups", default="main", help="comma-separated groups of the spec ('all' = every cell)")
    ap.add_argument("--cells", default=None, help="comma-separated cells (instead of --groups)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the spec's)")
    ap.add_argument("--jobs", type=int, default=None, help="runs side by side (default: 2 on a CPU, 1 on a GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per run (default: cores / jobs; 1 leaves a core free beside one job)")
    ap.add_argument("--report-only", action="store_true", help="train nothing; tabulate the runs there are")
    ap.add_argument("--out-dir", default="runs/study")
    ap.add_argument("--docs", default="docs/study")
    ap.add_argument("--archive", default="docs/study/runs",
                    help="where finished runs' records are copied (per budget); '' = nowhere")
    ap.add_argument("--note", default="", help="a line for the report's header (e.g. which code made the runs)")
    args = ap.parse_args()

    spec_path = Path(args.spec)
    spec, cells = load_spec(spec_path)
    import torch

    cuda = torch.cuda.is_available()
    budget_name = args.budget or ("gpu" if cuda else "cpu")
    if budget_name not in spec["budgets"]:
        raise SystemExit(f"--budget {budget_name!r} is not in {spec_path}; budgets: {', '.join(spec['budgets'])}")
    budget = spec["budgets"][budget_name]
    if args.cells:
        names = args.cells.split(",")
    elif args.groups == "all":
        names = list(cells)
    else:
        names = []
        for g in args.groups.split(","):
            if g not in spec.get("groups", {}):
                raise SystemExit(f"--groups: {g!r} is not a group of {spec_path}; groups: "
                                 f"{', '.join(spec.get('groups', {}))}, or all")
            names += spec["groups"][g]
    for n in names:
        if n not in cells:
            raise SystemExit(f"--cells: {n!r} is not a cell of {spec_path}; cells: {', '.join(cells)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(spec["seeds"])
    out_dir = Path(args.out_dir) / budget_name
    archive = Path(args.archive) / budget_name if args.archive else None
    jobs = args.jobs or (1 if cuda else 2)
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)

    failed: list[str] = []
    if not args.report_only:
        todo = [(cells[n], s) for s in seeds for n in names
                if finished(f"{n}-s{s}", out_dir, archive) is None]
        print(f"{len(todo)} runs to train ({len(names) * len(seeds) - len(todo)} done already), {jobs} at a time "
              f"x {threads} threads; logs in {out_dir}/<run>.log", flush=True)
        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(run_one, fit_command(spec, budget, c, s, out_dir), out_dir / f"{c.name}-s{s}",
                                   threads) for c, s in todo]
            for k, fut in enumerate(futures, 1):
                run, wall, rc = fut.result()
                status = "ok" if rc == 0 else f"FAILED rc={rc}, see {run}.log"
                print(f"[{k}/{len(todo)}] {run.name}: {wall:.0f} s, {status}", flush=True)
                if rc:
                    failed.append(run.name)
                elif archive is not None and (run / "summary.json").is_file():
                    print(f"    records copied to {archive_run(run, archive)}", flush=True)
        if failed:
            print(f"{len(failed)} runs failed: {', '.join(failed)}", file=sys.stderr)

    results = collect(out_dir, [cells[n] for n in names], seeds, archive)
    if not results:
        raise SystemExit(f"no finished runs under {out_dir} for these cells and seeds")
    command = " ".join(["python benchmarks/study.py", f"--spec {args.spec}", f"--budget {budget_name}",
                        f"--cells {','.join(names)}" if args.cells else f"--groups {args.groups}",
                        f"--seeds {','.join(map(str, seeds))}",
                        *([f"--docs {args.docs}"] if args.docs != ap.get_default("docs") else [])])
    path = report(spec_path.stem, budget_name, results, Path(args.docs), command, spec.get("panels"), args.note)
    print(path.read_text())
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
