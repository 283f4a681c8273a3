"""Dead hidden units per DST method, with and without sparsity.reclaim_dead_units: val loss and the census.

    .venv/bin/python benchmarks/dead_units.py [--recipe recipes/default.yaml] [--steps 80] [--delta-t 10]
        [--methods srigl,rigl] [--seeds 1337] [--out-dir runs/dead_units]

Each (method, reclaim, seed) trains the recipe for --steps optimizer steps with masks updated every --delta-t
steps (t_end 0.75, the recipe's sparsity), through the real `dstlm fit`; the table gives the final val loss,
the census of dead and orphan units (dstlm/sparse/connectivity.py) and the share of the linked layers'
active weights they hold. Defaults: the short aggressive schedule on which the census was first taken.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/default.yaml")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--delta-t", type=int, default=10)
    ap.add_argument("--methods", default="srigl,rigl")
    ap.add_argument("--seeds", default="1337")
    ap.add_argument("--out-dir", default="runs/dead_units")
    args = ap.parse_args()
    rows = []
    for method in args.methods.split(","):
        for reclaim in (False, True):
            runs = []
            for seed in args.seeds.split(","):
                name = f"{method}-{'reclaim' if reclaim else 'plain'}-s{seed}"
                cmd = [sys.executable, "-m", "dstlm.cli", "fit", "--config", args.recipe, f"--name={name}",
                       f"--out_dir={args.out_dir}", f"--seed={seed}", f"--sparsity.method={method}",
                       f"--sparsity.delta_t={args.delta_t}", f"--sparsity.reclaim_dead_units={str(reclaim).lower()}",
                       f"--trainer.max_steps={args.steps}", f"--trainer.val_every_n_steps={args.steps}",
                       "--trainer.ckpt_every_n_steps=0", "--trainer.progress_bar=false", "--eval=null"]
                print("$", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                runs.append(json.loads((Path(args.out_dir) / name / "summary.json").read_text()))
            census = [r["unit_census"] for r in runs]
            rows.append((method, reclaim, [r["val_loss"] for r in runs], census))
    print(f"\n{args.recipe}, {args.steps} steps, delta_t {args.delta_t}, seeds {args.seeds}")
    print("| method | reclaim | val loss | dead units | orphan units | wasted active weights |")
    print("|---|---|---|---|---|---|")
    for method, reclaim, losses, census in rows:
        sd = f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
        dead = statistics.mean(c["dead"] for c in census)
        units = census[0]["units"]
        print(f"| {method} | {'yes' if reclaim else 'no'} | {statistics.mean(losses):.4f}{sd} | "
              f"{dead:.0f} of {units} ({100 * dead / units:.1f} %) | "
              f"{statistics.mean(c['orphans'] for c in census):.0f} | "
              f"{100 * statistics.mean(c['wasted_weight_frac'] for c in census):.1f} % |")


if __name__ == "__main__":
    main()
