"""End-to-end Lightning runs on the tiny config (seconds each)."""

import hashlib
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from conftest import REPO, run_cli, tiny_run
from dstlm.training.assembly.build import build
from dstlm.training.assembly.run import fit


class StopAt(L.Callback):
    """Simulates a preemption: stop training after optimizer step `step` (the schedule is unchanged)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class BatchRecorder(L.Callback):
    """Digest of every training batch, in order, and the loss of every step."""

    def __init__(self):
        self.batches, self.losses = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(hashlib.sha1(batch[0].numpy().tobytes()).hexdigest()[:12])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_loss_falls(tmp_path, small_corpus):
    rec = BatchRecorder()
    cfg = tiny_run(tmp_path, small_corpus, trainer=dict(max_steps=80, val_every_n_steps=40),
                   optim=dict(lr=1e-2, warmup_steps=5))
    summary = fit(cfg, extra_callbacks=[rec])
    first, last = sum(rec.losses[:5]) / 5, sum(rec.losses[-5:]) / 5
    assert first > 6.0  # ~ln(512) at init
    assert last < first - 1.0, (first, last)
    assert summary["val_loss"] < 5.5
    assert (tmp_path / "t" / "loss.png").stat().st_size > 5000
    saved = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert 0.05 < saved["peak_memory_gib"] < 24 and "resident" in saved["peak_memory_kind"]
    csv_text = (tmp_path / "t" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in csv_text and "val/loss" in csv_text and "tok/s" in csv_text
    assert list((tmp_path / "t" / "logs" / "version_0").glob("events.out.tfevents*"))


def _params(module):
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_resume_continues_data_stream_exactly(tmp_path, small_corpus):
    """Stop at step 3 (mid-epoch), resume: same batches, losses and weights as an unbroken run."""
    over = dict(trainer=dict(max_steps=10, ckpt_every_n_steps=3, val_every_n_steps=4),
                data=dict(batch_size=4), model=dict(dropout=0.1))
    full_rec = BatchRecorder()
    trainer, module, data = build(tiny_run(tmp_path / "a", small_corpus, **over), [full_rec], logger=False)
    trainer.fit(module, datamodule=data)
    assert len(full_rec.batches) == 10 and len(set(full_rec.batches)) == 10
    epoch_len = data.train_sampler.batches_per_epoch
    assert epoch_len > 10  # the interruption happens mid-epoch

    cfg_b = tiny_run(tmp_path / "b", small_corpus, **over)
    first = BatchRecorder()
    trainer, module_b, data = build(cfg_b, [first, StopAt(3)], logger=False)
    trainer.fit(module_b, datamodule=data)
    ckpt = tmp_path / "b" / "t" / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and len(first.batches) == 3
    second = BatchRecorder()
    trainer, module_b, data = build(cfg_b, [second], logger=False)
    trainer.fit(module_b, datamodule=data, ckpt_path=str(ckpt))
    assert first.batches + second.batches == full_rec.batches
    assert first.losses + second.losses == full_rec.losses  # bit-exact on CPU (dropout RNG restored too)
    for k, v in _params(module).items():
        assert torch.equal(v, _params(module_b)[k]), k


def test_resume_across_epoch_boundary(tmp_path, small_corpus):
    over = dict(data=dict(batch_size=16), trainer=dict(val_every_n_steps=100))
    probe = tiny_run(tmp_path / "p", small_corpus, **over)
    _, _, data = build(probe, logger=False)
    data.prepare_data()
    data.setup("fit")
    n = data.train_sampler.batches_per_epoch
    full = BatchRecorder()
    cfg = tiny_run(tmp_path / "a", small_corpus, trainer=dict(max_steps=n + 3, val_every_n_steps=100),
                   data=dict(batch_size=16))
    trainer, module, data = build(cfg, [full], logger=False)
    trainer.fit(module, datamodule=data)
    cfg = tiny_run(tmp_path / "b", small_corpus, trainer=dict(max_steps=n + 3, val_every_n_steps=100),
                   data=dict(batch_size=16))
    a = BatchRecorder()
    trainer, module, data = build(cfg, [a, StopAt(n)], logger=False)
    trainer.fit(module, datamodule=data)
    b = BatchRecorder()
    trainer, module, data = build(cfg, [b], logger=False)
    trainer.fit(module, datamodule=data, ckpt_path=str(tmp_path / "b" / "t" / "checkpoints" / "last.ckpt"))
    assert a.batches + b.batches == full.batches


def _cli(*args, cwd=REPO, timeout=300):
    return subprocess.run([sys.executable, "-m", "dstlm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _recipe(tmp_path, small_corpus) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"name: smoke\nout_dir: {tmp_path}/runs\n"
        f"model:\n  vocab_size: 512\n  block_size: 64\n  n_layer: 2\n  n_head: 2\n  n_embd: 32\n"
        f"data:\n  files: {json.dumps(small_corpus)}\n  vocab_size: 512\n  block_size: 32\n  batch_size: 4\n"
        f"  val_batches: 1\ntrainer:\n  max_steps: 3\n  val_every_n_steps: 3\n"
        f"  progress_bar: false\n  accelerator: cpu\n")
    return str(path)


def test_cli_fit_3_steps_and_validate(tmp_path, small_corpus):
    recipe = _recipe(tmp_path, small_corpus)
    r = _cli("fit", "--config", recipe)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val perplexity" in r.stdout
    run = tmp_path / "runs" / "smoke"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens_per_s"] > 0  # run average, validation excluded
    saved = (run / "config.yaml").read_text()
    assert "max_steps: 3" in saved and "n_embd: 32" in saved  # the resolved config is saved with the run
    r = _cli("validate", "--config", recipe, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(float(r.stdout.split("val/loss")[1].split()[0]) - summary["val_loss"]) < 1e-4
    r = _cli("fit", "--config", recipe, "--print_config")
    assert r.returncode == 0 and "block_size: 32" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "configs/model/nonexistent.yaml"], "nonexistent.yaml"),
    (["--model.n_head", "3"], "model.n_embd=32 is not divisible by model.n_head=3"),
    (["--data.files", "[/no/such/corpus.txt]"], "corpus file '/no/such/corpus.txt' does not exist"),
    (["--data.block_size", "128"], "data.block_size=128 exceeds model.block_size=64"),
    (["--data.batch_size", "0"], "data.batch_size=0 must be a positive integer"),
    (["--data.batch_size", "-2"], "data.batch_size=-2 must be a positive integer"),
])
@pytest.mark.faults
def test_cli_bad_input_one_line(tmp_path, small_corpus, args, message, monkeypatch):
    """`dstlm fit` in this process (a fresh interpreter costs seconds of imports per case; the next test shows a
    real process's whole stderr is the one line too)."""
    monkeypatch.chdir(REPO)
    code, stderr = run_cli(["fit", "--config", _recipe(tmp_path, small_corpus), *args])
    err = stderr.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dstlm: error:") and message in err[0], stderr[-2000:]


@pytest.mark.faults
def test_cli_bad_input_is_one_line_on_a_real_process_stderr(tmp_path, small_corpus):
    r = _cli("fit", "--config", _recipe(tmp_path, small_corpus), "--model.n_head", "3")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dstlm: error: model.n_embd=32 is not divisible by model.n_head=3"), \
        r.stderr


def test_cli_unknown_command():
    r = _cli("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


class FailingSave(L.Callback):
    """Makes every checkpoint write after step `step` die halfway (a partial file, then an error)."""

    def __init__(self, step):
        self.step = step

    def on_train_start(self, trainer, pl_module):
        original = trainer.strategy.save_checkpoint

        def save(checkpoint, filepath, storage_options=None):
            if checkpoint["global_step"] > self.step:
                with open(filepath, "wb") as f:
                    f.write(b"partial")
                raise OSError("disk full (simulated)")
            return original(checkpoint, filepath, storage_options)

        trainer.strategy.save_checkpoint = save


@pytest.mark.faults
def test_failed_save_keeps_last_good_checkpoint(tmp_path, small_corpus):
    cfg = tiny_run(tmp_path, small_corpus, trainer=dict(max_steps=8, ckpt_every_n_steps=3))
    trainer, module, data = build(cfg, [FailingSave(3)], logger=False)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit(module, datamodule=data)
    ckpt_dir = tmp_path / "t" / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # the step-6 save failed; the step-3 checkpoint is intact
    assert torch.load(ckpt_dir / "step0000003.ckpt", weights_only=True)["global_step"] == 3
    # and training resumes from it
    cfg.trainer.max_steps = 5
    trainer, module, data = build(cfg, logger=False)
    trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert trainer.global_step == 5
    # last.ckpt is a link to the newest complete step checkpoint, moved on by the resumed run (no last-v1)
    assert (ckpt_dir / "last.ckpt").is_symlink() and os.readlink(ckpt_dir / "last.ckpt") == "step0000005.ckpt"
    assert sorted(p.name for p in ckpt_dir.glob("last*")) == ["last.ckpt"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_recipe_parses_without_duplicate_keys(recipe, monkeypatch):
    """Each shipped recipe resolves to a valid RunConfig, and no YAML key is given twice (YAML keeps the
    last silently: a second `data:` would drop the first one's fields)."""
    import yaml

    from dstlm.cli import parse_run
    from dstlm.training.assembly.summary import config_yaml

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        keys = [loader.construct_object(k) for k, _ in node.value]
        dup = {k for k in keys if keys.count(k) > 1}
        assert not dup, f"{recipe}: duplicate keys {dup}"
        return loader.construct_mapping(node)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    yaml.load((REPO / "recipes" / recipe).read_text(), Loader=Strict)
    monkeypatch.chdir(REPO)
    cfg, _ = parse_run("dstlm fit", ["--config", f"recipes/{recipe}"])
    assert cfg.name and recipe.startswith(cfg.name) and "model:" in config_yaml(cfg)


def test_compiled_model_trains_and_saves_plain_keys(tmp_path, small_corpus):
    """trainer.compile: torch.compile in place; the run matches the eager run's first loss and its checkpoint
    has the eager model's keys (loadable without compile)."""
    from dstlm.checkpoint import load_checkpoint

    losses = {}
    for compiled in (False, True):
        cfg = tiny_run(tmp_path / str(compiled), small_corpus, trainer=dict(max_steps=3, compile=compiled))
        rec = BatchRecorder()
        trainer, module, data = build(cfg, [rec], logger=False)
        trainer.fit(module, datamodule=data)
        losses[compiled] = rec.losses
    assert abs(losses[True][0] - losses[False][0]) < 1e-4, losses
    ckpt = torch.load(tmp_path / "True" / "t" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    load_checkpoint(tmp_path / "True" / "t")
