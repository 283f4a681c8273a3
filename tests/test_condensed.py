"""The condensed constant-fan-in layer: exact against the masked dense layer (forward and every gradient),
on both compute paths, for shapes that hit every branch of the kernel (tails of the SIMD width, one and
several batch blocks, ablated units, uint16 and int32 indices)."""

from __future__ import annotations

import io

import pytest
import torch

from dstlm.sparse import kernels
from dstlm.sparse.condensed import CondensedLinear, NotConstantFanIn, kernel_wins

TOL = dict(rtol=1e-5, atol=2e-5)


def constant_fan_in(out: int, inp: int, k: int, ablate: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(out, inp, dtype=torch.bool)
    for r in range(out):
        mask[r, torch.randperm(inp, generator=g)[:k]] = True
    if ablate:
        mask[torch.randperm(out, generator=g)[:ablate]] = False
    weight = torch.randn(out, inp, generator=g) * mask
    bias = torch.randn(out, generator=g)
    return weight, mask, bias


def reference(x, weight, mask, bias):
    """The masked dense layer, autograd through the weight restricted to its mask."""
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    xr = x.detach().clone().requires_grad_()
    y = torch.nn.functional.linear(xr, w * mask, b)
    return xr, w, b, y


def kernel_available() -> bool:
    return kernels.condensed_ops() is not None


SHAPES = [  # out, in, k, ablated units
    (48, 96, 9, 0),      # k below one SIMD width
    (40, 130, 17, 3),    # k one past a SIMD width, ablated units
    (33, 200, 40, 5),    # rows not a multiple of the 16-row output tile
    (64, 300, 33, 0),
    (8, 70_000, 5, 1),   # int32 indices (in > 65,536)
]
BATCHES = [1, 2, 3, 16, 17, 33, 70]  # gather; one 16-block; 32-blocks: one, several, with tails


@pytest.mark.parametrize("path", ["kernel", "structured"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_equal_masked_dense(shape, path):
    if path == "kernel" and not kernel_available():
        pytest.fail("the condensed CPU kernel did not build here (see the warning above)")
    out, inp, k, ablate = shape
    weight, mask, bias = constant_fan_in(out, inp, k, ablate)
    layer = CondensedLinear.from_masked(weight, mask, bias, path=path)
    assert layer.indices.dtype == (torch.uint16 if inp <= 65_536 else torch.int32)
    assert layer.rows.numel() == out - ablate and layer.fan_in == k
    batches = BATCHES if inp < 10_000 else [1, 33]
    for batch in batches:
        x = torch.randn(batch, inp, generator=torch.Generator().manual_seed(batch))
        xr, w, b, y_ref = reference(x, weight, mask, bias)
        xc = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xc)
        torch.testing.assert_close(y, y_ref, **TOL)
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
        y_ref.backward(grad_y)
        torch.testing.assert_close(xc.grad, xr.grad, **TOL)
        dense_grad = w.grad[layer.rows].gather(1, layer.indices.long())  # the active entries' gradient
        torch.testing.assert_close(layer.weight.grad, dense_grad, **TOL)
        torch.testing.assert_close(layer.bias.grad, b.grad, **TOL)


@pytest.mark.skipif(not kernel_available(), reason="the condensed CPU kernel did not build")
def test_kernel_is_reproducible_across_thread_counts():
    weight, mask, bias = constant_fan_in(96, 256, 26, 4)
    layer = CondensedLinear.from_masked(weight, mask, bias, path="kernel")
    x = torch.randn(200, 256)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xc = x.clone().requires_grad_()
            layer.zero_grad()
            y = layer(xc)
            y.backward(torch.ones_like(y))
            results.append((y.detach(), xc.grad, layer.weight.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_conversion_round_trip_and_leading_dims():
    weight, mask, bias = constant_fan_in(24, 40, 6, 2)
    layer = CondensedLinear.from_masked(weight, mask, bias)
    dense, back_mask = layer.to_dense()
    assert torch.equal(back_mask, mask) and torch.equal(dense, weight)
    x = torch.randn(2, 5, 40)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, bias), **TOL)
    layer_nb = CondensedLinear.from_masked(weight, mask, None)
    torch.testing.assert_close(layer_nb(x), torch.nn.functional.linear(x, weight), **TOL)


def test_state_dict_round_trip_weights_only():
    weight, mask, bias = constant_fan_in(16, 50, 5, 1)
    layer = CondensedLinear.from_masked(weight, mask, bias)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    empty = CondensedLinear(50, 16, torch.zeros(15, 5), torch.zeros(15, 5, dtype=torch.int64),
                            torch.arange(15), torch.zeros(16))
    empty.load_state_dict(state)
    x = torch.randn(4, 50)
    assert torch.equal(empty(x), layer(x))


def test_other_dtypes_take_the_structured_path():
    weight, mask, bias = constant_fan_in(16, 64, 8)
    layer = CondensedLinear.from_masked(weight, mask, bias, path="kernel").to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert layer.choose(x) == "structured"
    ref = torch.nn.functional.linear(x.float(), weight.bfloat16().float(), bias.bfloat16().float())
    torch.testing.assert_close(layer(x).float(), ref, rtol=2e-2, atol=5e-2)


def test_not_constant_fan_in_is_refused_in_one_line():
    weight, mask, bias = constant_fan_in(8, 32, 4)
    mask[3, ~mask[3]] = torch.tensor([True] + [False] * 27)  # one unit holds 5
    with pytest.raises(NotConstantFanIn, match=r"blocks\.0\.mlp\.fc_in: active units hold 4 to 5 weights; only "
                                               r"constant fan-in layers \(sparsity.method srigl or nm\)"):
        CondensedLinear.from_masked(weight, mask, bias, name="blocks.0.mlp.fc_in")


def test_fully_ablated_layer_outputs_its_bias():
    weight, mask, bias = constant_fan_in(6, 10, 3, ablate=6)
    layer = CondensedLinear.from_masked(weight, mask, bias)
    assert layer.rows.numel() == 0
    x = torch.randn(4, 10)
    assert torch.equal(layer(x), bias.expand(4, 6))


def test_fallback_when_the_kernel_is_off(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {"ops": None})
    weight, mask, bias = constant_fan_in(20, 48, 6, 2)
    layer = CondensedLinear.from_masked(weight, mask, bias, path="kernel")
    x = torch.randn(5, 48)
    assert layer.choose(x) == "structured"
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, bias), **TOL)


