"""Fine-tuning examples: prompt/completion and chat rows become token rows whose loss counts the answers only
(checked against transformers' own chat rendering, tokenization and assistant mask), packing, the loss
normalised over each optimizer step's counted targets, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import REPO, tiny_run
from helpers.hf_models import save_tiny

from dstlm.data.examples import ChatTemplate, ExampleFields, example_arrays, lay_out, split_examples
from dstlm.data.sampler import ResumableBatchSampler
from dstlm.data.tokenizer import load_tokenizer
from dstlm.models.lm_loss import share_of_step

DIALOGUE = REPO / "dstlm" / "assets" / "finetune" / "dialogue.jsonl"

# ChatML with the assistant's part inside {% generation %}, so transformers can compute its own assistant mask
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def rows(n=40):
    return [json.loads(line) for line in DIALOGUE.read_text().splitlines()[:n]]


def chats(n=40, chars=None):
    """Multi-turn conversations from the dialogue pairs: system, then user/assistant turns (each cut at
    `chars` characters when given)."""
    out = []
    for k, r in enumerate(rows(n)):
        turns = [{"role": "system", "content": "Answer in character."},
                 {"role": "user", "content": r["prompt"][:chars]},
                 {"role": "assistant", "content": r["completion"][:chars]}]
        if k % 2:  # every other conversation has a second exchange
            turns += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": r["prompt"][:30]}]
        out.append({"messages": turns})
    return out


@pytest.fixture(scope="module")
def tok(small_corpus):
    return load_tokenizer("bpe", small_corpus, 512)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tok):
    """A tiny Llama folder (context 256: ChatML's markup takes many tokens of a 512-token BPE) whose tokenizer
    has the ChatML template above."""
    d = save_tiny("llama", tmp_path_factory.mktemp("chat") / "llama", tok, ctx=256)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    return d


def write_jsonl(path: Path, items) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def test_prompt_completion_rows_count_exactly_the_completion(tok):
    """One example per row: the row is the tokens of prompt + completion + end-of-text, then padding; the
    targets that count decode to exactly the completion and the end-of-text token."""
    data = rows(30)
    arrays, meta = example_arrays([("d", "prompt_completion", data)], tok, None, ExampleFields(), 256, 0.1, False,
                                  np.int64)
    train_idx, _ = split_examples(len(data), 0.1)
    assert meta["train"]["rows"] == len(train_idx) == 27 and meta["train"]["truncated"] == 0
    for row, counted, i in zip(arrays["train"], arrays["train_counted"], train_idx):
        r = data[i]
        ids = tok.encode(r["prompt"] + r["completion"]) + [tok.eos_id]
        assert row[: len(ids)].tolist() == ids and (row[len(ids):] == tok.eos_id).all()
        assert tok.decode(row[counted]) == r["completion"] + tok.eos
        assert not counted[len(ids):].any()  # padding never counts


def test_chat_rendering_ids_and_assistant_mask_equal_transformers(chat_dir):
    """Conversations: the rendered text and the token ids are transformers' apply_chat_template, and the
    targets that count are exactly transformers' own assistant mask (from the template's generation tags)."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(chat_dir))
    tok = load_tokenizer(str(chat_dir))
    assert tok.chat_template == CHATML
    template = ChatTemplate(tok.chat_template, tok.special_tokens)
    data = chats(12)
    arrays, meta = example_arrays([("c", "messages", data)], tok, template, ExampleFields(), 512, 0.01, False,
                                  np.int64)
    train_idx, _ = split_examples(len(data), 0.01)
    for row, counted, i in zip(arrays["train"], arrays["train_counted"], train_idx):
        msgs = data[i]["messages"]
        ref = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(ref["input_ids"]), list(ref["assistant_masks"])
        assert template.render(msgs) == hf_tok.apply_chat_template(msgs, tokenize=False)
        assert row[: len(ids)].tolist() == ids
        assert counted[: len(ids)].tolist() == [bool(m) for m in mask]
        answers = "".join(m["content"] + "<|im_end|>\n" for m in msgs if m["role"] == "assistant")
        assert tok.decode(row[counted]) == answers


