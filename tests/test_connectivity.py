"""Dead and orphan hidden units across linked sparse layers: hand-built masks, the GPT's links, the engine's
telemetry, and `dstlm report`."""

from __future__ import annotations

import torch

from dstlm.sparse import SparseEngine, SparsityConfig
from dstlm.sparse.connectivity import UnitLink, links_between, unit_census


def test_census_on_a_hand_built_pair():
    # producer: 4 units x 3 inputs; consumer: 2 outputs x 4 units
    producer = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    consumer = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    c = unit_census({"p": producer, "c": consumer}, [UnitLink("p", "c")])
    row = c["links"]["p->c"]
    # unit 1: consumer column empty -> dead, its producer row holds 2 weights that can never learn
    assert row == {"units": 4, "dead": 1, "dead_weights": 2, "orphans": 1, "orphan_weights": 1, "active": 9}
    assert c["dead_unit_frac"] == 0.25 and c["wasted_weight_frac"] == 3 / 9


def test_links_need_both_sides_sparse_and_matching_units():
    shapes = {"a": (8, 4), "b": (4, 8), "c": (4, 6)}
    assert links_between([("a", "b"), ("a", "c"), ("a", "missing")], shapes) == [UnitLink("a", "b")]


def test_gpt_and_moe_links_name_real_sparse_matrices():
    from dstlm.models.gpt import GPT, GPTConfig
    from dstlm.models.moe import MoEConfig

    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16,
                    moe=MoEConfig(num_experts=3, top_k=1, every=2))
    model = GPT(cfg)
    engine = SparseEngine(model, SparsityConfig(method="rigl", sparsity=0.5), seed=0, max_steps=10)
    pairs = model.unit_links()
    assert len(engine.links) == len(pairs) == 2 + 1 + 3  # v/out x 2 blocks, one MLP, three experts
    assert ("blocks.1.mlp.w_in.2", "blocks.1.mlp.w_out.2") in pairs
    c = engine.census()
    assert c["units"] == 2 * 16 + 64 + 3 * 64 and c["dead"] == 0  # a random 50 % mask leaves no column empty


def test_engine_reports_a_column_emptied_by_hand():
    from dstlm.models.gpt import GPT, GPTConfig
    from dstlm.sparse import TorchBackend

    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    engine = SparseEngine(model, SparsityConfig(method="set", sparsity=0.5, delta_t=1, t_end=10), seed=0, max_steps=10)
    fc_out = model.blocks[0].mlp.fc_out
    fc_out.weight_mask[:, :5] = False  # five hidden units lose every consumer weight
    assert engine.census_stats()["dead_units"] == 5.0
    stats = engine.after_optimizer_step(1, TorchBackend())  # an update: telemetry carries the census
    assert "dead_unit_frac" in stats and "wasted_weight_frac" in stats


