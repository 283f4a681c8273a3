"""dstlm/sparse/sharded.py: a top-k decided on shards equals the whole-layer decision of selection.top_k, for
any split of the layer over 1-4 ranks (simulated with threads), ties included; and over real gloo ranks."""

from __future__ import annotations

import threading

import pytest
import torch

from dstlm.sparse import selection as S
from dstlm.sparse.radix import order_bits
from dstlm.sparse.sharded import float_order_bits, sharded_top_k, torch_all_reduce


@pytest.fixture(autouse=True, params=[1 << 20, pytest.param(64, marks=pytest.mark.slow), 7],
                ids=["block-1M", "block-64", "block-7"])
def block(request):
    """Every test at three block sizes: one block (the rounds keep few entries after the first), and blocks
    small enough that passes cross block edges and rounds keep streaming over many blocks. Blocks of 7 cross
    every edge that blocks of 64 cross (rows split, rounds streaming), so 64 runs in the slow tier only."""
    from dstlm.sparse.radix import block_size

    with block_size(request.param):
        yield request.param


class ThreadRanks:
    """`world` ranks as threads, with an in-place SUM all-reduce between them."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world

    def reducer(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            return t.copy_(total)

        return reduce

    def run(self, fn):
        results, errors = [None] * self.world, []

        def body(r):
            try:
                results[r] = fn(r, self.reducer(r))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def split(n: int, world: int, gen: torch.Generator, contiguous: bool) -> list[torch.Tensor]:
    """Index sets of each rank: contiguous cuts at random points (ZeRO's flat partitions) or a scatter."""
    if contiguous:
        cuts = sorted(torch.randint(0, n + 1, (world - 1,), generator=gen).tolist())
        bounds = [0, *cuts, n]
        return [torch.arange(bounds[r], bounds[r + 1]) for r in range(world)]
    owner = torch.randint(0, world, (n,), generator=gen)
    return [(owner == r).nonzero().squeeze(1) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("contiguous", [True, False])
def test_union_of_shards_equals_the_whole_layer_decision(world, contiguous):
    gen = torch.Generator().manual_seed(world * 10 + contiguous)
    for case in range(12):
        rows, cols = (int(v) for v in torch.randint(1, 30, (2,), generator=gen))
        n = rows * cols
        levels = [1, 3, 1000][case % 3]  # all tied / heavy ties / few ties
        score = torch.randint(0, levels, (rows, cols), generator=gen).float() * 0.25
        k = int(torch.randint(0, n + 1, (1,), generator=gen))
        ties = S.Ties(case, "shard-test")
        whole = S.top_k(score, k, ties).reshape(-1)
        parts = split(n, world, gen, contiguous)
        flat = score.reshape(-1)
        def rank(r, reduce, flat=flat, parts=parts, k=k, ties=ties):
            return sharded_top_k(flat[parts[r]], parts[r], k, ties, reduce)

        got = ThreadRanks(world).run(rank)
        union = torch.zeros(n, dtype=torch.bool)
        for idx, sel in zip(parts, got):
            union[idx[sel]] = True
        assert torch.equal(union, whole), (world, contiguous, case, k)


def test_eligible_entries_alone_on_each_rank():
    # the grow step: only inactive entries are candidates; each rank passes its inactive entries alone
    gen = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (40, 50), generator=gen).float()
    inactive = torch.rand(40, 50, generator=gen) < 0.8
    ties = S.Ties(3, "grow")
    whole = S.top_k(score, 333, ties, eligible=inactive).reshape(-1)
    parts = split(2000, 3, gen, contiguous=True)
    flat, elig = score.reshape(-1), inactive.reshape(-1)

    def rank(r, reduce):
        idx = parts[r][elig[parts[r]]]
        return idx, sharded_top_k(flat[idx], idx, 333, ties, reduce)

    union = torch.zeros(2000, dtype=torch.bool)
    for idx, sel in ThreadRanks(3).run(rank):
        union[idx[sel]] = True
    assert torch.equal(union, whole)


def test_float_order_keys_are_monotone():
    x = torch.tensor([float("-inf"), -3.5, -1e-30, 0.0, 1e-30, 2.0, 7.25, float("inf")])
    b = float_order_bits(x)
    assert bool((b[1:] > b[:-1]).all()) and int(b.min()) >= 0 and int(b.max()) < 2**32
    mag = order_bits(x, magnitude=True)  # |x|'s order: symmetric, and increasing from 0 on either side
    assert torch.equal(mag, order_bits(-x, magnitude=True)) and bool((mag[4:] > mag[3:-1]).all())
    assert bool((mag[:3] > mag[1:4]).all())
    zeros = torch.tensor([-0.0, 0.0])  # equal values: the same bits, so the hash decides between them
    assert float_order_bits(zeros)[0] == float_order_bits(zeros)[1]
    assert order_bits(zeros, magnitude=True)[0] == order_bits(zeros, magnitude=True)[1]


def _gloo_worker(rank, world, path, score, k, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    n = score.numel()
    idx = torch.arange(rank * n // world, (rank + 1) * n // world)
    sel = sharded_top_k(score.reshape(-1)[idx], idx, k, S.Ties(11, "gloo"), torch_all_reduce())
    out[idx] = sel.to(torch.uint8)
    dist.destroy_process_group()


def test_real_gloo_ranks_agree_with_the_whole_layer(tmp_path):
    import torch.multiprocessing as mp

    score = torch.randint(0, 50, (64, 48), generator=torch.Generator().manual_seed(5)).float()
    out = torch.zeros(score.numel(), dtype=torch.uint8).share_memory_()
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "rdzv"), score, 700, out), nprocs=2, join=True)
    assert torch.equal(out.bool(), S.top_k(score, 700, S.Ties(11, "gloo")).reshape(-1))


