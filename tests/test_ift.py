"""Sparse-IFT: structure, iso-FLOP densities checked by torch's own FLOP counter, folding, training."""

import math
import re

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dstlm.models.gpt import GPT, GPTConfig, dense_layer_shapes, linear_layer_names
from dstlm.models.moe import MoEConfig
from dstlm.sparse import SparseEngine, SparsityConfig
from dstlm.sparse.flops import count_flops, dense_count
from dstlm.build import build_model
from dstlm.transforms.ift import SparseIFT, SparseIFTConfig, fold_to_dense
from dstlm.transforms.ift_layers import SparseDopedLinear, SparseFactorizedLinear, SparseParallelLinear
from dstlm.transforms.ift_spec import doped_rank, factorized_rank

CFG = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=4, n_embd=64)
FAMILIES = ["wide", "parallel", "factorized", "doped"]


def ift_gpt(cfg, ift):
    return build_model(cfg, [SparseIFT(ift, cfg)])


def sparse_model(family, s, cfg=CFG, match="layers", **ift_kw):
    torch.manual_seed(0)
    conv = SparseIFT(SparseIFTConfig(family=family, sparsity=s, match=match, **ift_kw), cfg)
    model = build_model(cfg, [conv])
    sp = conv.sparsity_config(model, SparsityConfig(method="static", sparsity=0.5), seq_len=cfg.block_size)
    engine = SparseEngine(model, sp, seed=0, max_steps=10)
    return model, engine


def torch_flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("s", [0.5, 0.75])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_transformed_layer_has_the_dense_layers_flops(family, s):
    """Independent count: torch.utils.flop_counter on each dense-equivalent sub-linear of the transformed
    layer, times its mask density, equals the dense layer's counted FLOPs within 1 %."""
    model, _ = sparse_model(family, s)
    shapes = dense_layer_shapes(CFG)
    for name in SparseIFT(SparseIFTConfig(family=family, sparsity=s), CFG).layers:
        n_out, n_in = shapes[name]
        dense = torch_flops(nn.Linear(n_in, n_out, bias=False), torch.randn(1, 8, n_in))
        layer = model.get_submodule(name)
        total = 0.0
        for sub in [m for m in layer.modules() if isinstance(m, nn.Linear)]:
            mask = getattr(sub, "weight_mask", None)
            density = float(mask.float().mean()) if mask is not None else 1.0
            total += torch_flops(sub, torch.randn(1, 8, sub.in_features)) * density
        assert abs(total / dense - 1) < 0.01, (name, total / dense)


def test_structures_and_parameter_counts_follow_the_spec():
    m, _ = sparse_model("wide", 0.75)
    assert m.config.n_embd == 128 and m.config.mlp_hidden == 512  # x 1/sqrt(0.25) = 2
    m, _ = sparse_model("parallel", 0.75)
    assert len(m.blocks[0].attn.q_proj.branches) == 4
    m, _ = sparse_model("parallel", 0.5)
    assert len(m.blocks[0].mlp.fc_in.branches) == 2
    m, _ = sparse_model("factorized", 0.75)
    fc = m.blocks[0].mlp.fc_in
    assert isinstance(fc, SparseFactorizedLinear)
    assert fc.u.out_features == math.ceil(64 * 256 / (0.25 * (64 + 256))) == factorized_rank(64, 256, 0.75) == 205
    m, _ = sparse_model("doped", 0.75)
    d = m.blocks[0].mlp.fc_out
    r = doped_rank(256, 64, 0.75)
    assert isinstance(d, SparseDopedLinear) and r == math.floor(0.75 * 256 * 64 / 320) == 38
    assert sum(p.numel() for p in d.parameters()) == 256 * 64 + r * (256 + 64)
    # the doped low-rank part stays dense; the sparse part is at (D - r (n_in + n_out)) / D
    assert float(d.sparse.weight_mask.float().mean()) == pytest.approx((256 * 64 - r * 320) / (256 * 64), abs=1e-3)
    assert not hasattr(d.u, "weight_mask")