class Pair(torch.nn.Module):
    """A two-layer MLP whose hidden units the engine can see: fc_in rows produce them, fc_out columns read them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc_in = torch.nn.Linear(16, 12, bias=False)
        self.fc_out = torch.nn.Linear(12, 16, bias=False)

    def unit_links(self):
        return [("fc_in.weight", "fc_out.weight")]

    def forward(self, x):
        return self.fc_out(torch.relu(self.fc_in(x)))


def _step(model, engine, t):
    from dstlm.sparse import TorchBackend

    model.zero_grad()
    model(torch.randn(8, 16)).square().mean().backward()
    engine.before_optimizer_step(t, TorchBackend())
    return engine.after_optimizer_step(t, TorchBackend())


import pytest  # noqa: E402


@pytest.mark.parametrize("method", ["rigl", "set", "srigl"])
@pytest.mark.parametrize("reclaim", [False, True])
def test_reclaim_gives_a_dead_units_budget_back(method, reclaim):
    """Empty the consumer columns of units 0-2 by hand; at the next update the producer rows of those units
    hold weights that can never learn. With reclaim_dead_units those rows end empty and their budget sits in
    live rows (the layer's count unchanged: SRigL's fan-in rises instead); without it they keep weights."""
    model = Pair()
    cfg = SparsityConfig(method=method, sparsity=0.5, include=["*"], distribution="uniform", delta_t=1, t_end=10,
                         drop_fraction=0.1, reclaim_dead_units=reclaim, ablation=False)
    engine = SparseEngine(model, cfg, seed=0, max_steps=10)
    fc_in, fc_out = model.fc_in, model.fc_out
    with torch.no_grad():
        fc_out.weight_mask[:, :3] = False
        fc_out.weight.mul_(fc_out.weight_mask)
    budget_in, k0 = int(fc_in.weight_mask.sum()), engine.layers["fc_in.weight"].fan_in
    assert bool(fc_in.weight_mask[:3].any())  # the dead rows hold weights before the update
    stats = _step(model, engine, 1)
    dead_rows_active = int(fc_in.weight_mask[:3].sum())
    if reclaim:
        assert dead_rows_active == 0 and stats["reclaimed_rows"] == 3.0
        if method == "srigl":  # the three rows' budget went to the nine others: a larger constant fan-in
            assert engine.layers["fc_in.weight"].fan_in == budget_in // 9 > k0
            assert int(fc_in.weight_mask.sum()) == 9 * (budget_in // 9)
        else:
            assert int(fc_in.weight_mask.sum()) == budget_in
    else:
        assert dead_rows_active > 0
    assert bool((fc_in.weight.detach()[~fc_in.weight_mask] == 0).all())


def test_reclaim_refused_where_budget_cannot_move():
    with pytest.raises(ValueError, match="reclaim_dead_units=true needs a method that moves weights between rows; "
                                         "sparsity.method=nm"):
        SparsityConfig(method="nm", reclaim_dead_units=True)
    with pytest.raises(ValueError, match="sparsity.method=static does not"):
        SparsityConfig(method="static", reclaim_dead_units=True)


def test_spread_of_hand_built_and_random_masks():
    from dstlm.sparse.connectivity import spread

    fan_in = torch.zeros(8, 10, dtype=torch.bool)
    for r in range(8):
        fan_in[r, torch.randperm(10)[:3]] = True  # 3 per row: constant fan-in
    half = torch.zeros(4, 6, dtype=torch.bool)
    half[:, :3] = True  # three columns full, three empty: column counts 4,4,4,0,0,0
    s = spread({"fan_in": fan_in, "half": half})
    assert s["matrices"]["fan_in"]["fan_in_cv"] == 0.0 and s["matrices"]["half"]["fan_out_cv"] == 1.0
    assert s["fan_in_cv"] == (0.0 + 0.0) / 2 and s["matrices"]["half"]["fan_in_cv"] == 0.0
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(768, 768, generator=g) < 0.1  # binomial counts: CV ~ sqrt((1 - d) / (n d))
    assert abs(spread({"r": rand})["fan_in_cv"] / ((0.9 / 76.8) ** 0.5) - 1) < 0.1


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_gradient_growth_concentrates_where_random_growth_does_not(method):
    """The mechanism behind RigL trailing SET in the study (docs/results.md): gradients large in a few input
    columns make RigL grow every new weight there, so the fan-out spread rises; SET grows at random and keeps
    the spread of a random mask."""
    from dstlm.sparse import TorchBackend

    model = Pair()
    engine = SparseEngine(model, SparsityConfig(method=method, sparsity=0.5, include=["*"], delta_t=1, t_end=10,
                                                drop_fraction=0.3, distribution="uniform"), seed=0, max_steps=10)
    before = engine.spread()["matrices"]["fc_in.weight"]["fan_out_cv"]
    old = model.fc_in.weight_mask.clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.fc_in.weight.grad[:, :4] = 1.0  # the loss cares about inputs 0-3 only
    engine.before_optimizer_step(1, TorchBackend())
    engine.after_optimizer_step(1, TorchBackend())
    grown = model.fc_in.weight_mask & ~old
    after = engine.spread()["matrices"]["fc_in.weight"]["fan_out_cv"]
    assert bool(grown.any())
    if method == "rigl":  # every new weight in columns 0-3
        assert not bool(grown[:, 4:].any()) and after > before + 0.2
    else:
        assert bool(grown[:, 4:].any()) and abs(after - before) < 0.2
    stats = engine.last_stats
    assert stats["fan_out_cv"] == engine.spread()["fan_out_cv"] and "fan_in_cv" in stats
