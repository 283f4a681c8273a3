"""dstlm/sparse/selectors.py: the collective selector's choices on shards equal the local selector's on the whole
layer, for any split of the layer over 1-4 ranks (simulated with threads), ties included, and over real gloo
ranks; and every rule of dstlm/sparse/rules.py, run through either selector, decides the same mask."""

from __future__ import annotations

import threading

import pytest
import torch

from dstlm.sparse import rules
from dstlm.sparse import selection as S
from dstlm.sparse.radix import Entries, order_bits
from dstlm.sparse.selectors import Selector, torch_all_reduce
from helpers.reference_selection import ReferenceSelector, reference_row_top_k, reference_top_k


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


def on_shard(index: torch.Tensor, shape, reduce) -> Selector:
    """The selector of one rank holding the entries of the [R, C] matrix `shape` at flat indices `index`."""
    return Selector(Entries.of(index, shape[1]), shape, reduce)


def float_order_bits(values: torch.Tensor) -> torch.Tensor:
    return order_bits(values, magnitude=False)


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
        whole = reference_top_k(score, k, ties).reshape(-1)
        parts = split(n, world, gen, contiguous)
        flat = score.reshape(-1)
        def rank(r, reduce, flat=flat, parts=parts, k=k, ties=ties, rows=rows, cols=cols):
            return on_shard(parts[r], (rows, cols), reduce).top(flat[parts[r]], k, ties)

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
    whole = reference_top_k(score, 333, ties, eligible=inactive).reshape(-1)
    parts = split(2000, 3, gen, contiguous=True)
    flat, elig = score.reshape(-1), inactive.reshape(-1)

    def rank(r, reduce):
        idx = parts[r][elig[parts[r]]]
        return idx, on_shard(idx, (40, 50), reduce).top(flat[idx], 333, ties)

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
    sel = on_shard(idx, tuple(score.shape), torch_all_reduce()).top(score.reshape(-1)[idx], k, S.Ties(11, "gloo"))
    out[idx] = sel.to(torch.uint8)
    dist.destroy_process_group()


def test_real_gloo_ranks_agree_with_the_whole_layer(tmp_path):
    import torch.multiprocessing as mp

    score = torch.randint(0, 50, (64, 48), generator=torch.Generator().manual_seed(5)).float()
    out = torch.zeros(score.numel(), dtype=torch.uint8).share_memory_()
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "rdzv"), score, 700, out), nprocs=2, join=True)
    assert torch.equal(out.bool(), reference_top_k(score, 700, S.Ties(11, "gloo")).reshape(-1))


def union_of_ranks(world: int, parts: list[torch.Tensor], decide, n: int) -> torch.Tensor:
    """Each rank decides its entries (`decide(select, index)` -> bool over them); their union, flat."""
    union = torch.zeros(n, dtype=torch.bool)
    for i, sel in zip(parts, ThreadRanks(world).run(lambda r, reduce: decide(reduce, parts[r]))):
        union[i] = sel
    return union


@pytest.mark.parametrize("rule", ["rigl", "set", "gmp"])
@pytest.mark.parametrize("world", [2, 4])
def test_rules_on_shards_equal_the_whole_layer_rules(rule, world):
    gen = torch.Generator().manual_seed(world)
    rows, cols = 24, 40
    for case in range(6):
        mask = rules.random_mask((rows, cols), 300, S.Ties(case, "init"))
        w = torch.randn(rows, cols, generator=gen).round(decimals=1) * mask  # rounded: ties in |W|
        g = torch.randn(rows, cols, generator=gen).round(decimals=1)
        ties = S.Ties(case, "update", 100, "layer")

        def decide(select, w, mask, g, ties=ties):
            if rule == "gmp":
                return rules.gmp_prune(select, w, mask, 200, ties)
            return rules.drop_and_grow(select, w, mask, g if rule == "rigl" else None, 90, ties)

        whole = decide(ReferenceSelector((rows, cols)), w, mask, g).reshape(-1)
        fw, fm, fg = w.reshape(-1), mask.reshape(-1), g.reshape(-1)
        union = union_of_ranks(world, split(rows * cols, world, gen, contiguous=case % 2 == 0),
                               lambda reduce, i, fw=fw, fm=fm, fg=fg: decide(on_shard(i, (rows, cols), reduce),
                                                                             fw[i], fm[i], fg[i]),
                               rows * cols)
        assert torch.equal(union, whole), (rule, world, case)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_row_top_k_on_shards_cutting_rows_equals_the_whole_layer(world):
    gen = torch.Generator().manual_seed(40 + world)
    for case in range(10):
        rows, cols = (int(v) for v in torch.randint(1, 20, (2,), generator=gen))
        score = torch.randint(0, [1, 3, 100][case % 3], (rows, cols), generator=gen).float()
        k = torch.randint(0, cols + 2, (rows,), generator=gen)
        ties = S.Ties(case, "rows")
        whole = reference_row_top_k(score, k, ties).reshape(-1)
        assert torch.equal(ReferenceSelector((rows, cols)).row_top(score, k, ties).reshape(-1), whole)
        parts = split(rows * cols, world, gen, contiguous=case % 2 == 0)
        flat = score.reshape(-1)
        union = union_of_ranks(world, parts, lambda reduce, i, shape=(rows, cols), flat=flat, k=k, ties=ties: on_shard(
            i, shape, reduce).row_top(flat[i], k, ties), rows * cols)
        assert torch.equal(union, whole), (world, case)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("ablation", [True, False])
