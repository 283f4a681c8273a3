"""lm-eval integration: the dstlm LM, shipped offline tasks, HF export, and their agreement."""

import json
import math

import pytest
import torch

from conftest import run_cli, tiny_run
from dstlm.checkpoint import load_checkpoint
from dstlm.eval.harness import SHIPPED_TASKS, evaluate, format_table, run_eval, scores
from dstlm.training.assembly.run import fit


@pytest.fixture(scope="module")
def trained(small_corpus):
    """Two tiny trained checkpoints: RoPE (exports to GPT-NeoX) and learned positions (exports to GPT-2)."""
    from conftest import shared_result

    out = {}
    for pos in ("rope", "learned"):
        def make(d, pos=pos) -> None:  # once per pytest run, whichever pytest worker asks first
            cfg = tiny_run(d, small_corpus, name=pos, model=dict(pos_emb=pos, block_size=256),
                           data=dict(block_size=64), trainer=dict(max_steps=30, val_every_n_steps=30),
                           optim=dict(lr=1e-2))
            fit(cfg)

        out[pos] = shared_result(f"eval: {pos} run {small_corpus}", make) / pos / "checkpoints" / "last.ckpt"
    return out


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_export_logits_equal(trained, tmp_path, pos):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dstlm.hf.export import export

    out = export(str(trained[pos]), str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == ("GPTNeoXForCausalLM" if pos == "rope" else "GPT2LMHeadModel")
    loaded = load_checkpoint(trained[pos])
    text = "ROMEO: But soft, what light through yonder window breaks? It is the east."
    ids = torch.tensor([loaded.tokenizer.encode(text)])
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok(text)["input_ids"] == ids[0].tolist()  # the exported tokenizer is the same tokenizer
    with torch.no_grad():
        ours = loaded.model(ids)
        theirs = hf(ids).logits
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_dstlm_eval_equals_lm_eval_hf_model(trained, tmp_path):
    """Same local task files, same requests: dstlm's LM and lm-eval's own `hf` model on the exported
    directory agree on acc, acc_norm and perplexities to 1e-4."""
    from lm_eval.models.huggingface import HFLM

    from dstlm.eval.lm import DstlmLM
    from dstlm.hf.export import export

    out = export(str(trained["rope"]), str(tmp_path / "hf"))
    tasks = ["hellaswag", "lambada_openai", "wikitext", "piqa"]
    ours = scores(evaluate(DstlmLM(checkpoint=str(trained["rope"]), batch_size=4), tasks, limit=12))
    ref = scores(evaluate(HFLM(pretrained=str(out), batch_size=4, device="cpu", dtype="float32"), tasks, limit=12))
    for task in tasks:
        for metric, value in ref[task].items():
            assert ours[task][metric] == pytest.approx(value, abs=1e-4, rel=1e-4), (task, metric)
    assert {"acc", "acc_norm"} <= set(ours["hellaswag"]) and "word_perplexity" in ours["wikitext"]


def test_every_shipped_task_runs(trained, tmp_path):
    assert len(SHIPPED_TASKS) == 10
    results = run_eval(str(trained["rope"]), SHIPPED_TASKS, limit=3, batch_size=8, out=str(tmp_path / "r.json"))
    table = scores(results)
    assert set(table) == set(SHIPPED_TASKS)
    for task, metrics in table.items():
        assert metrics, task
        for name, value in metrics.items():
            assert math.isfinite(value) or name.endswith("perplexity"), (task, name, value)
    assert 0.0 <= table["boolq"]["acc"] <= 1.0 and table["wikitext"]["word_perplexity"] > 1.0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert "hellaswag" in saved["results"]


def test_standard_errors_on_request(trained):
    """bootstrap_iters > 0: accuracies get lm-eval's closed-form standard error sqrt(p(1-p)/(n-1)) for 0/1
    scores, perplexities a bootstrapped one (in this process, seeded: the same twice); none without it."""
    from dstlm.eval.lm import DstlmLM

    lm = DstlmLM(checkpoint=str(trained["rope"]), batch_size=8)
    plain = scores(evaluate(lm, ["copa", "lambada_openai"], limit=20))
    assert not any(m.endswith("_stderr") for ms in plain.values() for m in ms)
    first = scores(evaluate(lm, ["copa", "lambada_openai"], limit=20, bootstrap_iters=200), stderr=True)
    again = scores(evaluate(lm, ["copa", "lambada_openai"], limit=20, bootstrap_iters=200), stderr=True)
    p = first["copa"]["acc"]
    assert first["copa"]["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 19))
    assert first["lambada_openai"]["perplexity_stderr"] > 0
    assert first == again
    assert "± " in format_table(first)


def test_generate_until_stops(trained):
    from lm_eval.api.instance import Instance

    from dstlm.eval.lm import DstlmLM

    lm = DstlmLM(checkpoint=str(trained["rope"]))
    req = Instance(request_type="generate_until", doc={}, idx=0,
                   arguments=("ROMEO:", {"until": ["\n"], "max_gen_toks": 12}))
    (text,) = lm.generate_until([req], disable_tqdm=True)
    assert isinstance(text, str) and "\n" not in text
    ids = lm.tok_encode("ROMEO:")
    greedy = lm.model.generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):].tolist()
    assert lm.tok_decode(greedy).split("\n")[0] == text


@pytest.mark.parametrize("args, message", [
    (["--tasks", "not_a_task"], "unknown task 'not_a_task'"),
    (["--tasks", "piqa", "--checkpoint", "/no/such.ckpt"], "checkpoint '/no/such.ckpt' does not exist"),
])
def test_eval_cli_bad_input(trained, args, message):
    """`dstlm eval` in this process (tests/test_training.py shows a real process's stderr is the one line too)."""
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(trained["rope"]), *args]
    code, stderr = run_cli(["eval", *args])
    err = stderr.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], stderr[-2000:]


def test_checkpoint_mismatch_and_missing_tokenizer(trained, tmp_path):
    from dstlm.models import GPTConfig

    loaded = load_checkpoint(trained["rope"])
    other = GPTConfig(**{**loaded.config.to_dict(), "n_layer": 3})
    with pytest.raises(ValueError, match="checkpoint model.n_layer=2 but this run has model.n_layer=3"):
        load_checkpoint(trained["rope"], expect=other)
    ckpt = torch.load(trained["rope"], weights_only=True)
    ckpt.pop("dstlm")
    torch.save(ckpt, tmp_path / "notok.ckpt")
    with pytest.raises(ValueError, match="carries no tokenizer"):
        load_checkpoint(tmp_path / "notok.ckpt")


def test_in_training_eval_in_summary(tmp_path, small_corpus):
    from dstlm.training.loop.eval_callback import EvalConfig

    cfg = tiny_run(tmp_path, small_corpus, model=dict(block_size=256), data=dict(block_size=64),
                   trainer=dict(max_steps=4, val_every_n_steps=4))
    cfg.eval = EvalConfig(tasks=["lambada_openai", "copa"], every_n_steps=2, limit=4, batch_size=4)
    summary = fit(cfg)
    assert set(summary["eval"]) == {"lambada_openai", "copa"}
    assert 0.0 <= summary["eval"]["copa"]["acc"] <= 1.0
    csv_text = (tmp_path / "t" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "eval/lambada_openai/acc" in csv_text and "eval/copa/acc" in csv_text
    with pytest.raises(ValueError, match="eval.limit=0 must be positive"):
        EvalConfig(limit=0)
