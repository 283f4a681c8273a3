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