@pytest.mark.parametrize("rule", ["rigl", "set", "gmp"])
@pytest.mark.parametrize("world", [2, 4])
def test_rules_on_shards_equal_the_whole_layer_rules(rule, world):
    from dstlm.sparse import rules
    from dstlm.sparse.sharded import drop_and_grow_shard, gmp_prune_shard

    gen = torch.Generator().manual_seed(world)
    for case in range(6):
        rows, cols = 24, 40
        mask = rules.random_mask((rows, cols), 300, S.Ties(case, "init"))
        w = torch.randn(rows, cols, generator=gen).round(decimals=1) * mask  # rounded: ties in |W|
        g = torch.randn(rows, cols, generator=gen).round(decimals=1)
        ties = S.Ties(case, "update", 100, "layer")
        if rule == "rigl":
            whole = rules.rigl_update(w, mask, g, 90, ties)
        elif rule == "set":
            whole = rules.set_update(w, mask, 90, ties)
        else:
            whole = rules.gmp_prune(w, mask, 200, ties)
        whole = whole.reshape(-1)
        parts = split(rows * cols, world, gen, contiguous=case % 2 == 0)
        fw, fm, fg = w.reshape(-1), mask.reshape(-1), g.reshape(-1)

        def rank(r, reduce, fw=fw, fm=fm, fg=fg, parts=parts, ties=ties):
            i = parts[r]
            if rule == "gmp":
                return gmp_prune_shard(fw[i], fm[i], 200, i, ties, reduce)
            return drop_and_grow_shard(fw[i], fm[i], fg[i] if rule == "rigl" else None, 90, i, ties, reduce)

        union = torch.zeros(rows * cols, dtype=torch.bool)
        for i, sel in zip(parts, ThreadRanks(world).run(rank)):
            union[i] = sel
        assert torch.equal(union, whole), (rule, world, case)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_row_top_k_on_shards_cutting_rows_equals_the_whole_layer(world):
    from dstlm.sparse.sharded import sharded_row_top_k

    gen = torch.Generator().manual_seed(40 + world)
    for case in range(10):
        rows, cols = (int(v) for v in torch.randint(1, 20, (2,), generator=gen))
        score = torch.randint(0, [1, 3, 100][case % 3], (rows, cols), generator=gen).float()
        k = torch.randint(0, cols + 2, (rows,), generator=gen)
        ties = S.Ties(case, "rows")
        whole = S.row_top_k(score, k, ties).reshape(-1)
        parts = split(rows * cols, world, gen, contiguous=case % 2 == 0)
        flat = score.reshape(-1)

        def rank(r, reduce, flat=flat, parts=parts, k=k, ties=ties, rows=rows, cols=cols):
            i = parts[r]
            return sharded_row_top_k(flat[i], i, k, rows, cols, ties, reduce)

        union = torch.zeros(rows * cols, dtype=torch.bool)
        for i, sel in zip(parts, ThreadRanks(world).run(rank)):
            union[i[sel]] = True
        assert torch.equal(union, whole), (world, case)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("ablation", [True, False])
