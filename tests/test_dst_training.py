"""DST inside real Lightning runs: invariants after every step, exact resume, every method."""

import json

import lightning as L
import pytest
import torch

from conftest import REPO, run_cli, tiny_run
from dstlm.sparse import SparsityConfig, TorchBackend
from dstlm.training.assembly.build import build
from dstlm.training.assembly.run import fit
from test_training import StopAt


class InvariantProbe(L.Callback):
    """After every optimizer step (and after DSTCallback): invariants hold; grown entries are exactly 0
    with zero optimizer state; records the masks after every update."""

    def __init__(self):
        self.before, self.updates, self.steps_checked, self.grown_total = None, [], 0, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = {sp.name: sp.mask.clone() for sp in pl_module.sparse_engine.params}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        engine = pl_module.sparse_engine
        backend = TorchBackend(trainer.optimizers[0])
        assert engine.verify(backend) == [], engine.verify(backend)
        self.steps_checked += 1
        changed = False
        for sp in engine.params:
            grown = sp.mask & ~self.before[sp.name]
            if grown.any():
                changed = True
                self.grown_total += int(grown.sum())
                assert (sp.weight.detach()[grown] == 0).all()
                for t in trainer.optimizers[0].state[sp.weight].values():
                    if torch.is_tensor(t) and t.shape == sp.weight.shape:
                        assert (t[grown] == 0).all()
        if changed or engine.cfg.method == "gmp":
            self.updates.append({sp.name: sp.mask.clone() for sp in engine.params})


def sparse_run(tmp_path, files, method, **over):
    sp = dict(method=method, delta_t=2, t_end=1.0, drop_fraction=0.3)
    if method != "nm":  # N:M's structure fixes its sparsity (2:4 -> 0.5)
        sp["sparsity"] = 0.8
    sp.update(over.pop("sparsity", {}))
    trainer = dict(max_steps=8, val_every_n_steps=4)
    trainer.update(over.pop("trainer", {}))
    cfg = tiny_run(tmp_path, files, trainer=trainer, **over)
    cfg.sparsity = SparsityConfig(**sp)
    return cfg


@pytest.mark.parametrize("method", ["static", "set", "rigl", "srigl", "gmp", "nm"])
def test_invariants_every_step(tmp_path, small_corpus, method):
    probe = InvariantProbe()
    cfg = sparse_run(tmp_path, small_corpus, method, optim=dict(optimizer="adamw"))
    summary = fit(cfg, extra_callbacks=[probe])
    assert probe.steps_checked == 8
    engine_density = 1.0 - summary["sparsity"]
    if method == "static":
        assert probe.grown_total == 0 and summary["mask_updates"] == 0
    elif method == "gmp":
        assert summary["mask_updates"] == 4 and abs(summary["sparsity"] - 0.8) < 0.01
    else:
        assert summary["mask_updates"] == 3  # steps 2, 4, 6 (< t_end = 8)
        assert probe.grown_total > 0
    if method == "nm":
        assert engine_density == pytest.approx(0.5)
    elif method != "gmp":
        assert abs(engine_density - 0.2) < 0.01


def test_sgd_momentum_zeroed_at_pruned_entries(tmp_path, small_corpus):
    probe = InvariantProbe()
    cfg = sparse_run(tmp_path, small_corpus, "rigl", optim=dict(optimizer="sgd", lr=0.05))
    fit(cfg, extra_callbacks=[probe])
    assert probe.steps_checked == 8 and probe.grown_total > 0


def test_srigl_rows_constant_fan_in_in_training(tmp_path, small_corpus):
    probe = InvariantProbe()
    cfg = sparse_run(tmp_path, small_corpus, "srigl", sparsity=dict(gamma_sal=0.9, sparsity=0.9))
    trainer, module, data = build(cfg, [probe], logger=False)
    trainer.fit(module, datamodule=data)
    engine = module.sparse_engine
    last = engine.params[-1]
    assert bool(last.mask.any(dim=1).all())  # the last layer is never ablated
    for sp in engine.params:
        rows = sp.mask.sum(1)
        assert ((rows == 0) | (rows == engine.fan_in[sp.name])).all()


@pytest.mark.parametrize("method", ["rigl", "srigl"])
def test_resume_after_second_update_matches_uninterrupted(tmp_path, small_corpus, method):
    over = dict(trainer=dict(max_steps=10, ckpt_every_n_steps=4), model=dict(dropout=0.1))
    full = InvariantProbe()
    trainer, ref, data = build(sparse_run(tmp_path / "a", small_corpus, method, **over), [full], logger=False)
    trainer.fit(ref, datamodule=data)
    cfg = sparse_run(tmp_path / "b", small_corpus, method, **over)
    first = InvariantProbe()
    trainer, mod, data = build(cfg, [first, StopAt(4)], logger=False)  # updates at steps 2 and 4, then stop
    trainer.fit(mod, datamodule=data)
    assert len(first.updates) == 2
    second = InvariantProbe()
    trainer, mod, data = build(cfg, [second], logger=False)
    trainer.fit(mod, datamodule=data, ckpt_path=str(tmp_path / "b" / "t" / "checkpoints" / "last.ckpt"))
    assert len(first.updates) + len(second.updates) == len(full.updates) == 4
    for i, (got, want) in enumerate(zip(first.updates + second.updates, full.updates)):
        for name in want:
            assert torch.equal(got[name], want[name]), (i, name)
    for (k, v), (_, v2) in zip(ref.model.state_dict().items(), mod.model.state_dict().items()):
        assert torch.equal(v, v2), k
    got, want = mod.sparse_engine.state_dict(), ref.sparse_engine.state_dict()
    assert got["tie_seed"] == want["tie_seed"] and got["n_updates"] == want["n_updates"]
    for name, seen in want["ever_active"].items():
        assert torch.equal(got["ever_active"][name], seen), name