def test_auto_path_follows_the_measured_crossover():
    assert kernel_wins(0.1, 1) and kernel_wins(0.1, 4096) and kernel_wins(0.1, 4096, training=True)
    assert kernel_wins(0.3, 4096) and not kernel_wins(0.3, 4096, training=True)
    assert kernel_wins(0.5, 8) and not kernel_wins(0.5, 4096) and not kernel_wins(0.9, 1)


# -- a trained SRigL model: condensed export, evaluation, val loss -------------------------------------------
@pytest.fixture(scope="module")
def srigl_run(small_corpus):
    from conftest import tiny_run
    from dstlm.sparse import SparsityConfig
    from dstlm.training.assembly.run import fit

    from conftest import shared_result

    def make(d) -> None:  # once per pytest run, whichever pytest worker asks first
        cfg = tiny_run(d, small_corpus, name="srigl", model=dict(block_size=256, bias=True), data=dict(block_size=64),
                       trainer=dict(max_steps=12, val_every_n_steps=12), optim=dict(lr=1e-2))
        cfg.sparsity = SparsityConfig(method="srigl", sparsity=0.9, delta_t=3, t_end=1.0, gamma_sal=0.9)
        fit(cfg)

    return shared_result(f"condensed: SRigL run {small_corpus}", make) / "srigl" / "checkpoints" / "last.ckpt"


def val_loss(model, tokenizer, text: str, block: int = 64) -> float:
    ids = torch.tensor(tokenizer.encode(text)[: 4 * block + 1])
    x, y = ids[:-1].view(4, block), ids[1:].view(4, block)
    with torch.no_grad():
        logits = model(x)
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))


def test_condensed_export_keeps_the_model(srigl_run, tmp_path, small_corpus):
    from pathlib import Path

    from conftest import run_cli
    from dstlm.checkpoint import load_checkpoint

    code, err = run_cli(["export", "--checkpoint", str(srigl_run), "--out", str(tmp_path / "inf"),
                         "--condensed", "true"])
    assert code == 0, err
    path = tmp_path / "inf" / "model.ckpt"
    dense, cond = load_checkpoint(srigl_run), load_checkpoint(path)
    layers = [m for m in cond.model.modules() if isinstance(m, CondensedLinear)]
    assert len(layers) == 2 * 6  # q, k, v, out, fc_in, fc_out in both blocks
    assert path.stat().st_size < srigl_run.stat().st_size
    text = Path(small_corpus[0]).read_text()[20_000:40_000]
    before, after = val_loss(dense.model, dense.tokenizer, text), val_loss(cond.model, cond.tokenizer, text)
    assert f"{before:.5f}" == f"{after:.5f}"
    ids = torch.tensor([dense.tokenizer.encode(text[:300])[:64]])
    with torch.no_grad():
        torch.testing.assert_close(cond.model(ids), dense.model(ids), rtol=1e-5, atol=1e-4)