def test_sparse_wide_at_zero_is_the_dense_model():
    torch.manual_seed(3)
    dense = GPT(CFG)
    torch.manual_seed(3)
    wide = ift_gpt(CFG, SparseIFTConfig(family="wide", sparsity=0.0))
    assert wide.config == CFG
    for (n, a), (_, b) in zip(dense.state_dict().items(), wide.state_dict().items()):
        assert torch.equal(a, b), n
    _, engine = sparse_model("wide", 0.0)
    assert engine.density() == 1.0


def test_whole_model_count_matches_torch_flop_counter():
    """dense_count (analytic) == torch's counter on a dense forward, per token; count_flops of a transformed
    model with all masks full == torch's counter on it. torch's counter does not see the CPU SDPA kernel,
    so the attention term is checked against it on the explicit Q K^T and A V products."""
    T, C, H = CFG.block_size, CFG.n_embd, CFG.n_head
    idx = torch.randint(0, 512, (1, T))
    base = dense_count(CFG, dense_layer_shapes(CFG), T)
    assert torch_flops(GPT(CFG), idx) / T == base.forward - base.attention
    q = torch.randn(1, H, T, C // H)
    with FlopCounterMode(display=False) as counter:
        (q @ q.transpose(-1, -2)).softmax(-1) @ q
    assert counter.get_total_flops() * CFG.n_layer / T == base.attention
    model = ift_gpt(CFG, SparseIFTConfig(family="parallel", sparsity=0.5))
    counted = count_flops(model, linear_layer_names(CFG), T)
    assert torch_flops(model, idx) / T == counted.forward_all_dense - counted.attention


@pytest.mark.parametrize("family", ["parallel", "factorized", "doped"])
def test_folding_to_dense_computes_the_same_function(family):
    model, _ = sparse_model(family, 0.75)
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        before = model(idx)
        after = fold_to_dense(model)(idx)
    assert all(type(m) is not SparseParallelLinear for m in model.modules())
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)


def test_match_total_brings_the_whole_forward_to_the_dense_flops():
    model, _ = sparse_model("wide", 0.75, match="total")
    T = CFG.block_size
    base = dense_count(CFG, dense_layer_shapes(CFG), T).forward
    mine = count_flops(model, linear_layer_names(CFG), T)
    assert abs(mine.forward / base - 1) < 0.01
    assert mine.attention == 2 * dense_count(CFG, dense_layer_shapes(CFG), T).attention  # and it says so


