"""The engine deciding masks on shards (SparseEngine on more than one rank) equals the engine deciding whole
on one rank, bit for bit, for every rule: ranks simulated by threads, each with its own replica of the
model and a backend that either splits every parameter evenly (shard_by="entries", as ZeRO's partitions:
cuts fall inside rows, inside N:M groups and between the matrices of a batched expert weight) or gives each
parameter to one owner (shard_by="owner", DDP's default). Weights and gradients are quantised to a few levels, so
ties in |W| and in the score are everywhere and the keyed tie-break decides them. Real multi-process runs
(DDP, ZeRO-2, ZeRO-3 at 2 and 4 ranks) are in tests/test_dist.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dstlm.sparse import SparsityConfig, TorchBackend
from dstlm.sparse.engine import MaskMismatchError, SparseEngine
from dstlm.sparse.methods import RigL
from helpers.reference_selection import check_decisions
from test_selectors import ThreadRanks


class Toy(nn.Module):
    """A producer/consumer pair (a unit link) and a batched [3, 8, 10] weight of three sparse matrices."""

    batched_params = ("experts",)

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 20, bias=False)  # cuts at 240 / 3, / 4 fall inside rows
        self.b = nn.Linear(20, 12, bias=False)
        self.experts = nn.Parameter(torch.zeros(3, 8, 12))

    def unit_links(self):
        return [("a.weight", "b.weight")]


def quantised(gen: torch.Generator, shape, levels: int) -> torch.Tensor:
    return (torch.randint(-levels, levels + 1, shape, generator=gen) * 0.125).float()


class ThreadBackend(TorchBackend):
    """TorchBackend of one of `world` replicas, with the threads' all-reduce."""

    def __init__(self, world: int, rank: int, reduce, shard_by: str = "entries") -> None:
        super().__init__(optimizer=None, grads_synced=True, shard_by=shard_by)
        self._world, self._rank, self._reduce = world, rank, reduce

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def rank(self) -> int:
        return self._rank

    def all_reduce_sum_(self, tensor):
        return self._reduce(tensor) if self._world > 1 else tensor


def run(method: str, world: int, rank: int, reduce, steps: int = 8, method_class=None, check=False,
        shard_by: str = "entries", partition: bool = False, **kw):
    """Train-like loop on quantised weights and gradients (the same on every replica); masks after each update.
    `partition`: sparsity.partition_masks, each rank keeping only its fragment of every mask (as under ZeRO-3,
    it then masks only its fragment of the replica's weights, gradients and state: the rest is never read)."""
    torch.manual_seed(0)
    model = Toy()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(quantised(gen, p.shape, 6))
    extra = {"sparsity": 0.8} if method != "nm" else {}
    cfg = SparsityConfig(method=method, delta_t=2, t_end=steps, include=["*"], distribution="uniform",
                         drop_fraction=0.4, partition_masks=partition, **{**extra, **kw})
    engine = SparseEngine(model, cfg, seed=3, max_steps=steps)
    if method_class is not None:
        engine.method = engine.decider.method = method_class(cfg)
    if check:
        check_decisions(engine)
    backend = ThreadBackend(world, rank, reduce, shard_by)
    if partition:
        engine.partition(backend)
    masks, sharded = [], []
    for t in range(1, steps + 1):
        for p in model.parameters():
            p.grad = quantised(gen, p.shape, 3)
        engine.before_optimizer_step(t, backend)
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(p.grad * 0.125)  # stays on the 1/64 grid: |W| keeps ties
        stats = engine.after_optimizer_step(t, backend)
        if stats is not None:
            masks.append({name: m.clone() for name, m in engine.whole_masks().items()})
            sharded.append(stats["sharded"])
            assert engine.verify(backend) == []
    return masks, sharded


RECLAIM = {"reclaim_dead_units": True, "sparsity": 0.9}
CASES = [("set", {}), ("rigl", {}), ("srigl", {}), ("srigl", {"ablation": False}), ("gmp", {}), ("nm", {}),
         ("rigl", RECLAIM), ("set", RECLAIM), ("srigl", RECLAIM)]
IDS = [m + "".join(f"-{k}={v}" for k, v in kw.items()) for m, kw in CASES]


@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
@pytest.mark.parametrize("world,shard_by", [(2, "entries"), (3, "entries"), (4, "entries"), (2, "owner"),
                                            (3, "owner")])
def test_masks_decided_on_shards_equal_the_whole_decision(method, kw, world, shard_by):
    whole, sharded_flags = run(method, 1, 0, None, **kw)
    assert len(whole) >= 3 and sharded_flags == [0.0] * len(whole)
    got = ThreadRanks(world).run(lambda r, reduce: run(method, world, r, reduce, shard_by=shard_by, **kw))
    for rank, (masks, flags) in enumerate(got):
        assert flags == [1.0] * len(whole)
        for i, (a, b) in enumerate(zip(masks, whole)):
            for name in b:
                assert torch.equal(a[name], b[name]), (rank, i, name)
    changed = any(not torch.equal(whole[0][n], whole[-1][n]) for n in whole[0])
    assert changed  # the masks did move


