"""The rules and densities against the invariants of ALGORITHMS.md, on random tensors."""

import math

import pytest
import torch

from dstlm.sparse import rules
from dstlm.sparse.config import SparsityConfig
from dstlm.sparse.density import active_counts, erk_densities
from dstlm.sparse.schedule import UpdateSchedule, gmp_sparsity
from dstlm.sparse.selection import Ties
from dstlm.sparse import selectors


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ties(seed=0):
    return Ties(seed, "test")


def whole(t: torch.Tensor) -> selectors.Selector:
    """The selector of a matrix held whole in this process."""
    return selectors.whole(tuple(t.shape))


def rand_layer(rows=16, cols=24, density=0.3, seed=0):
    g = gen(seed)
    w = torch.randn(rows, cols, generator=g)
    mask = rules.random_mask((rows, cols), int(density * rows * cols), ties(seed))
    return w * mask, mask, torch.randn(rows, cols, generator=g)


def test_erk_closed_form_hand_example():
    # two layers: A 10x20 (p = 30/200 = 0.15), B 40x20 (p = 60/800 = 0.075); global density 0.2
    # eps = 0.2 * 1000 / (0.15*200 + 0.075*800) = 200 / 90 ; dA = 0.3333, dB = 0.16667
    d = erk_densities({"A": (10, 20), "B": (40, 20)}, 0.2)
    assert d["A"] == pytest.approx(0.15 * 200 / 90)
    assert d["B"] == pytest.approx(0.075 * 200 / 90)
    assert d["A"] * 200 + d["B"] * 800 == pytest.approx(200)