@pytest.mark.parametrize("kw, message", [
    (dict(family="deep"), "ift.family='deep' is unknown"),
    (dict(sparsity=1.0), "ift.sparsity=1.0 must be in [0, 1)"),
    (dict(sparsity=-0.1), "ift.sparsity=-0.1 must be in [0, 1)"),
    (dict(match="some"), "ift.match='some' is unknown"),
    (dict(factorized_mid="relu"), "ift.factorized_mid='relu' is unknown"),
])
def test_bad_ift_config_one_line(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SparseIFTConfig(**kw)


def test_bad_layer_selection_and_rounded_width():
    with pytest.raises(ValueError, match="ift.layers pattern 'blocks.*.attn.qkv' matches no linear layer"):
        ift_gpt(CFG, SparseIFTConfig(family="parallel", layers=["blocks.*.attn.qkv"]))
    with pytest.raises(ValueError, match="ift.family=wide widens shared hidden dimensions"):
        ift_gpt(CFG, SparseIFTConfig(family="wide", layers=["blocks.*.attn.q_proj"]))
    # 48 wide, 3 heads, RoPE: 48 / sqrt(0.5) = 67.9 is rounded to a multiple of 2 x 3 = 66; the densities
    # absorb the rounding so the FLOPs still match
    cfg = GPTConfig(vocab_size=512, block_size=32, n_layer=1, n_head=3, n_embd=48)
    model, _ = sparse_model("wide", 0.5, cfg=cfg)
    assert model.config.n_embd == 66
    c = count_flops(model, linear_layer_names(cfg), 32)
    for name, flops in dense_count(cfg, dense_layer_shapes(cfg), 32).layers.items():
        assert abs(c.layers[name] / flops - 1) < 0.01, name


def test_ift_needs_a_dst_method(tmp_path, small_corpus):
    from conftest import tiny_run

    with pytest.raises(ValueError, match="ift.family='wide' needs a DST method"):
        tiny_run(tmp_path, small_corpus, ift=SparseIFTConfig())


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_with_rigl_and_keeps_the_invariants(tmp_path, small_corpus, family):
    """5 steps of RigL (updates at 2 and 4, invariants verified by the callback), then the checkpoint
    loads into the same structure with the same outputs, and (but for the nonlinear factorized variant)
    exports to a standard HF model computing the same logits."""
    from conftest import tiny_run
    from dstlm.checkpoint import load_checkpoint
    from dstlm.training.assembly.build import build

    cfg = tiny_run(tmp_path, small_corpus, trainer=dict(max_steps=5, val_every_n_steps=5),
                   ift=SparseIFTConfig(family=family, sparsity=0.5),
                   sparsity=SparsityConfig(method="rigl", sparsity=0.5, delta_t=2, t_end=1.0))
    trainer, module, data = build(cfg, logger=False)
    trainer.fit(module, datamodule=data)
    assert module.sparse_engine.n_updates == 2
    assert (tmp_path / "t" / "flops.json").is_file()
    loaded = load_checkpoint(tmp_path / "t")
    idx = torch.randint(0, 512, (2, 16))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), module.model(idx))
    if family != "wide":
        from dstlm.hf.export import to_hf

        with torch.no_grad():
            hf = to_hf(fold_to_dense(loaded.model))
            torch.testing.assert_close(hf(idx).logits[..., :512], module.model(idx)[..., :512], rtol=1e-4, atol=1e-4)