def test_a_method_of_one_class_decides_alike_whole_on_shards_and_partitioned():
    """A user's method (tests/helpers/custom_method.py: one registered class of 12 lines, no code about where
    the entries live) gives the same masks after every update in one process, on 2 replicas deciding by owner
    (DDP's default) and by entries, and on 2 ranks holding partitioned masks (ZeRO-3's default); the real
    multi-process runs are in tests/test_dist.py."""
    from helpers.custom_method import SaliencyRigL
    from dstlm.sparse.methods import METHODS, register

    register(SaliencyRigL)  # (again, if this worker imported it before: the registry is left as it was found)
    try:
        whole, _ = run("test-saliency", 1, 0, None)
        assert len(whole) >= 3 and any(not torch.equal(whole[0][n], whole[-1][n]) for n in whole[0])
        for kw in (dict(shard_by="owner"), dict(shard_by="entries"), dict(partition=True)):
            got = ThreadRanks(2).run(lambda r, reduce, kw=kw: run("test-saliency", 2, r, reduce, **kw))
            for rank, (masks, flags) in enumerate(got):
                assert flags == [1.0] * len(whole), kw
                for i, (a, b) in enumerate(zip(masks, whole)):
                    for name in b:
                        assert torch.equal(a[name], b[name]), (kw, rank, i, name)
    finally:
        METHODS.pop("test-saliency", None)


@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partitioned_masks_equal_the_whole_decision(method, kw, world):
    """sparsity.partition_masks: each rank holds, decides and masks only its fragment of every mask (cuts inside
    rows, N:M groups and between a batched weight's matrices), and reads only counts of the rest; after every
    update the fragments joined equal the whole-mask run's masks, with the keyed tie-break deciding the ties.
    (Each replica here masks only its fragment, so its weights elsewhere are not the model's: no rank may read
    them, and the gathered-weight reference check is left to the real ZeRO-3 runs of tests/test_dist.py.)"""
    whole, _ = run(method, 1, 0, None, **kw)
    got = ThreadRanks(world).run(lambda r, reduce: run(method, world, r, reduce, partition=True, **kw))
    for rank, (masks, flags) in enumerate(got):
        assert flags == [1.0] * len(whole)  # the sharded rules, on one rank too
        for i, (a, b) in enumerate(zip(masks, whole)):
            for name in b:
                assert torch.equal(a[name], b[name]), (rank, i, name)


@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_partitioned_masks_equal_the_whole_decision_when_read_in_small_blocks(method, kw):
    """The sharded rules read each fragment a block at a time (dstlm/sparse/radix.py); with blocks of 5 entries
    every pass crosses block edges inside rows and N:M groups, and the rounds keep streaming: the masks are
    still the whole-mask run's after every update."""
    from dstlm.sparse.radix import block_size

    whole, _ = run(method, 1, 0, None, **kw)
    with block_size(5):
        got = ThreadRanks(3).run(lambda r, reduce: run(method, 3, r, reduce, partition=True, **kw))
    for rank, (masks, _) in enumerate(got):
        for i, (a, b) in enumerate(zip(masks, whole)):
            for name in b:
                assert torch.equal(a[name], b[name]), (rank, i, name)


def test_partitioned_engine_holds_fragments_only():
    """After `partition`, no whole mask is left on a rank: the buffers are empty placeholders, the fragments of
    the ranks tile every parameter once, and the statistics (density, census, spread) equal the whole run's."""
    def body(rank, reduce):
        torch.manual_seed(0)
        model = Toy()
        cfg = SparsityConfig(method="rigl", sparsity=0.8, include=["*"], distribution="uniform",
                             partition_masks=True)
        engine = SparseEngine(model, cfg, seed=3, max_steps=8)
        whole = {"density": engine.density(), "census": engine.census(), "spread": engine.spread()}
        engine.partition(ThreadBackend(3, rank, reduce))
        assert all(b.numel() == 0 for n, b in model.named_buffers() if n.endswith("_mask"))
        got = {"density": engine.density(), "census": engine.census(), "spread": engine.spread()}
        return whole, got, {k: (f.start, f.length, f.numel) for k, f in engine.fragments.items()}

    results = ThreadRanks(3).run(body)
    for whole, got, _ in results:
        assert whole == got
    for key in results[0][2]:
        runs = sorted(r[2][key] for r in results)
        assert runs[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(runs, runs[1:]))
        assert runs[-1][0] + runs[-1][1] == runs[0][2]


def test_reclaim_case_has_dead_units_to_act_on():
    torch.manual_seed(0)
    masks, _ = run("rigl", 1, 0, None, reclaim_dead_units=True, sparsity=0.9)
    from dstlm.sparse.connectivity import dead_units

    assert any(int(dead_units(m["a.weight"], m["b.weight"]).sum()) > 0 for m in masks[:-1])


class BrokenRigL(RigL):
    """RigL that gets one entry wrong on each rank when it decides on shards."""

    def update(self, layer, shard, n_swap, t, schedule, ties):
        new = super().update(layer, shard, n_swap, t, schedule, ties)
        if shard.mask.dim() == 1 and new.numel():  # a fragment: decided on shards
            new[0] = ~new[0]
        return new


def test_check_reference_catches_a_wrong_sharded_rule():
    with pytest.raises(MaskMismatchError, match="differs from the whole-tensor reference"):
        ThreadRanks(2).run(lambda r, reduce: run("rigl", 2, r, reduce, method_class=BrokenRigL, check=True))
    # and passes the right one
    ThreadRanks(2).run(lambda r, reduce: run("rigl", 2, r, reduce, check=True))


def test_owners_balance_the_parameters():
    model = Toy()
    backend = ThreadBackend(2, 0, None, "owner")
    params = [model.a.weight, model.b.weight, model.experts]  # 240, 240 and 288 entries
    backend.plan(params)
    owners = [backend._owner[id(p)] for p in params]
    assert owners == [1, 1, 0]  # largest first to rank 0, then each to the least loaded (ties: the lower rank)
    assert backend.fragment(model.experts) == (0, 288) and backend.fragment(model.a.weight) == (0, 0)
