"""benchmarks/study.py: spec resolution, the `dstlm fit` command a cell makes, FLOPs integration and the
report, on hand-made run directories (the real runs are the study's; tests/test_run_config.py covers fit)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(_spec)
sys.modules["study"] = study
_spec.loader.exec_module(study)


def write_spec(tmp_path: Path, cells: dict) -> Path:
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"recipe": "recipes/default.yaml", "seeds": [1, 2],
                                    "budgets": {"b": {"args": ["--trainer.max_steps=4"], "delta_t": 10}},
                                    "cells": cells}))
    return path


def test_shipped_spec_resolves_and_every_group_names_cells():
    spec, cells = study.load_spec(ROOT / "benchmarks" / "studies" / "quality.yaml")
    for group, names in spec["groups"].items():
        assert names and all(n in cells for n in names), group
    for names in spec["panels"].values():
        assert all(n in cells for n in names)
    for name in ("recipe", "eval"):
        assert (ROOT / spec[name]).is_file()
    for c in cells.values():
        assert c.sparsity is None or (ROOT / c.sparsity).is_file(), c
    # every main-grid cell has >= 3 seeds and the cpu budget gives >= 10 mask updates
    assert len(spec["seeds"]) >= 3
    for b in spec["budgets"].values():
        steps = int(next(a for a in b["args"] if a.startswith("--trainer.max_steps=")).split("=")[1])
        assert int(0.75 * steps) // b["delta_t"] >= 10


def test_variants_inherit_and_compose(tmp_path):
    path = write_spec(tmp_path, {
        "dense": {"args": ["--sparsity=null"]},
        "rigl": {"sparsity": "configs/sparsity/rigl.yaml", "args": ["--sparsity.sparsity=0.8"]},
        "rigl-half": {"of": "rigl", "delta_t_scale": 0.5, "args": ["--sparsity.drop_fraction=0.1"]},
        "rigl-half-reclaim": {"of": "rigl-half", "args": ["--sparsity.reclaim_dead_units=true"]},
    })
    spec, cells = study.load_spec(path)
    c = cells["rigl-half-reclaim"]
    assert c.sparsity == "configs/sparsity/rigl.yaml" and c.delta_t_scale == 0.5 and c.of == "rigl-half"
    cmd = study.fit_command(spec, spec["budgets"]["b"], c, 2, tmp_path / "out")
    # order matters: the sparsity file before its field overrides, the cell's own args last
    i_file = cmd.index(f"--sparsity={ROOT / 'configs/sparsity/rigl.yaml'}")
    assert cmd.index("--sparsity.delta_t=5") > i_file and cmd.index("--sparsity.sparsity=0.8") > i_file
    assert cmd[-2:] == ["--sparsity.drop_fraction=0.1", "--sparsity.reclaim_dead_units=true"]
    assert "--seed=2" in cmd and "--name=rigl-half-reclaim-s2" in cmd
    dense = study.fit_command(spec, spec["budgets"]["b"], cells["dense"], 1, tmp_path)
    assert not any(a.startswith("--sparsity.delta_t") for a in dense)


@pytest.mark.parametrize("cells, message", [
    ({"a": {"of": "b"}, "b": {"of": "a"}}, "cycle"),
    ({"a": {"of": "nope"}}, "'nope' is not in"),
    ({"a": {"sparsty": "x"}}, "unknown keys"),
])
def test_bad_specs_are_refused_in_one_line(tmp_path, cells, message):
    with pytest.raises(SystemExit, match=message):
        study.load_spec(write_spec(tmp_path, cells))


def fake_run(root: Path, name: str, *, method, loss, steps=4, flops=None, densities=(), census=None, ev=None,
             spread=None):
    run = root / name
    (run / "logs" / "version_0").mkdir(parents=True)
    rows = ["step,val/loss,sparsity/density"] + [f"{k},{loss + 0.5 * (steps - k) / steps},"
                                               for k in range(2, steps + 1, 2)]
    rows += [f"{k},,{d}" for k, d in densities]
    (run / "logs" / "version_0" / "metrics.csv").write_text("\n".join(rows) + "\n")
    fl = flops or {"forward": 100.0, "training": 300.0, "block_projection_ratio": 1.0,
                   "layers": {"a": {"dense": 60.0}}}
    (run / "flops.json").write_text(json.dumps(fl))
    summary = {"steps": steps, "train_tokens_seen": 10 * steps, "val_loss": loss, "val_ppl": 2.718281828 ** loss,
               "sparsity_method": method, "mask_updates": 2 if method else 0}
    if census:
        summary["unit_census"] = census
    if ev:
        summary["eval"] = ev
    if spread:
        summary["mask_spread"] = spread
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_gmp_flops_follow_its_pruning(tmp_path):
    # dense start (block ratio 1.0); the density log says 0.5 from step 2 on: blocks are 60 of the 100
    # forward FLOPs, so steps 0-1 cost 300/token and steps 2-3 cost 300 * (100 - 30) / 100 = 210
    run = fake_run(tmp_path, "g", method="gmp", loss=5.0, densities=[(2, 0.5)])
    total, cum = study.training_flops(run, json.loads((run / "summary.json").read_text()))
    assert total == pytest.approx(10 * (300 + 300 + 210 + 210))
    assert cum[2] == (2, pytest.approx(6000)) and len(cum) == 5
    # the same log on a rule that keeps its budget is ignored (its density is the same at every step)
    run = fake_run(tmp_path, "r", method="rigl", loss=5.0, densities=[(2, 0.5)])
    assert study.training_flops(run, json.loads((run / "summary.json").read_text()))[0] == pytest.approx(12000)


def test_report_table_pairs_and_plots(tmp_path):
    spec, cells = study.load_spec(write_spec(tmp_path, {
        "dense": {"args": ["--sparsity=null"]},
        "rigl": {"sparsity": "configs/sparsity/rigl.yaml"},
        "rigl-reclaim": {"of": "rigl", "args": ["--sparsity.reclaim_dead_units=true"]},
    }))
    out = tmp_path / "runs"
    ev = {"hellaswag": {"acc_norm": 0.3, "acc_norm_stderr": 0.05}}
    for seed, (d, r, rr) in zip((1, 2), ((4.0, 4.2, 4.1), (4.2, 4.4, 4.2))):
        fake_run(out, f"dense-s{seed}", method=None, loss=d, ev=ev)
        census = {"units": 100, "dead": 10 * seed, "wasted_weight_frac": 0.1}
        fake_run(out, f"rigl-s{seed}", method="rigl", loss=r, census=census,
                 spread={"fan_in_cv": 0.2 * seed, "fan_out_cv": 0.1})
        fake_run(out, f"rigl-reclaim-s{seed}", method="rigl", loss=rr,
                 census={"units": 100, "dead": 0, "wasted_weight_frac": 0.0})
    results = study.collect(out, [cells[n] for n in ("dense", "rigl", "rigl-reclaim")], [1, 2, 3])
    assert [len(r.runs) for r in results] == [2, 2, 2]  # seed 3 is missing: counted as n = 2, not invented
    md = study.report("s", "b", results, tmp_path / "docs", "cmd", {"p": ["dense", "rigl"]}).read_text()
    dense_row = next(line for line in md.splitlines() if line.startswith("| dense |"))
    assert "4.1000 ± 0.1414" in dense_row and "0.300 (0.050)" in dense_row
    rigl_row = next(line for line in md.splitlines() if line.startswith("| rigl |"))
    assert "+0.2000" in rigl_row and "15.0 / 100" in rigl_row and rigl_row.endswith("| 0.30 / 0.10 |")
    assert dense_row.endswith("| - |")  # no masks, no spread
    pairs = md.split("## Each variant")[1]
    pair = next(line for line in pairs.splitlines() if line.startswith("| rigl-reclaim | rigl |"))
    assert "-0.1500 ± 0.0707" in pair and "15.0 → 0.0" in pair
    assert (tmp_path / "docs" / "s-b-loss-vs-tokens.png").stat().st_size > 10_000
    assert (tmp_path / "docs" / "s-b-loss-vs-flops.png").is_file()


def test_archived_runs_count_as_done_and_enter_the_report(tmp_path):
    spec, cells = study.load_spec(write_spec(tmp_path, {"dense": {"args": ["--sparsity=null"]},
                                                       "rigl": {"sparsity": "configs/sparsity/rigl.yaml"}}))
    out, archive = tmp_path / "runs", tmp_path / "archive"
    run = fake_run(out, "rigl-s1", method="rigl", loss=4.2)
    (run / "last.ckpt").write_bytes(b"x" * 100)  # big files stay behind
    dest = study.archive_run(run, archive)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == \
        ["flops.json", "logs/version_0/metrics.csv", "summary.json"]
    fake_run(out, "dense-s1", method=None, loss=4.0)
    import shutil
    shutil.rmtree(run)  # the machine that trained it is gone; its records are not
    assert study.finished("rigl-s1", out, archive) == dest and study.finished("rigl-s2", out, archive) is None
    results = study.collect(out, [cells["dense"], cells["rigl"]], [1], archive)
    assert [(r.cell.name, r.runs) for r in results] == [("dense", [out / "dense-s1"]), ("rigl", [dest])]
    md = study.report("s", "b", results, tmp_path / "docs", "cmd").read_text()
    assert "+0.2000" in next(line for line in md.splitlines() if line.startswith("| rigl |"))


def test_report_of_variants_alone_plots_them(tmp_path):
    """`--cells x-reclaim` alone: the default panel falls back to the variants (it was empty and the plot failed
    after the runs had trained)."""
    spec, cells = study.load_spec(write_spec(tmp_path, {
        "rigl": {"sparsity": "configs/sparsity/rigl.yaml"},
        "rigl-reclaim": {"of": "rigl", "args": ["--sparsity.reclaim_dead_units=true"]},
    }))
    out = tmp_path / "runs"
    fake_run(out, "rigl-reclaim-s1", method="rigl", loss=4.1)
    results = study.collect(out, [cells["rigl-reclaim"]], [1])
    md = study.report("s", "b", results, tmp_path / "docs", "cmd").read_text()
    assert next(line for line in md.splitlines() if line.startswith("| rigl-reclaim |"))
    assert (tmp_path / "docs" / "s-b-loss-vs-tokens.png").stat().st_size > 10_000
