"""Train several recipes (same seed, data and steps) and print a markdown table of their results.

    .venv/bin/python benchmarks/recipe_table.py recipes/tiny-dense.yaml recipes/tiny-rigl.yaml ... \
        [--out-dir runs/table] [--skip-existing] [-- --trainer.max_steps=300]

Runs go to OUT_DIR/<recipe name>; with --skip-existing a run whose summary.json exists is not redone.
Everything after `--` is passed to every `dstlm fit`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--out-dir", default="runs/table")
    ap.add_argument("--skip-existing", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for recipe in args.recipes:
        name = yaml.safe_load(Path(recipe).read_text())["name"]
        summary_path = Path(args.out_dir) / name / "summary.json"
        if not (args.skip_existing and summary_path.exists()):
            cmd = [sys.executable, "-m", "dstlm.cli", "fit", "--config", recipe, f"--out_dir={args.out_dir}",
                   "--trainer.progress_bar=false", *extra]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        s = json.loads(summary_path.read_text())
        rows.append((name, s))
    print("\n| recipe | method | sparsity | val loss | val ppl | mask updates | ITOP | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, s in rows:
        itop = f"{s['itop']:.3f}" if s.get("itop") is not None else "-"
        sparsity = f"{s['sparsity']:.3f}" if s.get("sparsity") is not None else "0"
        print(f"| {name} | {s.get('sparsity_method', 'dense')} | {sparsity} | {s['val_loss']:.4f} | "
              f"{s['val_ppl']:.2f} | {s.get('mask_updates', 0)} | {itop} | {s['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
