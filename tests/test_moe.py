"""Mixture-of-Experts: routing and capacity on hand-built logits, the Switch loss, E=1 == dense MLP."""

import math

import pytest
import torch

from dstlm.models.gpt import GPT, MLP, GPTConfig
from dstlm.models.moe import MoEConfig, MoEMLP, load_balancing_loss, route, z_loss


def test_top1_routing_with_capacity_drops_the_late_tokens():
    # 6 tokens, 3 experts, capacity ceil(1.0 * 6 * 1 / 3) = 2; first choices: 0 0 0 1 2 1
    logits = torch.tensor([[5., 0, 0], [4, 0, 0], [3, 0, 0], [0, 5, 0], [0, 0, 5], [0, 4, 0]])
    r = route(logits, top_k=1, capacity_factor=1.0, dropless=False)
    assert r.capacity == 2
    assert r.expert.squeeze(1).tolist() == [0, 0, 0, 1, 2, 1]
    assert r.kept.squeeze(1).tolist() == [True, True, False, True, True, True]  # token 2 is expert 0's third
    torch.testing.assert_close(r.gate.squeeze(1), logits.softmax(-1).max(-1).values)
    assert route(logits, 1, 1.0, dropless=True).kept.all()


def test_top2_serves_every_first_choice_before_any_second_choice():
    # 4 tokens, 2 experts, k = 2 -> each token picks both; capacity ceil(0.5 * 4 * 2 / 2) = 2
    logits = torch.tensor([[2., 1], [2, 1], [1, 2], [2, 1]])
    r = route(logits, top_k=2, capacity_factor=0.5, dropless=False)
    assert r.capacity == 2
    assert r.expert.tolist() == [[0, 1], [0, 1], [1, 0], [0, 1]]
    # expert 0 first choices: tokens 0, 1, 3 -> token 3 dropped; expert 1 first choice: token 2, then the
    # second choices in order: token 0 (kept, slot 2 of 2), tokens 1 and 3 dropped; token 2's 2nd (expert 0) dropped
    assert r.kept.tolist() == [[True, True], [True, False], [True, False], [False, False]]
    torch.testing.assert_close(r.gate.sum(-1), torch.ones(4))  # renormalised over the k choices


def test_switch_load_balancing_loss_by_hand():
    logits = torch.tensor([[2., 0], [1, 0], [0, 3], [0.5, 0]])
    r = route(logits, 1, 2.0, False)
    p = logits.softmax(-1)
    f = torch.tensor([3 / 4, 1 / 4])  # three tokens chose expert 0, one chose expert 1
    expected = 2 * (f * p.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(r, 2), expected)
    balanced = route(torch.tensor([[1., 0], [0, 1]]), 1, 1.0, False)
    assert float(load_balancing_loss(balanced, 2)) == pytest.approx(1.0)
    torch.testing.assert_close(z_loss(logits), torch.logsumexp(logits, -1).pow(2).mean())


@pytest.mark.parametrize("dropless", [True, False])
def test_one_expert_top1_equals_the_dense_mlp(dropless):
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    dense = MLP(cfg)
    moe = MoEMLP(16, cfg.mlp_hidden, MoEConfig(num_experts=1, top_k=1, every=1, capacity_factor=1.0,
                                               dropless=dropless))
    with torch.no_grad():
        moe.w_in[0].copy_(dense.fc_in.weight)
        moe.w_out[0].copy_(dense.fc_out.weight)
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(moe(x), dense(x))
    assert float(moe.stats["dropped"]) == 0.0 and float(moe.aux_loss) == pytest.approx(1.0)


def test_moe_gpt_interleaves_and_adds_the_aux_losses():
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=16,
                    moe=MoEConfig(num_experts=4, top_k=2, every=2, aux_loss_weight=0.1, z_loss_weight=0.01))
    model = GPT(cfg)
    assert [type(b.mlp).__name__ for b in model.blocks] == ["MLP", "MoEMLP", "MLP", "MoEMLP"]
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    total, ce = model.loss(x, y), model.loss(x, y, with_aux=False)
    aux, z = model.moe_losses()
    torch.testing.assert_close(total, ce + 0.1 * aux + 0.01 * z)
    total.backward()
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0  # the router learns


