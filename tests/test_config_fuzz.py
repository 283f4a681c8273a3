"""Every config reachable from a recipe ends in a finished run or in one line naming the field: hypothesis draws
recipes from the RunConfig schema (each field's type gives its wrong values: wrong types, zero, negative, NaN,
unknown names; a curated list gives valid alternatives, so sections combine inconsistently), and `dstlm fit`
runs each in-process. The property: exit code 0, or exit code 2 with exactly one `dstlm: error:` line that names
one of the fields the example changed; an exception escaping the command line fails the test. Seeded
(derandomize), so CI draws the same examples every time."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import tempfile
import typing
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import error_line, run_cli  # noqa: E402
from dstlm.models.gpt import GPTConfig  # noqa: E402
from dstlm.models.moe import MoEConfig  # noqa: E402
from dstlm.sparse.config import SparsityConfig  # noqa: E402
from dstlm.training.config import DataConfig, OptimConfig, TrainerConfig  # noqa: E402
from dstlm.transforms.ift_spec import SparseIFTConfig  # noqa: E402

pytestmark = pytest.mark.faults  # `make faults` runs every fault test (docs/faults.md)

# examples drawn by `make test` (the fast tier) and by `make test-all`, which draws 500 more in the slow tier
EXAMPLES = int(os.environ.get("DSTLM_FUZZ_EXAMPLES", 200))
MORE_EXAMPLES = int(os.environ.get("DSTLM_FUZZ_MORE_EXAMPLES", 500))

BASE = dict(name="f", seed=3,
            model=dict(vocab_size=512, block_size=32, n_layer=1, n_head=2, n_embd=16),
            data=dict(vocab_size=512, block_size=32, batch_size=4, val_batches=1),
            optim=dict(lr=3e-3, warmup_steps=1),
            trainer=dict(max_steps=2, progress_bar=False, accelerator="cpu", ckpt_every_n_steps=0,
                         val_every_n_steps=2, log_every_n_steps=1))

SECTIONS = {"model": GPTConfig, "model.moe": MoEConfig, "data": DataConfig, "optim": OptimConfig,
            "trainer": TrainerConfig, "sparsity": SparsityConfig, "ift": SparseIFTConfig}

# Fields whose wrong values could only hang or exhaust the machine rather than be refused: valid alternatives are
# listed for them below; the automatic wrong values are kept small.
SIZES = {"model.vocab_size", "model.block_size", "model.n_layer", "model.n_head", "model.n_embd",
         "model.mlp_ratio", "data.vocab_size", "data.block_size", "data.batch_size", "trainer.max_steps",
         "model.moe.num_experts", "model.moe.expert_hidden", "data.val_batches", "trainer.accumulate_grad_batches"}
# never drawn: a second process group (devices/nodes > 1 wait for ranks that never come), compiling, a GPU
# build, raw DeepSpeed JSON, the data source (drawn from FILES instead), the run folder (drawn below)
SKIP = {"trainer.devices", "trainer.num_nodes", "trainer.compile", "data.files", "data.hf_dataset",
        "trainer.deepspeed_config", "trainer.progress_bar", "trainer.preempt_signal", "data.num_workers"}

VALID = {
    "model.n_head": [1, 2, 4], "model.n_embd": [8, 16, 24, 32], "model.block_size": [16, 32, 64],
    "model.vocab_size": [256, 512, 1024], "model.n_layer": [1, 2], "model.mlp_ratio": [1.0, 2.5],
    "model.moe": [None, {"num_experts": 2}, {"num_experts": 4, "top_k": 2, "every": 1}],
    "model.moe.num_experts": [2, 4], "model.moe.expert_hidden": [8, None],
    "data.block_size": [16, 32, 64], "data.batch_size": [1, 4, 32], "data.val_fraction": [0.05, 0.5],
    "data.val_batches": [0, 1], "data.tokenizer": ["bpe", "gpt2", "/no/such/tokenizer.json"],
    "data.vocab_size": [300, 512, 1024], "data.format": ["auto", "text", "prompt_completion", "messages"],
    "data.text_field": ["text", "body"],
    "optim.lr": [1e-3, 1e12], "optim.warmup_steps": [0, 5], "optim.fused": [True, False],
    "trainer.precision": ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true", "8-true"],
    "trainer.accelerator": ["cpu", "gpu", "cuda", "tpu"],
    "trainer.strategy": ["auto", "fsdp", "deepspeed_stage_7", "deepspeed_stage_x", "horovod"],
    "trainer.max_steps": [1, 3], "trainer.accumulate_grad_batches": [1, 2], "trainer.gradient_clip_val": [None, 0.5],
    "trainer.ckpt_every_n_steps": [0, 1], "trainer.keep_last_k": [0, 1], "trainer.loss_chunk_tokens": [0, 7],
    "trainer.collective_timeout_s": [None, 5], "trainer.offload_params": [True], "trainer.zero_init": [True],
    "trainer.offload_optimizer": [True],
    "sparsity.method": ["static", "set", "rigl", "srigl", "gmp", "nm"], "sparsity.sparsity": [0.5, 0.9, None],
    "sparsity.distribution": ["uniform", "er", "erk", None], "sparsity.delta_t": [1, 2], "sparsity.t_end": [0.5, 1, 2],
    "sparsity.include": [None, ["*fc_in*"], ["no_such_layer*"]], "sparsity.exclude": [[], ["*"]],
    "sparsity.mask_init": ["random", "magnitude", "wanda", None], "sparsity.n": [1, 2], "sparsity.m": [3, 4],
    "sparsity.grad_accumulation": [1, 2], "sparsity.verify_every": [0, 1], "sparsity.reclaim_dead_units": [True],
    "sparsity.overrides": [{"*fc_in*": 0.5}, {"*": 0.2}], "sparsity.no_ablate": [["*fc_out*"]],
    "ift.family": ["wide", "parallel", "factorized", "doped"], "ift.sparsity": [0.5, 0.75],
    "ift.layers": [["mlp"], ["nothing"]], "ift.match": ["layers", "total"],
    "name": ["f", "", "a/../../b", "."], "seed": [0, -1, 2**70],
}
FILES = ["corpus", "missing", "empty", "latin1", "jsonl", "jsonl_no_field", "jsonl_bad_row", "directory"]


def wrong_values(path: str, tp) -> list:
    """Values of the wrong type or out of every sensible range, from the field's annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        out = [v for a in inner for v in wrong_values(path, a) if v is not None]
        return out + ([None] if type(None) not in args else [])
    if origin is typing.Literal:
        return ["zzz", 3, None]
    if origin in (list, tuple):
        return ["zzz", [[1]], None] if origin is list else ["zzz", [0.5], [1.5, 0.5], [math.nan, 0.9]]
    if origin is dict:
        return ["zzz", {"*": 1.5}, {"*": "x"}]
    if tp is bool:
        return ["maybe", 3, None]
    if tp is int:
        return [0, -1, 1.5, "x", None, True] + ([] if path in SIZES else [10**12])
    if tp is float:
        return [0.0, -1.0, math.nan, math.inf, "x", None] + ([] if path in SIZES else [1e30])
    if tp is str:
        return ["", "zzz", 5, None, ["a"]]
    return ["zzz", 5]