def test_srigl_on_shards_equals_the_whole_layer_rule(world, ablation):
    from dstlm.sparse import rules
    from dstlm.sparse.sharded import srigl_update_shard

    gen = torch.Generator().manual_seed(world + 10 * ablation)
    rows, cols, k0 = 32, 40, 6
    for case in range(6):  # cases 4-5: an uneven mask (e.g. adopted from a checkpoint): rows get trimmed to k
        mask = rules.constant_fan_in_mask((rows, cols), k0, S.Ties(case, "init")) if case < 4 else \
            rules.random_mask((rows, cols), rows * k0, S.Ties(case, "init"))
        w = (torch.randn(rows, cols, generator=gen) * mask).round(decimals=1)
        w[:8] *= 1e-3  # weak rows: ablation candidates
        g = torch.randn(rows, cols, generator=gen).round(decimals=1)
        g[:8] = 0.0
        ties = S.Ties(case, "update", 50, "layer")
        budget = int(mask.sum())
        whole, k_whole = rules.srigl_update(w, mask, g, 48, budget, 0.3, ablation, ties)
        parts = split(rows * cols, world, gen, contiguous=case % 2 == 0)
        fw, fm, fg = w.reshape(-1), mask.reshape(-1), g.reshape(-1)

        def rank(r, reduce, fw=fw, fm=fm, fg=fg, parts=parts, ties=ties, budget=budget):
            i = parts[r]
            return srigl_update_shard(fw[i], fm[i], fg[i], 48, budget, 0.3, ablation, i, (rows, cols),
                                      ties, reduce)

        union = torch.zeros(rows * cols, dtype=torch.bool)
        for i, (sel, k) in zip(parts, ThreadRanks(world).run(rank)):
            union[i] = sel
            assert k == k_whole
        assert torch.equal(union, whole.reshape(-1)), (world, ablation, case)
        if ablation and case < 4:
            assert int((whole.sum(1) == 0).sum()) > 0  # the case does ablate rows


def test_nm_on_shards_cutting_groups_equals_the_whole_layer_rule():
    from dstlm.sparse import rules
    from dstlm.sparse.sharded import nm_update_shard

    gen = torch.Generator().manual_seed(2)
    rows, cols = 12, 16
    w = torch.randn(rows, cols, generator=gen).round(decimals=1)
    mask = rules.nm_mask(w, 2, 4, S.Ties(0))
    w = w * mask
    g = torch.randn(rows, cols, generator=gen).round(decimals=1)
    ties = S.Ties(1, "update", 7, "nm")
    whole = rules.nm_update(w, mask, g, 20, 2, 4, ties).reshape(-1)
    for world, contiguous in ((2, True), (3, True), (3, False)):
        parts = split(rows * cols, world, gen, contiguous)  # random cuts land inside groups of 4

        def rank(r, reduce, parts=parts):
            i = parts[r]
            return nm_update_shard(w.reshape(-1)[i], mask.reshape(-1)[i], g.reshape(-1)[i], 20, 2, 4, i,
                                   rows * cols, ties, reduce)

        union = torch.zeros(rows * cols, dtype=torch.bool)
        for i, sel in zip(parts, ThreadRanks(world).run(rank)):
            union[i] = sel
        assert torch.equal(union, whole), (world, contiguous)


@pytest.mark.parametrize("n", [8, 64, 1000, 3 * 2**20 + 8])
def test_bit_packing_round_trips_and_puts_bit_i_of_byte_j_at_entry_8j_plus_i(n):
    from dstlm.sparse.distributed import pack_bits, unpack_bits

    g = torch.Generator().manual_seed(n)
    m = -(-n // 8)
    bits = torch.zeros(8 * m, dtype=torch.uint8)
    bits[:n] = (torch.rand(n, generator=g) < 0.3).to(torch.uint8)
    bits[-1] = 1  # the last entry of the last byte (its top bit)
    packed = pack_bits(bits)
    expect = (bits.view(m, 8).to(torch.int64) << torch.arange(8)).sum(1)
    assert packed.dtype == torch.uint8 and torch.equal(packed.to(torch.int64), expect)
    assert torch.equal(unpack_bits(packed, 8 * m), bits.bool())
    assert torch.equal(pack_bits(bits[8:]), packed[1:])  # a slice starting mid-storage packs alike
    shifted = torch.zeros(8 * m + 3, dtype=torch.uint8)
    shifted[3:] = bits
    assert torch.equal(pack_bits(shifted[3:]), packed)  # ...also one not aligned to 8 bytes