@pytest.mark.parametrize("kw, message", [
    (dict(num_experts=4, top_k=5), "model.moe.top_k=5 must be between 1 and num_experts=4"),
    (dict(capacity_factor=0.0), "model.moe.capacity_factor=0.0 must be > 0 (or set dropless: true)"),
    (dict(capacity_factor=-1.0), "model.moe.capacity_factor=-1.0 must be > 0"),
    (dict(num_experts=6, expert_parallel_size=4), "model.moe.num_experts=6 is not divisible by expert_parallel_size=4"),
    (dict(num_experts=0), "model.moe.num_experts=0 must be a positive integer"),
])
def test_bad_moe_config_one_line(kw, message):
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        MoEConfig(**kw)


def test_expert_parallel_size_must_divide_the_world_size(tmp_path):
    """In a 1-process gloo group, expert parallelism 2 cannot be laid out: a one-line error naming both."""
    import re

    import torch.distributed as dist

    from dstlm.models.moe import ExpertParallel

    mine = not dist.is_initialized()  # an earlier in-process test (DeepSpeed) may have left one up
    if mine:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        assert dist.get_world_size() == 1
        with pytest.raises(ValueError, match=re.escape("model.moe.expert_parallel_size=2 does not divide the world "
                                                       "size 1")):
            ExpertParallel.create(2)
    finally:
        if mine:
            dist.destroy_process_group()


def test_checkpoints_resume_at_another_expert_parallel_size():
    """Expert parallelism changes who computes which expert, not the weights: a checkpoint saved with
    expert_parallel_size=2 loads with 1 (e.g. 2 ranks -> 1); another expert count is refused."""
    from dataclasses import asdict, replace

    from dstlm.training.config import OptimConfig
    from dstlm.training.loop.module import LMModule

    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16,
                    moe=MoEConfig(num_experts=4, expert_parallel_size=2))
    saved = {"hyper_parameters": {"model": asdict(cfg)}}
    LMModule(replace(cfg, moe=replace(cfg.moe, expert_parallel_size=1)), OptimConfig(), 10).on_load_checkpoint(saved)
    other = LMModule(replace(cfg, moe=replace(cfg.moe, num_experts=8, expert_parallel_size=1)), OptimConfig(), 10)
    with pytest.raises(ValueError, match="checkpoint model.moe="):
        other.on_load_checkpoint(saved)


def test_a_copied_model_computes_its_experts_alone():
    """Evaluation copies the model on one rank: the copy must not join the expert-parallel all-to-all."""
    import copy

    from dstlm.models.moe import ExpertParallel, set_expert_parallel

    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16,
                          moe=MoEConfig(num_experts=4, every=2, expert_parallel_size=2)))
    assert set_expert_parallel(model, ExpertParallel(group=None, rank=1, size=2)) == 1
    clone = copy.deepcopy(model)
    assert model.blocks[1].mlp.ep.rank == 1 and clone.blocks[1].mlp.ep is None
    x = torch.randint(0, 64, (2, 16))
    set_expert_parallel(model, None)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_tiny_moe_learns(tmp_path, small_corpus):
    """A 2-layer MoE GPT (4 experts, top-1 every 2nd block) on the shipped text: the validation loss falls
    clearly from its start, the load stays spread over the experts, and aux losses are logged."""
    from conftest import tiny_run
    from dstlm.training.assembly.build import build

    cfg = tiny_run(tmp_path, small_corpus, model=dict(moe=MoEConfig(num_experts=4, top_k=1, every=2)),
                   trainer=dict(max_steps=40, val_every_n_steps=40))
    trainer, module, data = build(cfg, logger=False)
    start = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=data)
    end = float(trainer.callback_metrics["val/loss"])
    assert start > math.log(400) and end < start - 0.5, (start, end)
    assert float(trainer.callback_metrics["moe/load_max"]) < 3.0  # no expert took (nearly) everything
    assert "moe/aux_loss" in trainer.callback_metrics and "moe/dropped" in trainer.callback_metrics
    from dstlm.hf.export import export

    with pytest.raises(ValueError, match="is a Mixture-of-Experts model; no Hugging Face architecture"):
        export(str(tmp_path / "t"), str(tmp_path / "hf"))  # refused in one line, not a traceback