def test_resume_with_other_sparsity_method_refused(tmp_path, small_corpus):
    cfg = sparse_run(tmp_path, small_corpus, "rigl", trainer=dict(max_steps=4, ckpt_every_n_steps=4))
    fit(cfg)
    cfg.sparsity = SparsityConfig(method="set", sparsity=0.8, delta_t=2, t_end=1.0)
    with pytest.raises(ValueError, match="sparsity.method='rigl'"):
        trainer, mod, data = build(cfg, logger=False)
        trainer.fit(mod, datamodule=data, ckpt_path=str(tmp_path / "t" / "checkpoints" / "last.ckpt"))


def test_pattern_matching_nothing_is_refused(tmp_path, small_corpus):
    cfg = sparse_run(tmp_path, small_corpus, "rigl", sparsity=dict(include=["decoder.*"]))
    with pytest.raises(ValueError, match=r"sparsity.include=\['decoder.\*'\].*matches no sparsifiable weight"):
        fit(cfg)


def test_cli_sparse_fit_then_report(tmp_path, small_corpus):
    from test_training import _cli, _recipe

    recipe = _recipe(tmp_path, small_corpus)
    r = _cli("fit", "--config", recipe, "--sparsity", str(REPO / "configs/sparsity/srigl.yaml"),
             "--sparsity.delta_t=1", "--sparsity.t_end=1.0", "--trainer.max_steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sparsity (sparsified layers)" in r.stdout
    ckpt = tmp_path / "runs" / "smoke" / "checkpoints" / "last.ckpt"
    r = _cli("report", "--checkpoint", str(ckpt), "--layer", "blocks.1.mlp.fc_in.weight",
             "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hidden units:" in r.stdout and "dead" in r.stdout  # the census of dead / orphan units
    assert (tmp_path / "rep" / "density.png").stat().st_size > 5000
    assert (tmp_path / "rep" / "mask_blocks.1.mlp.fc_in.weight.png").stat().st_size > 5000
    info = json.loads((tmp_path / "rep" / "sparsity.json").read_text())
    assert abs(info["global_sparsity"] - 0.9) < 0.02
    r = _cli("report", "--checkpoint", str(ckpt), "--layer", "nope")
    assert r.returncode == 2 and "layer 'nope' has no mask" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--sparsity.sparsity=1.5"], "sparsity.sparsity=1.5 must be in [0, 1)"),
    (["--sparsity.method=foo"], "sparsity.method='foo' is unknown"),
    (["--sparsity.delta_t=0"], "sparsity.delta_t=0 must be a positive integer"),
    (["--sparsity.include=[nothing.*]"], "matches no sparsifiable weight"),
])
def test_cli_sparsity_bad_input_one_line(tmp_path, small_corpus, args, message):
    """In this process, as tests/test_training.py's bad-input cases (one of which runs in a real process)."""
    from test_training import _recipe

    code, stderr = run_cli(["fit", "--config", _recipe(tmp_path, small_corpus), "--sparsity",
                            str(REPO / "configs/sparsity/rigl.yaml"), *args])
    err = stderr.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], stderr[-2000:]


@pytest.mark.parametrize("method", ["static", "rigl", "srigl", "nm"])
def test_masks_do_not_depend_on_a_device_context(method):
    """Lightning builds the model inside a device context on the GPU, which moves every new tensor there: the
    engine's CPU generator then met a CUDA randperm ('Expected a cuda device type for generator', found on an
    H100). Masks are decided where the weights live, whatever the context: the same masks inside a foreign one."""
    from dstlm.models.gpt import GPT, GPTConfig
    from dstlm.sparse import SparseEngine, SparsityConfig

    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    sp = SparsityConfig(method=method, sparsity=0.5, **({"n": 2, "m": 4} if method == "nm" else {}))
    torch.manual_seed(0)
    plain = SparseEngine(GPT(cfg), sp, 0, 10)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.device("meta"):  # any device context that is not the CPU's
        inside = SparseEngine(model, sp, 0, 10)
    for a, b in zip(plain.params, inside.params):
        assert b.mask.device.type == "cpu" and torch.equal(a.mask, b.mask), a.name
