"""Named bad inputs, each ending in exactly one `dstlm: error:` line that names the field (or the file and line)
and the fix, with exit code 2 and no traceback: wrong types, out-of-range numbers, unknown names, sections that
contradict each other, missing, empty or malformed data files, a tokenizer larger than the model's vocabulary,
a recipe that includes itself. (The generated configs of test_config_fuzz.py cover the schema at large.)"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from conftest import error_line, run_cli

pytestmark = pytest.mark.faults  # `make faults` runs every fault test (docs/faults.md)

BASE = dict(name="b", seed=3,
            model=dict(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=16),
            data=dict(vocab_size=512, block_size=32, batch_size=4, val_batches=1),
            optim=dict(lr=3e-3, warmup_steps=1),
            trainer=dict(max_steps=2, progress_bar=False, accelerator="cpu", ckpt_every_n_steps=0,
                         val_every_n_steps=2))
RIGL = {"sparsity": {"method": "rigl", "sparsity": 0.8, "delta_t": 1}}

CASES = [  # (id, recipe changes (dotted keys), expected text of the error line)
    # wrong types
    ("int-as-word", {"data.batch_size": "three"}, "data.batch_size: expected an integer, got 'three'"),
    ("float-for-int", {"model.n_layer": 1.5}, "model.n_layer: expected an integer, got '1.5'"),
    ("null-for-int", {"sparsity.t_start": None, **RIGL}, "sparsity.t_start=None must be an integer"),
    ("word-for-number", {"optim.lr": "fast"}, "optim.lr: expected a number, got 'fast'"),
    ("string-for-list", {"sparsity.no_ablate": "fc_out", **RIGL}, "sparsity.no_ablate: expected a list"),
    ("short-tuple", {"optim.betas": [0.9]}, "optim.betas: expected a list of 2 numbers"),
    ("literal", {"model.pos_emb": "alibi"}, "model.pos_emb: expected one of 'rope', 'learned', got 'alibi'"),
    ("section-as-word", {"model.moe": "yes"}, "model.moe: expected a mapping of its fields, got 'yes'"),
    ("nan", {"optim.lr": float("nan")}, "optim.lr=nan must be a finite number"),
    # out of range
    ("zero-batch", {"data.batch_size": 0}, "data.batch_size=0 must be a positive integer"),
    ("negative-lr", {"optim.lr": -1.0}, "optim.lr=-1.0 must be positive"),
    ("beta-above-one", {"optim.betas": [1.5, 0.9]}, "optim.betas=[1.5, 0.9] must both be in [0, 1)"),
    ("sparsity-one", {"sparsity.sparsity": 1.0, **RIGL}, "sparsity.sparsity=1.0 must be in [0, 1)"),
    ("dropout", {"model.dropout": 1.0}, "model.dropout=1.0 must be in [0, 1)"),
    ("negative-ckpt-interval", {"trainer.ckpt_every_n_steps": -5}, "trainer.ckpt_every_n_steps=-5 must be >= 0"),
    ("negative-clip", {"trainer.gradient_clip_val": -1.0}, "trainer.gradient_clip_val=-1.0 must be positive"),
    ("negative-workers", {"data.num_workers": -1}, "data.num_workers=-1 must be >= 0"),
    ("mlp-ratio", {"model.mlp_ratio": -1.0}, "model.mlp_ratio=-1.0 must give at least one MLP hidden unit"),
    ("init-std", {"model.init_std": 1e30}, "model.init_std=1e+30 must be in (0, 1]"),
    ("grad-accumulation", {"sparsity.grad_accumulation": 10**12, **RIGL},
     "sparsity.grad_accumulation=1000000000000 must be in [1, sparsity.delta_t=1]"),
    # unknown names
    ("unknown-top-key", {"learning_rate": 0.1}, "learning_rate is not a field of this section"),
    ("unknown-section-key", {"data.batchsize": 4}, "data.batchsize is not a field of this section"),
    ("unknown-method", {"sparsity.method": "magic", **RIGL}, "sparsity.method='magic' is unknown"),
    ("unknown-strategy", {"trainer.strategy": "fsdp"}, "trainer.strategy='fsdp' is not one of auto, ddp"),
    ("unknown-precision", {"trainer.precision": "8-true"}, "trainer.precision='8-true' is not one of"),
    ("unknown-accelerator", {"trainer.accelerator": "tpu"}, "trainer.accelerator='tpu' is not one of"),
    ("unknown-ift-family", {"ift.family": "tall", "ift.sparsity": 0.5, **RIGL}, "ift.family='tall' is unknown"),
    ("unknown-signal", {"trainer.preempt_signal": "FOO"}, "trainer.preempt_signal='FOO' is not a signal name"),
    ("no-such-layers", {"sparsity.include": ["no_such_layer*"], **RIGL},
     "sparsity.include=['no_such_layer*'] (exclude=[]) matches no sparsifiable weight"),
    # sections that contradict each other
    ("heads", {"model.n_head": 3}, "model.n_embd=16 is not divisible by model.n_head=3"),
    ("context", {"data.block_size": 64}, "data.block_size=64 exceeds model.block_size=32"),
    ("ift-without-dst", {"ift.family": "wide", "ift.sparsity": 0.5}, "ift.family='wide' needs a DST method"),
    ("zero-init-stage", {"trainer.zero_init": True}, "trainer.zero_init=true needs ZeRO-3"),
    ("offload-stage", {"trainer.offload_params": True}, "trainer.offload_params=true needs ZeRO-3"),
    ("nm-shape", {"sparsity": {"method": "nm", "n": 2, "m": 3}}, "N:M needs its input dimension (16) divisible by m=3"),
    ("moe-no-layer", {"model.n_layer": 1, "model.moe": {"num_experts": 2, "every": 2}},
     "model.moe.every=2 with model.n_layer=1 makes no layer a mixture of experts"),
    ("moe-top-k", {"model.moe": {"num_experts": 2, "top_k": 3}}, "model.moe.top_k=3 must be between 1 and"),
    ("fused-fp16", {"optim.fused": True, "trainer.precision": "16-mixed"}, "optim.fused=true with trainer.precision"),
    ("gpu-here", {"trainer.accelerator": "gpu"}, "trainer.accelerator='gpu' but this machine has no CUDA GPU"),
    ("tokenizer-vocab", {"data.tokenizer": "gpt2"},
     "data.tokenizer='gpt2' has 50257 tokens but model.vocab_size=512; set model.vocab_size >= 50257"),
    ("bpe-vocab", {"data.vocab_size": 100}, "data.vocab_size=100 is too small for byte-level BPE"),
    ("no-tokenizer", {"data.tokenizer": "/no/such/tokenizer.json"},
     "data.tokenizer='/no/such/tokenizer.json' not found"),
    ("run-name", {"name": "a/b"}, "name='a/b' must name one folder under out_dir"),
    ("too-little-data", {"data.batch_size": 4096}, "cannot fill one global batch of 4096"),
]


def apply(cfg: dict, changes: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for key, value in sorted(changes.items(), key=lambda kv: "." in kv[0]):  # whole sections first
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = copy.deepcopy(value)
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_corpus):
    d = tmp_path_factory.mktemp("badinput")
    path = d / "corpus.txt"
    path.write_text(open(small_corpus[0]).read()[:60_000])
    return path


def fit_error(tmp_path, corpus, cfg: dict, *argv: str) -> str:
    cfg = {**cfg, "out_dir": str(tmp_path / "runs")}
    cfg.setdefault("data", {}).setdefault("files", [str(corpus)])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    code, stderr = run_cli(["fit", "--config", str(recipe), *argv])
    assert code == 2, stderr[-3000:]
    return error_line(stderr)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("changes, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_named_bad_config_is_one_line(tmp_path, corpus, changes, message):
    assert message in fit_error(tmp_path, corpus, apply(BASE, changes))


@pytest.mark.filterwarnings("ignore")
def test_bad_value_on_the_command_line_is_one_line(tmp_path, corpus):
    line = fit_error(tmp_path, corpus, BASE, "--sparsity.method", "rigl", "--sparsity.delta_t", "often")
    assert "sparsity.delta_t: expected an integer, got 'often'" in line


def test_recipe_that_includes_itself(tmp_path, corpus):
    recipe = tmp_path / "loop.yaml"
    recipe.write_text(yaml.safe_dump({**BASE, "sparsity": "loop.yaml"}))
    code, stderr = run_cli(["fit", "--config", str(recipe)])
    line = error_line(stderr)
    assert code == 2 and "sparsity: Config file loop detected:" in line and "loop.yaml -> loop.yaml" in line


BAD_FILES = [  # (id, file name, bytes, expected text; {path} is the file); empty files are refused when alone
    ("missing", None, None, "corpus file '{path}' does not exist; fix data.files"),
    ("directory", "dir", None, "corpus file '{path}' is a directory, not a file"),
    ("empty", "empty.txt", b"", "data.files hold no text ({path}: empty, or only empty rows)"),
    ("latin-1", "latin.txt", "line one\ncaf\xe9\n".encode("latin-1"),
     "{path}:2: byte 0xe9 at offset 12 is not UTF-8; convert the file"),
    ("jsonl-without-field", "rows.jsonl", b'{"text": "a"}\n{"body": "b"}\n',
     "{path}:2: line 2 has no field 'text' (it has ['body']); fix the row or set data.text_field"),
    ("jsonl-not-json", "rows.jsonl", b'{"text": "a"}\n\n{oops\n', "{path}:3: not a JSON object"),
    ("jsonl-number", "rows.jsonl", b'{"text": 5}\n', "{path}:1: line 1's 'text' is a int, not text"),
    ("jsonl-only-empty-rows", "empty-rows.jsonl", b'{"text": ""}\n{"text": null}\n', "data.files hold no text"),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name, content, message", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_data_file_is_named_with_its_line(tmp_path, corpus, name, content, message):
    path = tmp_path / (name or "missing.txt")
    if name == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    # the corpus comes first, so the tokenizer trainer and the reader meet the bad file after a good one
    files = [str(path)] if "empty" in (name or "") or "only-empty" in message else [str(corpus), str(path)]
    cfg = apply(BASE, {"data.files": files, "data.tokenizer": "gpt2", "model.vocab_size": 50304})
    assert message.format(path=path) in fit_error(tmp_path, corpus, cfg)


@pytest.mark.filterwarnings("ignore")
def test_empty_documents_and_rows_are_skipped(tmp_path, corpus):
    """Empty documents are not errors: an empty .txt among good ones, and empty or null rows of a .jsonl, are
    skipped; the run trains on the rest."""
    from dstlm.data.packing import load_documents

    (tmp_path / "empty.txt").write_text("")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "first"}, {"text": ""}, {"text": None},
                                                           {"text": "second"}]))
    docs = load_documents([str(corpus), str(tmp_path / "empty.txt"), str(rows)])
    assert docs[1:] == ["first", "second"] and len(docs) == 3
    cfg = apply(BASE, {"data.files": [str(corpus), str(tmp_path / "empty.txt"), str(rows)],
                       "out_dir": str(tmp_path / "runs")})
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    code, stderr = run_cli(["fit", "--config", str(recipe)])
    assert code == 0, stderr[-3000:]