def test_condensed_eval_scores_equal(srigl_run):
    from dstlm.eval.harness import run_eval, scores

    plain = run_eval(str(srigl_run), ["hellaswag", "wikitext"], limit=6, batch_size=4)
    cond = run_eval(str(srigl_run), ["hellaswag", "wikitext"], limit=6, batch_size=4, condensed=True)
    a, b = scores(plain), scores(cond)
    for task in a:
        for metric in a[task]:
            assert a[task][metric] == pytest.approx(b[task][metric], rel=1e-5), (task, metric)
    assert cond["dstlm_timing"]["scored_tokens"] == plain["dstlm_timing"]["scored_tokens"] > 0


def test_condensed_export_of_a_dense_run_is_refused(tmp_path, small_corpus):
    from conftest import error_line, run_cli, tiny_run
    from dstlm.training.assembly.run import fit

    fit(tiny_run(tmp_path, small_corpus, name="dense", trainer=dict(max_steps=2, val_every_n_steps=2)))
    ckpt = tmp_path / "dense" / "checkpoints" / "last.ckpt"
    code, err = run_cli(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--condensed", "true"])
    assert code == 2
    assert "can be condensed (it has no masks (a dense run)); train with sparsity.method: srigl" in error_line(err)


# -- training that computes condensed (sparsity.condensed) -----------------------------------------------------
def test_condensed_training_matches_masked_training(tmp_path, small_corpus):
    """SRigL 90 % with mask updates and ablation: condensed compute ends with the same masks and the same
    validation loss as masked dense compute (the weights differ only by fp32 summation order)."""
    from conftest import tiny_run
    from dstlm.sparse import SparsityConfig
    from dstlm.sparse.condensed_train import CondensedComputeLinear
    from dstlm.training.assembly.build import build

    runs = {}
    for condensed in (False, True):
        cfg = tiny_run(tmp_path / str(condensed), small_corpus, name="r", model=dict(block_size=64, bias=True),
                       data=dict(block_size=64), trainer=dict(max_steps=12, val_every_n_steps=12), optim=dict(lr=1e-2))
        cfg.sparsity = SparsityConfig(method="srigl", sparsity=0.9, delta_t=3, t_end=1.0, gamma_sal=0.9,
                                      condensed=condensed)
        trainer, module, data = build(cfg, logger=False)
        trainer.fit(module, datamodule=data)
        kinds = {type(m) for m in module.model.modules()}
        assert (CondensedComputeLinear in kinds) == condensed
        masks = {n: b.clone() for n, b in module.model.named_buffers() if n.endswith("_mask")}
        runs[condensed] = (float(trainer.callback_metrics["val/loss"]), masks, module.model.state_dict())
    (loss_a, masks_a, state_a), (loss_b, masks_b, state_b) = runs[False], runs[True]
    assert f"{loss_a:.5f}" == f"{loss_b:.5f}"
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert any(not bool(m.any(dim=1).all()) for m in masks_b.values()), "no unit was ablated: a weaker test"
    assert state_a.keys() == state_b.keys()  # the same checkpoint layout
    for key in state_a:
        torch.testing.assert_close(state_a[key].float(), state_b[key].float(), rtol=1e-3, atol=1e-4)


def test_condensed_compute_dense_gradient_on_score_steps():
    from types import SimpleNamespace

    from dstlm.sparse.condensed_train import enable_condensed_compute

    weight, mask, bias = constant_fan_in(20, 48, 6, 2)
    layer = torch.nn.Linear(48, 20)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    layer.register_buffer("weight_mask", mask)
    enable_condensed_compute([SimpleNamespace(module=layer, index=None, transposed=False, attr="weight",
                                              name="fc.weight")], "srigl")
    x = torch.randn(40, 48)
    for dense_grad in (False, True):
        layer.dense_grad = dense_grad
        layer.zero_grad()
        layer(x).sum().backward()
        full = torch.ones(40, 20).t().mm(x)  # d(sum y)/dW of the dense layer
        expect = full if dense_grad else full * mask
        torch.testing.assert_close(layer.weight.grad, expect, **TOL)


def test_condensed_needs_constant_fan_in():
    from dstlm.sparse import SparsityConfig

    with pytest.raises(ValueError, match=r"sparsity.condensed=true needs constant fan-in, which "
                                         r"sparsity.method=rigl does not keep; use method srigl or nm"):
        SparsityConfig(method="rigl", condensed=True)
    assert SparsityConfig(method="nm", condensed=True).condensed
