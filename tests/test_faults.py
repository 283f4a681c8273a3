"""Bad numbers: a non-finite loss (injected on one rank) or gradient stops the run on every rank together,
with the step, the rank or parameter and the last good checkpoint named, before the weights change; that
checkpoint resumes to the weights of a run that never saw the fault."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_preemption import ENV, recipe, weights


@pytest.mark.dist
def test_nan_loss_on_one_rank_stops_every_rank_and_the_last_checkpoint_resumes(tmp_path, small_corpus):
    ref = subprocess.run(["bash", "launch/torchrun.sh", "2", recipe(tmp_path, small_corpus, "ref", steps=20)],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**ENV, "PYTHON": sys.executable, "STRATEGY": "ddp"})
    assert ref.returncode == 0, ref.stderr[-3000:]
    path = recipe(tmp_path, small_corpus, "nan", steps=20)
    run = tmp_path / "runs" / "nan"
    bad = subprocess.run(["bash", "launch/torchrun.sh", "2", path], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env={**ENV, "PYTHON": sys.executable, "STRATEGY": "ddp",
                                           "DSTLM_FAULT": "nan:rank=1:point=loss:step=12"})
    assert bad.returncode != 0
    ckpts = run / "checkpoints"
    msg = (f"non-finite loss at step 12 (micro-batch 12) on rank(s) [1]; stopped before the weights changed "
           f"(the last good checkpoint is {ckpts / 'step0000010.ckpt'}, which `--ckpt_path last` resumes)")
    assert bad.stderr.count(msg) == 2, bad.stderr[-3000:]  # both ranks, the same one line
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step0000010.ckpt"]
    assert all(torch.isfinite(v).all() for v in weights(run).values() if v.is_floating_point())

    again = subprocess.run(["bash", "launch/torchrun.sh", "2", path, "--ckpt_path", "last"], cwd=REPO,
                           capture_output=True, text=True, timeout=600,
                           env={**ENV, "PYTHON": sys.executable, "STRATEGY": "ddp"})
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = weights(tmp_path / "runs" / "ref"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_gradient_names_the_parameter():
    from dstlm.models.gpt import GPTConfig
    from dstlm.training.config import OptimConfig
    from dstlm.training.module import LMModule, NonFiniteError

    module = LMModule(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8), OptimConfig(), 10)
    module.configure_model()
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    module.model.blocks[0].mlp.fc_in.weight.grad[3, 2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"non-finite gradient of model.blocks.0.mlp.fc_in.weight at step 0; "
                                             r"stopped before the weights changed \(no checkpoint was written yet"):
        module.on_before_optimizer_step(None)
    module.model.blocks[0].mlp.fc_in.weight.grad[3, 2] = 0.0
    module.on_before_optimizer_step(None)  # finite: nothing happens
    assert os.environ.get("DSTLM_FAULT") is None


def test_truncated_checkpoint_is_passed_over_and_named(tmp_path, small_corpus):
    """A checkpoint cut short (a copy that ran out of disk): `--ckpt_path last` says which file is unreadable
    and why, resumes from the newest readable one, and ends where an undisturbed run ends; naming the broken file
    explicitly is a one-line error."""
    from test_preemption import fit

    path = recipe(tmp_path, small_corpus, "t", steps=30)
    assert fit(path).returncode == 0
    run = tmp_path / "runs" / "t"
    a = weights(run)
    broken = run / "checkpoints" / "step0000030.ckpt"
    os.truncate(broken, broken.stat().st_size // 2)
    r = fit(path, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step0000030.ckpt is truncated or corrupt" in r.stdout
    assert f"resuming from the newest readable checkpoint instead: {run / 'checkpoints' / 'step0000020.ckpt'}" \
        in r.stdout
    b = weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 21-30 again, to the same weights
    os.truncate(run / "checkpoints" / "step0000020.ckpt", 100)
    r = fit(path, "--ckpt_path", str(run / "checkpoints" / "step0000020.ckpt"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "step0000020.ckpt is unreadable: step0000020.ckpt is truncated or corrupt" in r.stderr


def test_deepspeed_checkpoint_missing_a_ranks_optimizer_states(tmp_path):
    from dstlm.checkpoint import checkpoint_problem

    tag = tmp_path / "last.ckpt" / "checkpoint"
    tag.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_2_mp_rank_00_optim_states.pt"):
        torch.save({"x": torch.zeros(2)}, tag / name)
    assert checkpoint_problem(tmp_path / "last.ckpt") == "the optimizer states of rank(s) [1] are missing"
    torch.save({"x": torch.zeros(2)}, tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert checkpoint_problem(tmp_path / "last.ckpt") is None
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert checkpoint_problem(tmp_path / "last.ckpt") == "zero_pp_rank_1_mp_rank_00_optim_states.pt is empty"
