"""DST methods as registered classes, their config resolution, and the engine driven by a fake backend
(no Lightning, no model zoo: a two-layer torch model and a backend that records what the engine asks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dstlm.sparse import SparseEngine, SparsityConfig
from dstlm.sparse.flops import FlopCount, training_flops
from dstlm.sparse.methods import METHODS, DSTMethod, method_class, register


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 32, bias=False)
        self.b = nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class FakeBackend:
    """A one-process backend that logs every call and keeps an Adam-like state per parameter."""

    def __init__(self, model: nn.Module, agree: bool = True) -> None:
        self.calls: list[tuple[str, int]] = []
        self.state = {p: torch.ones_like(p) for p in model.parameters()}
        self.agree = agree
        if not agree:
            self.world_size = 2  # ranks are compared only when there are several (whole decisions here)

    def full_grad(self, param):
        self.calls.append(("full_grad", id(param)))
        return param.grad

    def mask_grad_(self, param, mask):
        self.calls.append(("mask_grad_", id(param)))
        param.grad.masked_fill_(~mask, 0)

    def full_weight(self, param):
        self.calls.append(("full_weight", id(param)))
        return param.detach()

    @torch.no_grad()
    def mask_weight_(self, param, keep):
        self.calls.append(("mask_weight_", id(param)))
        param.mul_(keep)

    def mask_optimizer_state_(self, param, keep):
        self.calls.append(("mask_optimizer_state_", id(param)))
        self.state[param].mul_(keep)

    world_size = 1  # whole decisions
    shards = whole_fragments = capture_dense = False

    def violations(self, param, mask):
        self.calls.append(("violations", id(param)))
        off = ~mask
        return torch.tensor([int((param.detach()[off] != 0).sum()), 0, int((self.state[param][off] != 0).sum())])

    def all_equal(self, values):
        return self.agree

    def all_gather(self, values):
        """Rank 1's copy: the same on the check entering an update; after it (disagreeing ranks) the last
        layer's checksum differs."""
        self.gathers = getattr(self, "gathers", 0) + 1
        other = values.clone()
        if not self.agree and self.gathers % 2 == 0:
            other[-1] += 1
        return [values, other]

    def all_reduce_mean_(self, tensor):
        return tensor


def step(model, engine, backend, t):
    model.zero_grad()
    model(torch.randn(4, 16)).square().mean().backward()
    engine.before_optimizer_step(t, backend)
    return engine.after_optimizer_step(t, backend)


def engine_for(method: str, **kw) -> tuple[nn.Module, SparseEngine, FakeBackend]:
    model = TwoLayers()
    cfg = SparsityConfig(method=method, delta_t=2, t_end=6, include=["*"], distribution="uniform",
                         **({} if method == "nm" else {"sparsity": 0.75}), **kw)
    return model, SparseEngine(model, cfg, seed=0, max_steps=8), FakeBackend(model)


def test_registry_holds_the_built_in_methods():
    assert set(METHODS) == {"static", "set", "rigl", "srigl", "gmp", "nm"}
    assert all(issubclass(c, DSTMethod) and c.summary for c in METHODS.values())
    with pytest.raises(ValueError, match="sparsity.method='nope' is unknown; choose one of: static, set"):
        method_class("nope")


@pytest.mark.parametrize("method", ["rigl", "srigl", "nm"])
def test_dense_gradient_read_only_before_updates(method):
    model, engine, backend = engine_for(method)
    for t in range(1, 7):
        backend.calls.clear()
        stats = step(model, engine, backend, t)
        reads = [c for c in backend.calls if c[0] == "full_grad"]
        # scores of the step that ends at an update step only; every step masks each parameter's gradient
        assert len(reads) == (2 if t in (2, 4) else 0), t
        assert sum(c[0] == "mask_grad_" for c in backend.calls) == 2
        assert (stats is not None) == (t in (2, 4))
        if stats is not None:  # one weight read, one weight and one state write per parameter
            assert sum(c[0] == "full_weight" for c in backend.calls) == 2
            assert sum(c[0] == "mask_weight_" for c in backend.calls) == 2
            assert sum(c[0] == "mask_optimizer_state_" for c in backend.calls) == 2
    assert engine.n_updates == 2 and engine.verify(backend) == []


@pytest.mark.parametrize("method", ["static", "set", "gmp"])
def test_methods_without_dense_gradient_never_read_it(method):
    model, engine, backend = engine_for(method)
    for t in range(1, 7):
        step(model, engine, backend, t)
    assert not any(c[0] == "full_grad" for c in backend.calls)
    assert engine.n_updates == {"static": 0, "set": 2, "gmp": 3}[method]  # gmp also prunes at t_end = 6


def test_engine_stops_when_ranks_disagree():
    from dstlm.sparse import MaskMismatchError

    model, engine, _ = engine_for("set")
    with pytest.raises(MaskMismatchError, match=r"the mask of b.weight differs across data-parallel ranks after "
                                                r"the mask update of step 2 \(rank\(s\) \[1\] disagree with rank 0\)"):
        step(model, engine, FakeBackend(model, agree=False), 2)


