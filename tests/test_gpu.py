"""Checks that need a CUDA GPU (bf16 kernels, NCCL-free single-device DeepSpeed, fused optimizers on the
device). Collected everywhere, run only where torch sees a GPU: `pytest -m gpu` on a GPU machine. Each
has a CPU counterpart that CI runs (tests/test_lm_loss.py, test_dst_training.py, test_dist.py)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_run
from dstlm.models.lm_loss import linear_cross_entropy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu there)")]


def test_fused_loss_on_cuda_bf16_matches_the_full_logits_loss():
    """GPT-2's head shape on one 4 x 1024 micro-batch, under bf16 autocast, chunks of 1024 tokens."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4096, 768, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(50304, 768, device="cuda", generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, 50257, (4096,), device="cuda", generator=g)
    y[::9] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w)[:, :50257].float(), y, ignore_index=-100)
        out = linear_cross_entropy(h, w, y, 50257, 1024)
    gh, gw = torch.autograd.grad(ref, [h, w])
    fh, fw = torch.autograd.grad(out, [h, w])
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    for a, b in ((fh, gh), (fw, gw)):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
    assert fw[50257:].abs().max().item() == 0


@pytest.mark.parametrize("strategy", ["auto", "deepspeed_stage_2"])
def test_rigl_bf16_run_on_cuda_with_fused_optimizer_and_compile(tmp_path, small_corpus, strategy):
    """A short RigL run in bf16-mixed on the GPU with fused AdamW, clipping and torch.compile: the loss falls,
    the engine's invariant checks pass at every mask update (it raises otherwise), sparsity is kept."""
    from dstlm.sparse import SparsityConfig
    from dstlm.training.assembly.run import fit

    cfg = tiny_run(tmp_path, small_corpus, optim=dict(fused=True, lr=1e-2, warmup_steps=5),
                   trainer=dict(accelerator="gpu", precision="bf16-mixed", deterministic=False, compile=True,
                                max_steps=60, val_every_n_steps=30, strategy=strategy))
    cfg.sparsity = SparsityConfig(method="rigl", sparsity=0.8, delta_t=10, t_end=0.75, verify_every=10)
    summary = fit(cfg)
    assert summary["mask_updates"] >= 4
    assert abs(summary["sparsity"] - 0.8) < 0.01
    assert summary["val_loss"] < 6.0, summary
    assert "GPU" in summary["peak_memory_kind"]
