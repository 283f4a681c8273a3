"""dstlm's selections (the selector over a whole matrix: radix select with a sampled first round; per-row top-k)
equal the sort-based references exactly, ties included (tests/helpers/reference_selection.py)."""

from __future__ import annotations

import pytest
import torch

from dstlm.sparse import selection as S
from dstlm.sparse import selectors
from helpers import reference_selection as R


def top(score: torch.Tensor, k: int, ties: S.Ties, eligible=None) -> torch.Tensor:
    """The k largest |score| among eligible entries, chosen by the selector of the whole matrix."""
    m = score.reshape(1, -1) if score.dim() == 1 else score
    inside = None if eligible is None else eligible.reshape(m.shape)
    return selectors.whole(tuple(m.shape)).top(m, k, ties, inside=inside).reshape(score.shape)


def cases(n_cases=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i in range(n_cases):
        rows, cols = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        levels = int(torch.randint(1, 6, (1,), generator=g))  # few distinct values: ties everywhere
        score = torch.randint(0, levels, (rows, cols), generator=g).float() - 1.0
        eligible = torch.rand(rows, cols, generator=g) < 0.6 if i % 2 else None
        yield i, g, score, eligible


def test_top_k_equals_reference_with_ties_and_eligibility():
    for i, g, score, eligible in cases():
        k = int(torch.randint(0, score.numel() + 2, (1,), generator=g))
        fast = top(score, k, S.Ties(i, "t"), eligible)
        assert torch.equal(fast, R.reference_top_k(score.abs(), k, S.Ties(i, "t"), eligible)), i
        n_e = score.numel() if eligible is None else int(eligible.sum())
        assert int(fast.sum()) == min(k, n_e)
        if eligible is not None:
            assert not bool((fast & ~eligible).any())


def test_row_top_k_equals_reference_per_row_counts():
    for i, g, score, eligible in cases(seed=1):
        k = torch.randint(0, score.shape[1] + 2, (score.shape[0],), generator=g)
        fast = S.row_top_k(score, k, S.Ties(i), eligible)
        assert torch.equal(fast, R.reference_row_top_k(score, k, S.Ties(i), eligible)), i
        cap = torch.full_like(k, score.shape[1]) if eligible is None else eligible.sum(1)
        assert torch.equal(fast.sum(1), torch.minimum(k, cap))


def test_a_selection_of_rows_hashes_its_layer_indices():
    # choosing among rows 3 and 7 of a layer gives what those rows get when the whole layer chooses
    score = torch.zeros(10, 6)
    whole = S.row_top_k(score, 2, S.Ties(9))
    rows = torch.tensor([3, 7])
    part = S.row_top_k(score[rows], 2, S.Ties(9), row_ids=rows)
    assert torch.equal(part, whole[rows])
    assert torch.equal(part, R.reference_row_top_k(score[rows], 2, S.Ties(9), row_ids=rows))


@pytest.mark.parametrize("k", [1, 17, 30_000, 1_500_000, 2_999_997])
def test_sample_select_path_is_exact_on_large_layers(k):
    g = torch.Generator().manual_seed(k)
    score = torch.randint(0, 1000, (3_000_000,), generator=g).float()  # ~3000 ties per value
    ties = S.Ties(7, k)
    fast = top(score, k, ties)
    assert int(fast.sum()) == k and torch.equal(fast, R.reference_top_k(score, k, ties))


@pytest.mark.parametrize("share", [0.1, 0.8])
def test_large_layers_with_eligible_entries(share):
    # the compacted path (few eligible: the active entries) and the candidate pass over all (most eligible)
    g = torch.Generator().manual_seed(int(share * 10))
    score = torch.randint(0, 500, (2_000_000,), generator=g).float()
    eligible = torch.rand(2_000_000, generator=g) < share
    for k in (5, 40_000, int(0.5 * share * 2_000_000)):
        ties = S.Ties(2, k)
        fast = top(score, k, ties, eligible)
        assert S.count(fast) == k and torch.equal(fast, R.reference_top_k(score, k, ties, eligible))


@pytest.mark.parametrize("sampled", ["zeros", "the largest"])
def test_a_misleading_sample_still_gives_the_exact_answer(sampled):
    # the first round's sample reads every 64th entry; here those hold only zeros, or only the largest values,
    # so the bracket it sets misses the k-th value and the full first round must take over
    n = 3_000_000
    g = torch.Generator().manual_seed(5)
    score = torch.rand(n, generator=g) + 1.0
    score[::64] = 0.0 if sampled == "zeros" else 100.0 + torch.rand(len(range(0, n, 64)), generator=g)
    for k in (5000, 60_000, 2_000_000):
        assert torch.equal(top(score, k, S.Ties(0)), R.reference_top_k(score, k, S.Ties(0))), k


def test_hash_is_a_seeded_bijection_of_32_bit_indices():
    idx = torch.arange(1 << 20)
    h = S.Ties(5, "update", 100, "blocks.0.mlp.fc_in.weight").hash(idx)
    assert h.unique().numel() == idx.numel() and int(h.min()) >= 0 and int(h.max()) < 2**32
    assert torch.equal(h, S.Ties(5, "update", 100, "blocks.0.mlp.fc_in.weight").hash(idx))
    other = S.Ties(5, "update", 200, "blocks.0.mlp.fc_in.weight").hash(idx)
    assert float((h == other).float().mean()) < 1e-3
    # a hash of an index does not depend on which other indices are hashed with it (shards agree)
    assert torch.equal(S.Ties(1).hash(idx[1000:2000]), S.Ties(1).hash(idx)[1000:2000])


def test_all_tied_choices_look_uniform():
    # 2000 draws of 1 of 10 by hash alone, each from its own scope: every position about 200 times
    counts = torch.zeros(10)
    for t in range(2000):
        counts += top(torch.zeros(10), 1, S.Ties(3, t)).float()
    assert int(counts.min()) > 140 and int(counts.max()) < 260


def test_layers_beyond_32_bit_indices_are_refused():
    with pytest.raises(ValueError, match="beyond the 2\\^32 entries"):
        S.check_size(2**32)


@pytest.mark.parametrize("shape,levels", [((384, 1536), 40), ((1200, 768), 1000000)])
def test_row_top_k_is_exact_on_large_layers(shape, levels):
    # rows choosing few of their entries (SRigL's regrowth), ties and eligibility
    g = torch.Generator().manual_seed(levels)
    rows, cols = shape
    score = torch.randint(0, levels, shape, generator=g).float()
    eligible = torch.rand(shape, generator=g) < 0.9
    eligible[5] = False  # a row with nothing eligible
    eligible[6, :3] = True
    eligible[6, 3:] = False  # a row with fewer eligible than it asks for
    k = torch.randint(0, cols // 12, (rows,), generator=g)
    k[7] = 0
    k[8] = cols  # asks for everything
    ties = S.Ties(4, "rows")
    fast = S.row_top_k(score, k, ties, eligible)
    assert torch.equal(fast, R.reference_row_top_k(score, k, ties, eligible))
    assert torch.equal(S.row_counts(fast), torch.minimum(k, S.row_counts(eligible)))
    ids = torch.arange(rows - 1, -1, -1)[: 2 * rows // 3]  # a selection of the layer's rows, hashed as such
    part = S.row_top_k(score[ids], k[ids], ties, eligible[ids], row_ids=ids)
    assert torch.equal(part, R.reference_row_top_k(score[ids], k[ids], ties, eligible[ids], row_ids=ids))