def test_nm_sparsity_and_distribution_come_from_the_method():
    cfg = SparsityConfig(method="nm", n=1, m=4)
    assert cfg.sparsity == 0.75 and cfg.distribution == "uniform"
    with pytest.raises(ValueError, match=r"sparsity.sparsity=0.9 contradicts sparsity.method=nm .*set 0.5$"):
        SparsityConfig(method="nm", sparsity=0.9)
    with pytest.raises(ValueError, match="sparsity.distribution='erk' contradicts sparsity.method=nm"):
        SparsityConfig(method="nm", distribution="erk")
    with pytest.raises(ValueError, match="sparsity.n=4, sparsity.m=4: need integers 0 < n < m"):
        SparsityConfig(method="nm", n=4, m=4)
    assert SparsityConfig(method="nm", sparsity=0.5).sparsity == 0.5  # consistent values are fine


def test_sparse_init_defaults_per_method_and_can_be_turned_off():
    assert SparsityConfig(method="srigl").sparse_init == "rescale"
    assert SparsityConfig(method="rigl").sparse_init == "rescale"  # every method (the learning-quality study)
    assert SparsityConfig(method="set", sparse_init="none").sparse_init == "none"
    assert SparsityConfig(method="srigl", sparse_init="none").sparse_init == "none"
    dense = TwoLayers().a.weight.detach().clone()
    model, engine, _ = engine_for("srigl", sparse_init="none")
    mask = model.a.weight_mask
    assert torch.equal(model.a.weight.detach()[mask], dense[mask])  # kept at the dense init, not rescaled
    model, engine, _ = engine_for("srigl")
    assert not torch.equal(model.a.weight.detach()[mask], dense[mask])


def test_training_flops_ask_the_method():
    c = FlopCount(layers={"x": 100}, layers_dense={"x": 400})
    dense_grad = (3 * 100 * 10 + 2 * 100 + 400) / 11
    assert training_flops(c, None, 10) == 300
    for name in ("static", "set", "gmp"):
        assert training_flops(c, name, 10) == 300
    for name in ("rigl", "srigl", "nm"):  # N:M reads the dense gradient too (it was counted as static)
        assert training_flops(c, name, 10) == pytest.approx(dense_grad)


def test_a_new_method_is_one_registered_class():
    """The extension point the docs describe: a class with a name and an update, nothing else to touch."""

    @register
    class DropRandomGrowGradient(DSTMethod):
        name = "test-random-drop"
        summary = "drop at random, grow by |gradient|"
        uses_dense_grad = True

        def update(self, layer, shard, n_swap, t, schedule, ties):
            s = shard.select
            kept = s.top(None, s.count(shard.mask) - n_swap, ties.sub("drop"), inside=shard.mask)
            return s.top(shard.score, n_swap, ties.sub("grow"), outside=kept, into=kept)

    try:
        model, engine, backend = engine_for("test-random-drop")
        budgets = dict(engine.budgets)
        for t in range(1, 7):
            step(model, engine, backend, t)
        assert engine.n_updates == 2 and engine.verify(backend) == []
        assert {n: int(la.sum()) for n, la in ((sp.name, sp.mask) for sp in engine.params)} == budgets
        assert training_flops(FlopCount(layers={"x": 1}, layers_dense={"x": 1}), "test-random-drop", 1) == 3
    finally:
        del METHODS["test-random-drop"]


def test_ever_active_is_a_bit_packed_union_of_every_mask_and_old_checkpoints_load():
    from dstlm.sparse.bits import pack_mask, unpack_bits

    model, engine, backend = engine_for("rigl")
    union = {sp.name: sp.mask.clone() for sp in engine.params}
    stats = None
    for t in range(1, 7):
        stats = step(model, engine, backend, t) or stats
        for sp in engine.params:
            union[sp.name] |= sp.mask
    n = sum(m.numel() for m in union.values())
    for sp in engine.params:
        packed = engine.ever_active[sp.name]
        assert packed.dtype == torch.uint8 and packed.numel() == -(-sp.mask.numel() // 8)
        assert torch.equal(unpack_bits(packed, sp.mask.numel()).view(sp.mask.shape), union[sp.name])
    assert engine.n_updates == 2 and stats is not None
    assert stats["itop"] == pytest.approx(sum(int(m.sum()) for m in union.values()) / n)
    assert stats["itop"] > 0.25  # RigL moved weights: more than the 25 % density was ever active
    # a checkpoint written before the packing holds bool masks: they load packed
    state = engine.state_dict()
    state["ever_active"] = {k: union[k].clone() for k in state["ever_active"]}
    _, fresh, _ = engine_for("rigl")
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.ever_active[k], pack_mask(union[k])) for k in union)