@pytest.mark.parametrize("method", ["rigl", "srigl", "set"])
def test_dst_on_batched_experts_keeps_per_expert_budgets(tmp_path, small_corpus, method):
    """Each expert's projection is its own sparse matrix (own mask slice, own budget, ERK over all
    matrices); routers stay dense. The DST callback verifies the invariants at every update (zero weights
    and AdamW moments off the mask, exact budgets); SRigL keeps a constant fan-in in every expert row."""
    from conftest import tiny_run
    from dstlm.sparse import SparsityConfig
    from dstlm.training.assembly.build import build

    cfg = tiny_run(tmp_path, small_corpus, model=dict(moe=MoEConfig(num_experts=4, top_k=2, every=2)),
                   trainer=dict(max_steps=7, val_every_n_steps=7),
                   sparsity=SparsityConfig(method=method, sparsity=0.8, delta_t=2, t_end=1.0, drop_fraction=0.3))
    trainer, module, data = build(cfg, logger=False)
    trainer.fit(module, datamodule=data)
    engine = module.sparse_engine
    assert engine.n_updates == 3
    names = [sp.name for sp in engine.params]
    assert [n for n in names if ".mlp.w_in." in n] == [f"blocks.1.mlp.w_in.{e}" for e in range(4)]
    assert not any("router" in n for n in names)
    moe = module.model.blocks[1].mlp
    assert moe.w_in_mask.shape == moe.w_in.shape == (4, 128, 32)
    budgets = {engine.budgets[f"blocks.1.mlp.w_in.{e}"] for e in range(4)}
    assert len(budgets) == 1  # the same budget for every expert of a projection
    for e in range(4):
        mask, budget = moe.w_in_mask[e], engine.budgets[f"blocks.1.mlp.w_in.{e}"]
        assert (moe.w_in.detach()[e][~mask] == 0).all()
        if method == "srigl":  # k per surviving row; ablated rows hand their budget to the others (<= budget)
            rows = mask.sum(1)
            k = engine.fan_in[f"blocks.1.mlp.w_in.{e}"]
            assert bool(((rows == 0) | (rows == k)).all())
            assert int(mask.sum()) == k * int((rows > 0).sum()) <= budget
        else:
            assert int(mask.sum()) == budget
    from dstlm.report import load_masks
    from dstlm.sparse import TorchBackend

    assert engine.verify(TorchBackend(trainer.optimizers[0])) == []
    saved = load_masks(tmp_path / "t")  # the run folder's last checkpoint: per-expert [out, in] masks
    assert torch.equal(saved["blocks.1.mlp.w_in.3"], moe.w_in_mask[3]) and saved["blocks.1.mlp.w_in.3"].ndim == 2


def test_wanda_norms_reach_every_expert_matrix():
    """dstlm's MoE layers run each expert as `x @ W[e].t()`: calibration sees every expert matrix's own routed
    inputs (mask_init=wanda no longer falls back to magnitude for experts)."""
    from dstlm.sparse import SparsityConfig
    from dstlm.sparse.calibration import input_norms
    from dstlm.sparse.masks import sparse_params_of

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32,
                    moe=MoEConfig(num_experts=4, top_k=2))
    model = GPT(cfg)
    params = sparse_params_of(model, SparsityConfig(method="static", sparsity=0.5, mask_init="wanda"))
    norms = input_norms(model, params, [(torch.randint(0, 512, (4, 32)), None)])
    experts = [sp for sp in params if sp.index is not None]
    assert len(experts) >= 8 and all(norms[sp.name].shape == (sp.shape[1],) for sp in experts)
    assert all(float(norms[sp.name].min()) >= 0 and float(norms[sp.name].max()) > 0 for sp in experts)