def test_erk_dense_resolve():
    # a tiny layer whose ERK density would exceed 1 becomes dense and the rest re-solve to the target
    shapes = {"tiny": (2, 2), "big1": (100, 100), "big2": (200, 100)}
    d = erk_densities(shapes, 0.5)
    assert d["tiny"] == 1.0
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(d[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.5 * total)
    assert all(0 < v <= 1 for v in d.values())


def test_uniform_and_overrides_keep_global_target():
    shapes = {"a": (10, 10), "b": (20, 10), "c": (30, 10)}
    d = erk_densities(shapes, 0.3, fixed={"a": 0.9}, method="uniform")
    assert d["a"] == 0.9 and d["b"] == pytest.approx(d["c"])
    counts = active_counts(shapes, d, 0.3)
    assert sum(counts.values()) == round(0.3 * 600)  # exact global budget


def test_cosine_schedule_values():
    s = UpdateSchedule(delta_t=100, t_start=0, t_end=1000, alpha=0.3)
    assert s.drop_fraction(0) == pytest.approx(0.3)
    assert s.drop_fraction(500) == pytest.approx(0.15)
    assert s.drop_fraction(1000) == pytest.approx(0.0, abs=1e-12)
    assert s.drop_fraction(250) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert [t for t in range(0, 1201) if s.is_update_step(t)] == list(range(100, 1000, 100))
    lin = UpdateSchedule(100, 0, 1000, 0.3, "linear")
    assert lin.drop_fraction(500) == pytest.approx(0.15)


def test_gmp_cubic_schedule():
    assert gmp_sparsity(0, 0.0, 0.9, 0, 100) == 0.0
    assert gmp_sparsity(50, 0.0, 0.9, 0, 100) == pytest.approx(0.9 - 0.9 * 0.125)
    assert gmp_sparsity(100, 0.0, 0.9, 0, 100) == pytest.approx(0.9)


def test_rigl_grows_top_gradient_hand_example():
    w = torch.tensor([[0.5, 0.0, -0.1, 0.0], [0.0, 2.0, 0.0, 0.3]])
    mask = w != 0
    grad = torch.tensor([[0.0, 0.9, 0.0, 0.1], [0.7, 0.0, 0.2, 0.0]])
    new = rules.drop_and_grow(whole(w), w, mask, grad, 2, ties())
    # dropped: the 2 smallest |W| active (-0.1 and 0.3); grown: the 2 largest |grad| inactive (0.9, 0.7)
    expected = torch.tensor([[True, True, False, False], [True, True, False, False]])
    assert torch.equal(new, expected)


def test_rigl_may_regrow_a_dropped_position():
    w = torch.tensor([[1.0, 0.01, 0.0, 0.0]])
    mask = w != 0
    grad = torch.tensor([[0.0, 5.0, 0.1, 0.2]])  # the dropped 0.01 entry has the largest gradient
    new = rules.drop_and_grow(whole(w), w, mask, grad, 1, ties())
    assert torch.equal(new, mask)


@pytest.mark.parametrize("seed", range(3))
def test_rigl_set_keep_exact_budget(seed):
    w, mask, grad = rand_layer(seed=seed)
    rigl = rules.drop_and_grow(whole(w), w, mask, grad, 17, ties(seed))
    for new in (rigl, rules.drop_and_grow(whole(w), w, mask, None, 17, ties(seed))):
        assert int(new.sum()) == int(mask.sum())
        assert int((new & ~mask).sum()) <= 17


def test_set_random_but_identical_for_identical_seeds():
    w, mask, _ = rand_layer()
    a = rules.drop_and_grow(whole(w), w, mask, None, 20, ties(5))
    b = rules.drop_and_grow(whole(w), w, mask, None, 20, ties(5))
    c = rules.drop_and_grow(whole(w), w, mask, None, 20, ties(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ties_broken_identically_by_seed():
    w = torch.ones(8, 8)  # every magnitude ties
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[:, :4] = False
    grad = torch.ones(8, 8)
    first = rules.drop_and_grow(whole(w), w, mask, grad, 10, ties(1))
    assert torch.equal(first, rules.drop_and_grow(whole(w), w, mask, grad, 10, ties(1)))


def test_gmp_prune_keeps_largest():
    w = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    new = rules.gmp_prune(whole(w), w, torch.ones(1, 4, dtype=torch.bool), 2, ties())
    assert torch.equal(new, torch.tensor([[True, False, False, True]]))


def test_nm_static_and_dynamic_group_invariant():
    g = gen(3)
    w = torch.randn(8, 16, generator=g)
    m = rules.nm_mask(whole(w), w, 2, 4, ties(3))
    assert (m.view(8, 4, 4).sum(-1) == 2).all()
    grad = torch.randn(8, 16, generator=g)
    new = rules.nm_update(whole(w * m), w * m, m, grad, 6, 2, 4, ties(4))
    assert (new.view(8, 4, 4).sum(-1) == 2).all()
    assert not torch.equal(new, m)
    with pytest.raises(ValueError, match="in_features divisible by m=4"):
        rules.nm_mask(whole(torch.randn(2, 6)), torch.randn(2, 6), 2, 4, ties())


def test_srigl_constant_fan_in_and_ablation():
    g = gen(0)
    rows, cols, k0 = 32, 40, 6
    mask = rules.constant_fan_in_mask((rows, cols), k0, ties())
    assert (mask.sum(1) == k0).all()
    w = torch.randn(rows, cols, generator=g) * mask
    w[:8] *= 1e-4  # eight rows of tiny weights with no gradient: not salient, to be ablated
    grad = torch.randn(rows, cols, generator=g).abs() + 0.1
    grad[:8] = 0.0
    budget = k0 * rows
    # n_swap = 48: the top 144 magnitudes are exactly the 24 normal rows' weights
    new, k = rules.srigl_update(whole(w), w, mask, grad, 48, budget, 0.3, True, ties(1))
    counts = new.sum(1)
    assert (counts[:8] == 0).all()  # ablated
    assert ((counts == 0) | (counts == k)).all()  # every surviving row has exactly k
    n_surv = int((counts > 0).sum())
    assert n_surv == 24 and k == budget // n_surv == 8  # freed budget goes to the survivors
    assert int(new.sum()) == k * n_surv and budget - int(new.sum()) < n_surv


def test_srigl_without_ablation_keeps_every_row():
    w, _, grad = rand_layer(16, 24)
    mask = rules.constant_fan_in_mask((16, 24), 5, ties(1))
    w = w * mask
    w[:3] = 0.0
    new, k = rules.srigl_update(whole(w), w, mask, grad * 0, 20, 80, 0.9, False, ties(2))
    assert k == 5 and (new.sum(1) == 5).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=1.2), "sparsity.sparsity=1.2 must be in [0, 1)"),
    (dict(sparsity=-0.1), "sparsity.sparsity=-0.1 must be in [0, 1)"),
    (dict(method="magic"), "sparsity.method='magic' is unknown"),
    (dict(delta_t=0), "sparsity.delta_t=0 must be a positive integer"),
    (dict(t_start=500, t_end=100), "sparsity.t_end=100 is not after sparsity.t_start=500"),
    (dict(gamma_sal=0.0), "sparsity.gamma_sal=0.0 must be in (0, 1]"),
    (dict(gamma_sal=1.5), "sparsity.gamma_sal=1.5 must be in (0, 1]"),
    (dict(distribution="zipf"), "sparsity.distribution='zipf' is unknown"),
])
def test_config_bad_input(kwargs, message):
    with pytest.raises(ValueError) as err:
        SparsityConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_engine_stops_on_rank_mismatch():
    """A backend whose ranks disagree on the mask checksum makes the update fail loudly."""
    from dstlm.models import GPT, GPTConfig
    from dstlm.sparse import MaskMismatchError, SparseEngine, TorchBackend

    class Disagreeing(TorchBackend):  # two ranks deciding whole masks that come out different
        world_size = 2
        shards = False

        def __init__(self, drifted: str = ""):
            super().__init__()
            self.drifted, self.calls = drifted, 0

        def all_gather(self, values):
            """Rank 1's checksums: entering the update, those of a rank whose mask of `drifted` changed since the
            last update; after it, disagreeing on the first layer."""
            self.calls += 1
            other = values.clone()
            names = [sp.name for sp in engine.params]
            if self.calls == 1 and self.drifted:
                other[names.index(self.drifted), 1] += 1
            if self.calls == 2:
                other[0, 0] += 1
            return [values, other]

    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    engine = SparseEngine(model, SparsityConfig(method="set", sparsity=0.5, delta_t=1, t_end=10), seed=0, max_steps=10)
    with pytest.raises(MaskMismatchError, match=r"^the mask of blocks.0.attn.q_proj.weight "
                                                r"differs .* after the mask update of step 1 \(rank\(s\) \[1\]"):
        engine.after_optimizer_step(1, Disagreeing())
    with pytest.raises(MaskMismatchError, match=r"^the mask of blocks.0.mlp.fc_in.weight differs across data-parallel "
                                                r"ranks entering the mask update of step 2 \(rank\(s\) \[1\] "):
        engine.after_optimizer_step(2, Disagreeing(drifted="blocks.0.mlp.fc_in.weight"))


def test_constant_fan_in_rows_choose_their_inputs_independently():
    """Ties are broken per row: SRigL's initial mask gives every row its own random inputs. (A column order
    shared by all rows gave every row the same k inputs: at GPT-2 MLP shapes, 90 % of fc_out's columns -- the
    hidden units they read -- started without a single weight.)"""
    mask = rules.constant_fan_in_mask((192, 768), 76, ties(0))
    assert (mask.sum(dim=1) == 76).all()
    assert int((~mask.any(dim=0)).sum()) == 0  # every input column is used (expected empty: 768 * 0.9^192 ~ 0)
    assert len({tuple(r.nonzero().squeeze(1).tolist()) for r in mask}) == 192
    small = rules.constant_fan_in_mask((50, 10), 3, ties(1))  # all-tied rows: independent random choices
    assert len({tuple(r.nonzero().squeeze(1).tolist()) for r in small}) > 30  # ~41 expected of 120; shared: 1
    per_column = rules.constant_fan_in_mask((2000, 10), 3, ties(2)).sum(dim=0)  # 600 each, sd ~20
    assert int(per_column.min()) > 500 and int(per_column.max()) < 700
