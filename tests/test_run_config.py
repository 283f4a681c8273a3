"""A run's saved config.yaml is what ran (method defaults filled in) and re-runs to the same result;
sparsity.yaml records the layout the engine used (after Sparse-IFT's rewrite)."""

from __future__ import annotations

import json

import pytest
import yaml

from dstlm.cli import main

RECIPE = """name: {name}
out_dir: {out}
model: {{vocab_size: 512, block_size: 32, n_layer: 2, n_head: 2, n_embd: 32}}
data: {{files: {files}, vocab_size: 512, block_size: 32, batch_size: 4, val_batches: 1}}
optim: {{lr: 0.003, warmup_steps: 2}}
trainer: {{max_steps: 4, val_every_n_steps: 4, ckpt_every_n_steps: 0, progress_bar: false, accelerator: cpu}}
"""
CASES = {
    "dense": "",
    "nm": "sparsity: {method: nm, n: 2, m: 4, delta_t: 2, t_end: 1.0}\n",
    "ift": ("sparsity: {method: rigl, delta_t: 2, t_end: 1.0}\n"
            "ift: {family: parallel, sparsity: 0.5}\n"),
}


def fit_recipe(path, *args) -> dict:
    assert main(["fit", "--config", str(path), *args]) == 0
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_saved_config_reruns_to_the_same_val_loss(tmp_path, small_corpus, case):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(name=case, out=tmp_path / "runs", files=json.dumps(small_corpus)) + CASES[case])
    fit_recipe(recipe)
    run = tmp_path / "runs" / case
    first = json.loads((run / "summary.json").read_text())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 4 and saved["model"]["n_embd"] == 32
    if case == "dense":
        assert saved["sparsity"] is None and not (run / "sparsity.yaml").exists()
    if case == "nm":  # the values the method fixes are written out, not left unset
        assert saved["sparsity"]["sparsity"] == 0.5 and saved["sparsity"]["distribution"] == "uniform"
        assert saved["sparsity"]["sparse_init"] == "rescale"
    fit_recipe(run / "config.yaml", "--name", case + "-again")
    again = json.loads((tmp_path / "runs" / (case + "-again") / "summary.json").read_text())
    assert again["val_loss"] == first["val_loss"] and again["steps"] == first["steps"] == 4
    if case != "dense":
        assert again["sparsity"] == first["sparsity"]


def test_sparsity_yaml_records_what_the_engine_used(tmp_path, small_corpus):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(name="s", out=tmp_path / "runs", files=json.dumps(small_corpus))
                      + "sparsity: {method: srigl, sparsity: 0.8, delta_t: 2, t_end: 1.0}\n")
    fit_recipe(recipe)
    rec = yaml.safe_load((tmp_path / "runs" / "s" / "sparsity.yaml").read_text())
    assert rec["method"] == "srigl" and rec["mask_updates"] == 1
    assert rec["effective_config"]["sparse_init"] == "rescale"
    for name, layer in rec["layers"].items():
        rows = layer["shape"][0]
        assert layer["budget"] == rows * layer["fan_in"], name  # constant fan-in: every row holds fan_in
        alive = rows - layer["final_ablated_rows"]
        assert layer["final_active"] <= layer["budget"] and layer["final_active"] % max(1, alive) == 0, name
    census = json.loads((tmp_path / "runs" / "s" / "summary.json").read_text())["unit_census"]
    assert census["units"] == 2 * (32 + 128)  # v_proj/out_proj and fc_in/fc_out units of 2 blocks
    # SRigL's rows draw their inputs independently (2 of 320 units dead here after one update); with one input
    # order shared by all rows, most fc_out / out_proj columns started empty
    assert census["dead"] <= 0.02 * census["units"]
    total = sum(la["shape"][0] * la["shape"][1] for la in rec["layers"].values())
    assert rec["density"] == pytest.approx(sum(la["final_active"] for la in rec["layers"].values()) / total, abs=1e-6)


def test_ift_rewrite_is_recorded_and_user_fields_it_replaces_are_reported(tmp_path, small_corpus):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(name="i", out=tmp_path / "runs", files=json.dumps(small_corpus))
                      + "sparsity: {method: rigl, delta_t: 2, t_end: 1.0, include: ['blocks.0.*']}\n"
                      + "ift: {family: doped, sparsity: 0.5}\n")
    with pytest.warns(UserWarning, match=r"ignored: sparsity.include=\['blocks.0.\*'\]"):
        fit_recipe(recipe)
    rec = yaml.safe_load((tmp_path / "runs" / "i" / "sparsity.yaml").read_text())
    include = rec["effective_config"]["include"]
    assert include and all(n.endswith(".sparse.weight") for n in include)  # doped: only the sparse part
    assert set(rec["layers"]) == set(include) and rec["effective_config"]["distribution"] == "uniform"