def schema() -> dict[str, list]:
    """path -> candidate values (valid alternatives first, then wrong ones) for every drawable field."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{section}.{f.name}"
            if path in SKIP or path in SECTIONS:
                continue
            out[path] = VALID.get(path, []) + wrong_values(path, hints[f.name])
    out["model.moe"] = VALID["model.moe"] + ["zzz", 5, {"zzz": 1}]
    for top in ("name", "seed"):
        out[top] = VALID[top] + ([5, None] if top == "name" else ["x", 1.5])
    return out


SCHEMA = schema()
PATHS = sorted(SCHEMA)


@st.composite
def recipes(draw):
    """(recipe dict, the dotted paths it changed)."""
    cfg = copy.deepcopy(BASE)
    changed = []
    if draw(st.booleans()):
        cfg["sparsity"] = {"method": draw(st.sampled_from(["rigl", "set", "srigl", "static"])), "sparsity": 0.8,
                           "delta_t": 1}
        changed.append("sparsity.")
        if draw(st.integers(0, 3)) == 0:
            cfg["ift"] = {"family": "wide", "sparsity": 0.5}
            changed.append("ift.")
    if draw(st.integers(0, 4)) == 0:
        cfg["model"]["moe"] = {"num_experts": 2}
        changed.append("model.moe")
    cfg["_files"] = draw(st.sampled_from(FILES[:1] * 6 + FILES[1:]))
    if cfg["_files"] != "corpus":
        changed.append("data.files")
    for path in draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=3, unique=True)):
        value = draw(st.sampled_from(SCHEMA[path]))
        *parents, leaf = path.split(".")
        node = cfg
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {"method": "rigl"} if p == "sparsity" else {"family": "wide"} if p == "ift" else {}
                changed.append(f"{p}.")  # a section this example adds: an error may name any of its fields
            node = node[p]
        node[leaf] = value
        changed.append(path)
    return cfg, changed


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, small_corpus):
    d = tmp_path_factory.mktemp("fuzzdata")
    text = Path(small_corpus[0]).read_text()[:60_000]
    (d / "corpus.txt").write_text(text)
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes(text[:20_000].encode() + "caf\xe9 cr\xe8me".encode("latin-1") * 50)
    rows = [{"text": text[i:i + 2000]} for i in range(0, 40_000, 2000)]
    import json

    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "nofield.jsonl").write_text("".join(json.dumps({"body": r["text"]}) + "\n" for r in rows))
    (d / "badrow.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]) + "{not json\n")
    (d / "dir").mkdir()
    return {"corpus": [str(d / "corpus.txt")], "missing": [str(d / "missing.txt")], "empty": [str(d / "empty.txt")],
            "latin1": [str(d / "latin1.txt")], "jsonl": [str(d / "rows.jsonl")],
            "jsonl_no_field": [str(d / "nofield.jsonl")], "jsonl_bad_row": [str(d / "badrow.jsonl")],
            "directory": [str(d / "dir")]}


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(example=recipes())
def test_generated_configs_train_or_fail_in_one_line_naming_a_changed_field(example, data_files):
    train_or_fail_in_one_line(example, data_files)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@settings(max_examples=MORE_EXAMPLES, derandomize=False, database=None, deadline=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
@seed(20261207)  # other draws than the fast tier's, the same every run
@given(example=recipes())
def test_more_generated_configs_train_or_fail_in_one_line(example, data_files):
    train_or_fail_in_one_line(example, data_files)


def train_or_fail_in_one_line(example, data_files) -> None:
    """The property: the recipe trains (exit 0) or fails with exit 2 and one line naming a field it changed."""
    cfg, changed = example
    cfg = copy.deepcopy(cfg)
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        files = data_files[cfg.pop("_files")]
        cfg.setdefault("data", {})["files"] = files
        cfg["out_dir"] = str(work / "runs")
        recipe = work / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(cfg))
        code, stderr = run_cli(["fit", "--config", str(recipe)])
        if code == 0:
            return
        assert code == 2, stderr[-3000:]
        line = error_line(stderr)
        names = {p for p in changed if "." in p} | {f"{p}{c}" for p in changed if "." not in p for c in "=:"}
        names |= {p.rsplit(".", 1)[0] for p in changed if p.count(".") > 1}  # model.moe for model.moe.top_k
        if "data.files" in changed:
            names |= set(files)  # a bad data file is named by its path (and line)
        assert any(name in line for name in names), f"changed {changed}: {line}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
