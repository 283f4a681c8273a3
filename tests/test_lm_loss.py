"""The fused, chunked LM-head cross-entropy against the plain full-logits loss, and the fused optimizer."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_run
from dstlm.models.gpt import GPT, GPTConfig
from dstlm.models.lm_loss import linear_cross_entropy
from dstlm.training.config import OptimConfig, RunConfig, TrainerConfig
from dstlm.training.assembly.build import build


def _inputs(n=301, c=24, vp=128, v=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).requires_grad_()
    w = (torch.randn(vp, c, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100
    return h, w, t, v


def _reference(h, w, t, v):
    return F.cross_entropy(F.linear(h, w)[:, :v].float(), t, ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 64, 1000])
def test_fp32_loss_and_gradients_equal_the_full_logits_loss(chunk):
    h, w, t, v = _inputs()
    ref = _reference(h, w, t, v)
    gh, gw = torch.autograd.grad(ref, [h, w])
    out = linear_cross_entropy(h, w, t, v, chunk)
    fh, fw = torch.autograd.grad(out * 3.0, [h, w])  # a non-unit upstream gradient is applied in backward
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fh, 3.0 * gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fw, 3.0 * gw, rtol=1e-5, atol=1e-7)
    assert fw[v:].abs().max() == 0  # padding rows of the head are never a target: no gradient
    with torch.no_grad():  # the evaluation path gives the same value
        torch.testing.assert_close(linear_cross_entropy(h, w, t, v, chunk), out)


def test_bf16_autocast_matches_the_autocast_reference():
    h, w, t, v = _inputs(n=256, c=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(h, w, t, v)
        out = linear_cross_entropy(h, w, t, v, 96)
    assert out.dtype == torch.float32
    gh, gw = torch.autograd.grad(ref, [h, w])
    fh, fw = torch.autograd.grad(out, [h, w])
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    assert fh.dtype == h.dtype and fw.dtype == w.dtype
    for a, b in ((fh, gh), (fw, gw)):  # bf16 products: agree to bf16 resolution
        assert (a - b).norm() / b.norm() < 2e-2


def test_all_targets_ignored_gives_zero_not_nan():
    h, w, t, v = _inputs(n=10)
    t[:] = -100
    out = linear_cross_entropy(h, w, t, v, 4)
    fh, fw = torch.autograd.grad(out, [h, w])
    assert out.item() == 0.0 and fh.abs().max() == 0 and fw.abs().max() == 0


def test_bad_chunk_is_one_line():
    h, w, t, v = _inputs(n=4)
    with pytest.raises(ValueError, match=r"chunk=0 must be a positive"):
        linear_cross_entropy(h, w, t, v, 0)
    with pytest.raises(ValueError, match=r"trainer.loss_chunk_tokens=-1 must be an integer >= 0"):
        TrainerConfig(loss_chunk_tokens=-1)
    with pytest.raises(ValueError, match=r"optim.fused=true with trainer.precision='16-mixed'.*bf16-mixed"):
        RunConfig(optim=OptimConfig(fused=True), trainer=TrainerConfig(precision="16-mixed"))


def test_gpt_fused_loss_equals_full_logits_loss_with_tied_head():
    """Whole model, tied embeddings, a vocabulary that needs padding, a chunk that does not divide the tokens:
    loss and every parameter gradient (the tied embedding gets both its uses) equal the unfused path."""
    cfg = GPTConfig(vocab_size=203, block_size=32, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 32))
    tgt = torch.roll(idx, -1, 1)
    tgt[:, -1] = -100
    grads = {}
    for chunk in (0, 7):
        model.zero_grad(set_to_none=True)
        model.lm_head.chunk_tokens = chunk
        loss = model.loss(idx, tgt)
        loss.backward()
        grads[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[7][0], grads[0][0], rtol=1e-6, atol=1e-6)
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[7][1][n], g, rtol=1e-4, atol=1e-7, msg=n)
    assert model(idx).shape == (3, 32, cfg.vocab_size)  # without targets: logits over the real vocabulary


def _train(tmp_path, corpus, name, **kw):
    trainer = {"max_steps": 6, "gradient_clip_val": 0.05, **kw.pop("trainer", {})}
    cfg = tiny_run(tmp_path / name, corpus, trainer=trainer, **kw)
    trainer, module, data = build(cfg, logger=False)
    trainer.fit(module, datamodule=data)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}, trainer


def test_fused_optimizer_clips_under_bf16_where_lightning_refuses(tmp_path, small_corpus):
    """optim.fused under bf16-mixed: Lightning's mixed-precision plugin would refuse to clip; dstlm clips
    itself. With a clip value small enough to act at every step, the fused run lands on the foreach run's
    weights (the same math in another kernel: they differ only by rounding, which bf16 activations amplify
    over the steps -- up to 4e-5 here on an AMD AVX2 CPU, below 1e-6 on the machine this test was written on),
    while a run without clipping lands far from both -- so the clipping really happened."""
    bf16 = {"precision": "bf16-mixed"}
    base, _ = _train(tmp_path, small_corpus, "foreach", trainer=bf16)
    fused, _ = _train(tmp_path, small_corpus, "fused", optim=dict(fused=True), trainer=bf16)
    unclipped, _ = _train(tmp_path, small_corpus, "noclip", optim=dict(fused=True),
                          trainer=dict(gradient_clip_val=None, **bf16))
    for k in base:
        torch.testing.assert_close(fused[k], base[k], rtol=1e-3, atol=1e-4, msg=k)
    rounding = max((fused[k] - base[k]).abs().max().item() for k in base)
    moved = max((unclipped[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3 and moved > 20 * rounding, (moved, rounding)  # here: 1.9e-3 vs 3.6e-5


def test_fused_optimizer_in_fp32_and_loss_chunking_keep_training(tmp_path, small_corpus):
    """fp32 (Lightning clips fused optimizers there itself), and the plain full-logits loss: both land on
    the weights of the default run (chunked loss, foreach AdamW)."""
    base, _ = _train(tmp_path, small_corpus, "default")
    fused, _ = _train(tmp_path, small_corpus, "fused", optim=dict(fused=True))
    plain_loss, _ = _train(tmp_path, small_corpus, "plain", trainer=dict(loss_chunk_tokens=0))
    for k in base:
        torch.testing.assert_close(fused[k], base[k], rtol=1e-4, atol=1e-6, msg=k)
        # rounding-level gradient differences, scaled up by AdamW where a gradient is near 0
        torch.testing.assert_close(plain_loss[k], base[k], rtol=1e-4, atol=2e-5, msg=k)