def test_conversational_prompt_completion_counts_only_the_completion_turns(chat_dir):
    tok = load_tokenizer(str(chat_dir))
    template = ChatTemplate(tok.chat_template, tok.special_tokens)
    msgs = chats(2)[1]["messages"]  # system, user, assistant, user, assistant
    row = {"prompt": msgs[:3] + msgs[3:4], "completion": msgs[4:]}
    arrays, _ = example_arrays([("c", "prompt_completion", [row, row])], tok, template, ExampleFields(), 512, 0.5,
                               False, np.int64)
    assert tok.decode(arrays["train"][0][arrays["train_counted"][0]]) == msgs[4]["content"] + "<|im_end|>\n"


def test_packing_keeps_whole_examples_and_the_same_counted_targets(tok):
    examples = [(np.arange(1, n + 1), np.r_[np.zeros(n // 2, bool), np.ones(n - n // 2, bool)])
                for n in (5, 9, 4, 12, 7, 3)]
    one, c1, s1 = lay_out(examples, 15, 0, packing=False)
    packed, c2, s2 = lay_out(examples, 15, 0, packing=True)
    assert s1.rows == 6 and s2.rows == 3 and s1.counted == s2.counted == sum(int(c.sum()) for _, c in examples)
    # rows of 16 tokens: [5+9], [4+12], [7+3]: each example whole and in order
    assert packed[0, :14].tolist() == list(range(1, 6)) + list(range(1, 10)) and packed[0, 14:].tolist() == [0, 0]
    assert packed[1].tolist() == list(range(1, 5)) + list(range(1, 13))
    assert packed[2, :10].tolist() == list(range(1, 8)) + list(range(1, 4)) and not packed[2, 10:].any()
    # too long: cut at the row's end; nothing of the answer left: dropped
    _, _, s = lay_out([(np.arange(40), np.r_[np.zeros(10, bool), np.ones(30, bool)]),
                       (np.arange(40), np.r_[np.zeros(30, bool), np.ones(10, bool)])], 15, 0, packing=False)
    assert (s.rows, s.truncated, s.dropped) == (1, 2, 1)


def test_step_weight_is_every_ranks_counted_targets_of_the_optimizer_step():
    weights = np.random.default_rng(0).integers(0, 50, size=37)
    ranks = [ResumableBatchSampler(37, 3, seed=5, rank=r, world_size=2, total_batches=12, item_weights=weights,
                                   accumulate=2) for r in range(2)]
    batches = [list(s) for s in ranks]
    for b in range(12):
        step = [i for s in range(b - b % 2, b - b % 2 + 2) for r in range(2) for i, _ in batches[r][s]]
        want = int(weights[step].sum())
        assert {n for r in range(2) for _, n in batches[r][b]} == {want}


def test_scaled_micro_batches_give_the_gradient_of_the_steps_mean():
    """Two micro-batches with different numbers of counted targets: the sum of their scaled means, divided
    by the accumulation, has the gradient of one mean over all counted targets; plain means do not."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    x = torch.randn(4, 6, 8)
    y = torch.randint(0, 11, (4, 6))
    y[:2, :5] = -100  # the first micro-batch counts 2 targets, the second 12

    def loss(xs, ys):
        return torch.nn.functional.cross_entropy(head(xs).reshape(-1, 11), ys.reshape(-1), ignore_index=-100)

    def grad(f):
        head.zero_grad()
        f().backward()
        return head.weight.grad.clone()

    whole = grad(lambda: loss(x, y))
    n = (y != -100).sum()
    scaled = grad(lambda: sum(loss(x[s], y[s]) * share_of_step(y[s], n, 2) / 2 for s in (slice(0, 2), slice(2, 4))))
    plain = grad(lambda: sum(loss(x[s], y[s]) / 2 for s in (slice(0, 2), slice(2, 4))))
    torch.testing.assert_close(scaled, whole)
    assert not torch.allclose(plain, whole, atol=1e-4)


class GradProbe(L.Callback):
    """Every optimizer step's accumulated gradient, flattened."""

    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(torch.cat([p.grad.flatten() for p in pl_module.model.parameters()]).clone())


def _fit(tmp_path, name, files, **over):
    from dstlm.training.assembly.build import build

    cfg = tiny_run(tmp_path / "runs", files, name=name, **over)
    trainer, module, data = build(cfg, logger=False)
    probe = GradProbe()
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule=data)
    return probe.grads, module, data


@pytest.mark.parametrize("share", [True, False])
def test_accumulated_micro_batches_match_one_batch(tmp_path, tok, monkeypatch, share):
    """1 process x batch 4 and 1 process x batch 2 x 2 accumulated see the same examples per step and take the
    same gradient at every step, although micro-batches differ in how many targets count. Without the share of
    the step (each micro-batch's own mean, as a plain fine-tuning loop does) the gradients differ by percents."""
    if not share:
        monkeypatch.setattr("dstlm.training.loop.module.share_of_step", lambda y, n, k: torch.ones(()))
    files = [write_jsonl(tmp_path / "d.jsonl", rows(200))]
    data = dict(tokenizer=str(tok.save(tmp_path / "tok")), files=files, block_size=96, val_fraction=0.1)
    over = dict(model=dict(dropout=0.0, block_size=96), trainer=dict(max_steps=4, val_every_n_steps=4))
    g1, m1, d1 = _fit(tmp_path, "one", files, data={**data, "batch_size": 4}, **over)
    g2, m2, _ = _fit(tmp_path, "acc", files, data={**data, "batch_size": 2},
                     **{**over, "trainer": {**over["trainer"], "accumulate_grad_batches": 2}})
    assert len(g1) == len(g2) == 4
    off = [float((a - b).norm() / a.norm()) for a, b in zip(g1, g2)]
    if not share:
        assert max(off) > 1e-2, off
        return
    assert max(off) < 1e-5, off
    for (k, a), b in zip(m1.model.state_dict().items(), m2.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=k)  # Adam's first steps magnify float noise
    assert "examples" in d1.stats and d1.stats["train"]["counted"] < d1.stats["train"]["rows"] * 96


@pytest.mark.parametrize("items, fmt, template, message", [
    (None, "auto", "auto", "mixes plain text"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "auto", "none", "no chat template"),
    ([{"prompt": "a"}], "prompt_completion", "auto", r"needs the field\(s\) \['completion'\]"),
    ([{"prompt": "a", "completion": ["b"]}], "auto", "auto", "must both be strings or both lists"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "auto", "/nope.jinja", "is not a file"),
    ([{"prompt": "Speak! " * 40, "completion": "No."}] * 30, "auto", "auto",
     r"all 28 train examples were dropped: .* raise data.block_size"),
])
def test_bad_input_one_line(tmp_path, small_corpus, items, fmt, template, message):
    from dstlm.training.loop.datamodule import LMDataModule
    from dstlm.training.config import DataConfig

    files = [small_corpus[0]] + [write_jsonl(tmp_path / "rows.jsonl", items or rows(3))]
    if items is not None:
        files = files[1:]
    dm = LMDataModule(DataConfig(files=files, vocab_size=512, block_size=32, format=fmt, chat_template=template),
                      seed=0)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        dm._packed()
    assert "\n" not in str(e.value)


def test_template_that_is_not_prefix_consistent_is_refused(chat_dir):
    tok = load_tokenizer(str(chat_dir))
    # renders the number of messages first: a prefix of the conversation renders differently
    bad = ChatTemplate("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}", {}, "bad")
    with pytest.raises(ValueError, match="prefix by prefix"):
        example_arrays([("c", "messages", chats(2))], tok, bad, ExampleFields(), 64, 0.5, False, np.int64)


def test_bad_data_format_value_is_refused():
    from dstlm.training.config import DataConfig

    with pytest.raises(ValueError, match="data.format='chat' is not one of"):
        DataConfig(format="chat")


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_stage_2", marks=pytest.mark.slow)])
def test_two_ranks_match_one_process_on_examples(tmp_path, tok, strategy):
    """2 ranks x batch 2 (launch/torchrun.sh, gloo) end where 1 process x batch 4 ends on prompt/completion rows:
    the ranks' micro-batches count different numbers of completion tokens, and each is weighted by its share of
    the step, so the average over ranks is the step's mean."""
    import subprocess
    import sys

    import yaml

    from dstlm.checkpoint import read_checkpoint

    files = [write_jsonl(tmp_path / "d.jsonl", rows(300))]
    tok_dir = str(tok.save(tmp_path / "tok"))

    def recipe(name, batch):
        cfg = dict(name=name, out_dir=str(tmp_path / "runs"), seed=7,
                   model=dict(vocab_size=512, block_size=96, n_layer=2, n_head=2, n_embd=32, dropout=0.0),
                   data=dict(files=files, tokenizer=tok_dir, block_size=96, batch_size=batch, val_batches=2,
                             val_fraction=0.1),
                   optim=dict(lr=0.003, warmup_steps=2),
                   trainer=dict(max_steps=6, val_every_n_steps=6, ckpt_every_n_steps=6, progress_bar=False,
                                accelerator="cpu", log_every_n_steps=1))
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    r = subprocess.run(["bash", "launch/torchrun.sh", "2", recipe("two", 2)], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env={**env, "PYTHON": sys.executable, "STRATEGY": strategy})
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([sys.executable, "-m", "dstlm.cli", "fit", "--config", recipe("one", 4)], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "fine-tuning examples" in r.stdout + r.stderr
    two, one = (read_checkpoint(tmp_path / "runs" / n) for n in ("two", "one"))
    assert two["global_step"] == one["global_step"] == 6
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    s2, s1 = (json.loads((tmp_path / "runs" / n / "summary.json").read_text()) for n in ("two", "one"))
    assert abs(s2["val_loss"] - s1["val_loss"]) < 1e-4


def test_hf_chat_fine_tune_exports_the_template_and_special_tokens(tmp_path, tok, chat_dir, capsys):
    """A tiny Llama whose tokenizer carries a chat template, fine-tuned sparsely (RigL 50 %) on conversations
    through `fit`: the rows are rendered with that template (only assistant turns count), and the exported
    folder's tokenizer, reloaded by vanilla transformers, has the same template and special tokens and renders
    a conversation to the same ids as the source."""
    from transformers import AutoTokenizer

    from dstlm.hf.export import export
    from dstlm.hf.source import HFModelConfig
    from dstlm.sparse import SparsityConfig
    from dstlm.training.assembly.run import fit

    files = [write_jsonl(tmp_path / "chat.jsonl", chats(120, chars=40))]
    cfg = tiny_run(tmp_path, files, name="chat", model=dict(block_size=192),
                   data=dict(tokenizer=str(chat_dir), block_size=192, batch_size=4),
                   trainer=dict(max_steps=4, val_every_n_steps=4))
    cfg.model = HFModelConfig(hf=str(chat_dir))
    cfg.sparsity = SparsityConfig(method="rigl", sparsity=0.5, delta_t=2)
    summary = fit(cfg)
    assert capsys.readouterr().out.count("120 fine-tuning examples (114 train, 6 val)") == 1
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.01) and np.isfinite(summary["val_loss"])
    out = export(str(tmp_path / "chat"), str(tmp_path / "exported"))
    src, exp = AutoTokenizer.from_pretrained(str(chat_dir)), AutoTokenizer.from_pretrained(str(out))
    assert exp.chat_template == src.chat_template == CHATML
    assert (exp.eos_token, exp.bos_token, exp.unk_token) == (src.eos_token, src.bos_token, src.unk_token)
    conv = chats(2)[1]["messages"]
    assert exp.apply_chat_template(conv, tokenize=True) == src.apply_chat_template(conv, tokenize=True)


def test_a_parquet_folder_gives_the_rows_of_the_jsonl_file(tmp_path, tok):
    """data.hf_dataset pointing at a local folder of .parquet files (datasets' packaged loader) gives the same
    token rows and counted targets as the same rows in a .jsonl file."""
    import datasets

    from dstlm.training.config import DataConfig
    from dstlm.training.loop.datamodule import LMDataModule

    items = rows(60)
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_list(items).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    tok_dir = str(tok.save(tmp_path / "tok"))
    common = dict(tokenizer=tok_dir, block_size=64, val_fraction=0.1)
    a = LMDataModule(DataConfig(files=[write_jsonl(tmp_path / "d.jsonl", items)], **common), seed=0)._packed()
    b = LMDataModule(DataConfig(hf_dataset=str(tmp_path / "pq"), **common), seed=0)._packed()
    assert a.train.shape[0] > 30 and np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert np.array_equal(a.train_counted, b.train_counted) and 0 < a.train_counted.mean() < 0.5