def test_srigl_on_shards_equals_the_whole_layer_rule(world, ablation):
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
        reference = ReferenceSelector((rows, cols))
        whole, k_whole = rules.srigl_update(reference, w, mask, g, 48, budget, 0.3, ablation, ties)
        fw, fm, fg = w.reshape(-1), mask.reshape(-1), g.reshape(-1)
        fan_ins = []

        def decide(reduce, i, fw=fw, fm=fm, fg=fg, ties=ties, budget=budget, fan_ins=fan_ins):
            new, k = rules.srigl_update(on_shard(i, (rows, cols), reduce), fw[i], fm[i], fg[i], 48, budget, 0.3,
                                        ablation, ties)
            fan_ins.append(k)
            return new

        union = union_of_ranks(world, split(rows * cols, world, gen, contiguous=case % 2 == 0), decide, rows * cols)
        assert fan_ins == [k_whole] * world
        assert torch.equal(union, whole.reshape(-1)), (world, ablation, case)
        if ablation and case < 4:
            assert int((whole.sum(1) == 0).sum()) > 0  # the case does ablate rows


def test_nm_on_shards_cutting_groups_equals_the_whole_layer_rule():
    gen = torch.Generator().manual_seed(2)
    rows, cols = 12, 16
    w = torch.randn(rows, cols, generator=gen).round(decimals=1)
    mask = rules.nm_mask(ReferenceSelector((rows, cols)), w, 2, 4, S.Ties(0))
    w = w * mask
    g = torch.randn(rows, cols, generator=gen).round(decimals=1)
    ties = S.Ties(1, "update", 7, "nm")
    whole = rules.nm_update(ReferenceSelector((rows, cols)), w, mask, g, 20, 2, 4, ties).reshape(-1)
    fw, fm, fg = w.reshape(-1), mask.reshape(-1), g.reshape(-1)
    for world, contiguous in ((2, True), (3, True), (3, False)):
        parts = split(rows * cols, world, gen, contiguous)  # random cuts land inside groups of 4
        union = union_of_ranks(world, parts, lambda reduce, i: rules.nm_update(
            on_shard(i, (rows, cols), reduce), fw[i], fm[i], fg[i], 20, 2, 4, ties), rows * cols)
        assert torch.equal(union, whole), (world, contiguous)
        first = union_of_ranks(world, parts, lambda reduce, i: rules.nm_mask(
            on_shard(i, (rows, cols), reduce), fw[i], 2, 4, S.Ties(0)), rows * cols)
        assert torch.equal(first, mask.reshape(-1)), (world, contiguous)


def test_reclaim_ranks_dead_rows_last_on_shards_and_whole():
    gen = torch.Generator().manual_seed(9)
    rows, cols = 10, 12
    new = torch.rand(rows, cols, generator=gen) < 0.3
    score = torch.randint(0, 3, (rows, cols), generator=gen).float()
    dead = torch.zeros(rows, dtype=torch.bool)
    dead[[1, 4]] = True
    ties = S.Ties(3, "reclaim")
    free = int((~new & ~dead[:, None]).sum())
    for k in (5, free + 4):  # all from live rows; then more than they have: dead rows take the rest
        whole = rules.reclaim(ReferenceSelector((rows, cols)), new.clone(), score, dead, k, ties)
        assert int(whole.sum()) == int(new.sum()) + k
        grown_dead = int((whole & ~new & dead[:, None]).sum())
        assert grown_dead == max(0, k - free), (k, grown_dead)
        for world in (2, 3):
            parts = split(rows * cols, world, gen, contiguous=True)
            union = union_of_ranks(world, parts, lambda reduce, i, k=k: rules.reclaim(
                on_shard(i, (rows, cols), reduce), new.reshape(-1)[i].clone(), score.reshape(-1)[i], dead, k, ties),
                rows * cols)
            assert torch.equal(union, whole.reshape(-1)), (k, world)


@pytest.mark.parametrize("n", [8, 64, 1000, 3 * 2**20 + 8])
def test_bit_packing_round_trips_and_puts_bit_i_of_byte_j_at_entry_8j_plus_i(n):
    from dstlm.sparse.bits import pack_bits, unpack_bits

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