def test_dstlm_flops_on_the_sparse_wide_75_recipe():
    import subprocess
    import sys

    from conftest import REPO

    r = subprocess.run([sys.executable, "-m", "dstlm.cli", "flops", "--config", "recipes/ift-tiny-wide-75.yaml"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    total = [line for line in r.stdout.splitlines() if line.startswith("total forward")][0]
    assert abs(float(total.split()[-1]) - 1.0) < 0.03
    assert "non-weight FLOPs that grew: attention scores x2.000" in r.stdout and "LM head x2.000" in r.stdout


def test_sparse_wide_on_a_moe_model_widens_and_sparsifies_the_experts(tmp_path, small_corpus):
    """Sparse Wide on a MoE GPT: attention, dense MLPs and every expert widen x2 at s = 0.75; each expert
    matrix gets its iso-FLOP density, so every layer (a MoE layer counted as the k experts a token visits
    plus its router) keeps its dense FLOPs within 1 %; the model trains with RigL."""
    from conftest import tiny_run
    from dstlm.models.moe import MoEConfig
    from dstlm.training.assembly.build import build

    moe = MoEConfig(num_experts=4, top_k=2, every=2)
    cfg = tiny_run(tmp_path, small_corpus, model=dict(moe=moe), trainer=dict(max_steps=5, val_every_n_steps=5),
                   ift=SparseIFTConfig(family="wide", sparsity=0.75),
                   sparsity=SparsityConfig(method="rigl", sparsity=0.5, delta_t=2, t_end=1.0))
    trainer, module, data = build(cfg, logger=False)
    trainer.fit(module, datamodule=data)
    model, engine = module.model, module.sparse_engine
    assert engine.n_updates == 2 and model.config.n_embd == 64
    assert "blocks.1.mlp.w_in.3" in engine.budgets
    assert float(model.blocks[1].mlp.w_in_mask[3].float().mean()) == pytest.approx(0.25, abs=0.01)
    base = dense_count(cfg.model, dense_layer_shapes(cfg.model), 32)
    mine = count_flops(model, linear_layer_names(cfg.model), 32)
    for name, flops in base.layers.items():
        assert abs(mine.layers[name] / flops - 1) < 0.01, (name, mine.layers[name] / flops)


MOE_CFG = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32,
                    moe=MoEConfig(num_experts=4, top_k=2, every=2))


@pytest.mark.parametrize("s", [0.5, 0.75])
@pytest.mark.parametrize("family", ["parallel", "factorized", "doped"])
def test_each_family_on_moe_experts_has_the_dense_experts_flops(family, s):
    """Parallel / Factorized / Doped experts (selected with the MLP's names): torch's flop counter on each
    expert's sub-matrices, times the expert's mask density, equals the dense expert projection's FLOPs
    within 1 % -- for every expert and both projections; the analytic count of the MoE layer agrees."""
    conv = SparseIFT(SparseIFTConfig(family=family, sparsity=s), MOE_CFG)
    model = build_model(MOE_CFG, [conv])
    sp = conv.sparsity_config(model, SparsityConfig(method="rigl", sparsity=0.5), 32)
    engine = SparseEngine(model, sp, seed=0, max_steps=10)
    moe = model.blocks[1].mlp
    assert [p.family for p in moe.projections] == [family, family]
    assert all(f"blocks.1.mlp.{n}.3" in engine.budgets for n in moe.sparse_batched)
    for proj in moe.projections:
        dense = torch_flops(nn.Linear(proj.n_in, proj.n_out, bias=False), torch.randn(8, proj.n_in))
        for e in range(4):
            total = 0.0
            for name, (_, cols) in proj.shapes().items():
                mask = getattr(moe, f"{name}_mask", None)
                density = float(mask[e].float().mean()) if mask is not None else 1.0
                weight = getattr(moe, name)[e]
                total += torch_flops(lambda x, w=weight: x @ w.t(), torch.randn(8, cols)) * density
            assert abs(total / dense - 1) < 0.01, (proj.name, e, total / dense)
    base = dense_count(MOE_CFG, dense_layer_shapes(MOE_CFG), 32)
    mine = count_flops(model, linear_layer_names(MOE_CFG), 32)
    assert abs(mine.layers["blocks.1.mlp"] / base.layers["blocks.1.mlp"] - 1) < 0.01


@pytest.mark.parametrize("family", ["parallel", "factorized", "doped"])
def test_sparse_ift_experts_train_with_rigl_reload_and_fold(tmp_path, small_corpus, family):
    """A MoE GPT whose experts (and attention) are Sparse-IFT transformed trains 5 RigL steps (invariants
    verified per expert matrix at each update), reloads from its checkpoint to the same outputs, and folds
    into plain [E, out, in] experts computing the same function."""
    from conftest import tiny_run
    from dstlm.checkpoint import load_checkpoint
    from dstlm.training.assembly.build import build

    cfg = tiny_run(tmp_path, small_corpus, model=dict(moe=MOE_CFG.moe), trainer=dict(max_steps=5, val_every_n_steps=5),
                   ift=SparseIFTConfig(family=family, sparsity=0.5),
                   sparsity=SparsityConfig(method="rigl", sparsity=0.5, delta_t=2, t_end=1.0))
    trainer, module, data = build(cfg, logger=False)
    trainer.fit(module, datamodule=data)
    assert module.sparse_engine.n_updates == 2 and module.model.blocks[1].mlp.transformed
    loaded = load_checkpoint(tmp_path / "t")
    idx = torch.randint(0, 512, (2, 16))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx), module.model(idx))
        folded = fold_to_dense(loaded.model)
        assert not folded.blocks[1].mlp.transformed and folded.blocks[1].mlp.w_in.shape == (4, 128, 32)
        torch.testing.assert_close(folded(idx), module.model(idx), rtol=1e-4, atol=1e-5)
