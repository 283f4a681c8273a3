"""dstlm/sparse/radix.py: the entries' indices made on demand equal the storage mapping, and the rules, through
the collective selector, read a fragment a block at a time: besides the new mask they make no tensor anywhere
near the fragment's size (checked on every op the rules run, not by sampling memory)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dstlm.sparse import rules
from dstlm.sparse.masks import SparseParam
from dstlm.sparse.radix import Entries, block_size
from dstlm.sparse.selection import Ties
from dstlm.sparse.selectors import Selector
from helpers.reference_selection import ReferenceSelector


class LargeOutputs(TorchDispatchMode):
    """Records (op, dtype, numel) of every tensor an op makes (views and in-place ops excepted) with more than
    `limit` entries."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > self.limit:
                self.seen.append((str(func), t.dtype, t.numel()))
        return out


ROWS, COLS = 192, 2048  # 393,216 entries, read in blocks of 2,048


def _case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS * COLS, generator=gen)
    g = torch.randn(ROWS * COLS, generator=gen).abs()
    mask = rules.constant_fan_in_mask((ROWS, COLS), 200, Ties(seed, "init")).reshape(-1)
    return w * mask, g, mask


RULES = {
    "rigl": lambda s, w, g, m: rules.drop_and_grow(s, w, m, g, 3000, Ties(1)),
    "set": lambda s, w, g, m: rules.drop_and_grow(s, w, m, None, 3000, Ties(1)),
    "gmp": lambda s, w, g, m: rules.gmp_prune(s, w, m, 12000, Ties(1)),
    "srigl": lambda s, w, g, m: rules.srigl_update(s, w, m, g, 3000, ROWS * 200, 0.3, True, Ties(1))[0],
    "nm": lambda s, w, g, m: rules.nm_update(s, w, m, g, 3000, 2, 4, Ties(1)),
}


def fragment(n: int) -> Selector:
    """One process holding all n entries as one run: the collective selector, reading blocks."""
    return Selector(Entries(n, COLS, torch.device("cpu"), start=0), (ROWS, COLS))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rules_make_no_fragment_sized_tensor_but_the_new_mask(rule):
    w, g, mask = _case()
    if rule == "nm":
        mask = rules.nm_mask(ReferenceSelector((ROWS, COLS)), w.reshape(ROWS, COLS) + 3.0, 2, 4, Ties(0)).reshape(-1)
        w = w * mask
    select = fragment(mask.numel())
    with block_size(2048):
        expected = RULES[rule](select, w, g, mask)  # outside the mode: the reference run
        with LargeOutputs(limit=mask.numel() // 4) as seen:  # above a block's work and the 65,536-bin histogram
            got = RULES[rule](select, w, g, mask)
    assert torch.equal(got, expected)
    assert seen.seen, "the check sees the new mask: it can fail"
    big = [s for s in seen.seen if s[1] != torch.bool]
    # (N:M's per-group counts, deficits and flags, one per group of 4, are at the limit: documented, none larger)
    assert not big, big  # no index, key, score or weight copy of the fragment
    masks = [s for s in seen.seen if s[1] == torch.bool and s[2] == mask.numel()]
    assert len(masks) <= 2, masks  # the new mask (and the keep, which the grow then fills in place)


def test_rules_read_in_blocks_equal_the_whole_layer_rules():
    w, g, mask = _case(3)
    ties = Ties(1)
    local, select = ReferenceSelector((ROWS, COLS)), fragment(mask.numel())
    W, G, M = w.reshape(ROWS, COLS), g.reshape(ROWS, COLS), mask.reshape(ROWS, COLS)
    whole = rules.drop_and_grow(local, W, M, G, 3000, ties)
    with block_size(1000):  # blocks that cut rows
        got = rules.drop_and_grow(select, w, mask, g, 3000, ties)
    assert torch.equal(got, whole.reshape(-1))
    whole, k = rules.srigl_update(local, W, M, G, 3000, ROWS * 200, 0.3, True, ties)
    with block_size(1000):
        got, k_got = rules.srigl_update(select, w, mask, g, 3000, ROWS * 200, 0.3, True, ties)
    assert k_got == k and torch.equal(got, whole.reshape(-1))


@pytest.mark.parametrize("transposed", [False, True])
def test_entries_index_equals_the_storage_mapping(transposed):
    rows, cols = 6, 10
    module = torch.nn.Linear(rows, cols, bias=False) if transposed else torch.nn.Linear(cols, rows, bias=False)
    sp = SparseParam("m.weight", module, "weight", transposed=transposed)  # transposed: stored [in, out]
    e = sp.entries(7, 41, torch.device("cpu"))
    want = sp.storage_index(torch.arange(7, 48))
    assert torch.equal(e.all(), want)
    assert torch.equal(e.index(5, 30), want[5:30])
    pos = torch.tensor([0, 3, 40])
    assert torch.equal(e.index_at(pos), want[pos])
    assert torch.equal(e.rows(0, 41), want // cols)
    marks = torch.arange(rows) * 10
    for a, b in [(0, 41), (3, 4), (9, 33)]:
        assert torch.equal(e.per_row(marks, a, b), marks[want[a:b] // cols])
        counts = torch.zeros(rows, dtype=torch.int64)
        sel = torch.arange(b - a) % 3 == 0
        e.add_row_counts(counts, sel, a, b)
        assert torch.equal(counts, torch.bincount(want[a:b][sel] // cols, minlength=rows))


def test_block_size_refuses_nonsense():
    with pytest.raises(ValueError, match="block size 0"):
        with block_size(0):
            pass
