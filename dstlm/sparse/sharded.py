"""The mask rules decided on shards: each rank decides the entries of the layer it holds, and over the ranks
the union equals the whole-layer rule of rules.py, in the same total order (value desc, then the keyed hash of
the entry's flat index in the layer desc).

Each rank holds some entries of the layer (any split: ZeRO's flat partitions cut rows anywhere), described by
`Entries` (a contiguous run, a run of a transposed storage, or explicit indices). Layer-wide selections (the
keep by |W|, the grow by |grad|) are `radix.radix_select` over the whole layer: 3 small all-reduces (6 when the
threshold is tied) whatever its size. Per-row selections (SRigL's fan-in, N:M's groups) decide every row whose
eligible entries are all on one rank there alone, with `selection.row_top_k`, a block of whole rows at a time;
only the rows cut between ranks (at most the first and the last of a contiguous run) go through radix rounds,
on [cut rows, 256] histograms.

Memory: nothing of the rank's fragment is copied whole. Values, eligibility and indices are read a block at a
time, so besides the new mask (one byte per entry, the buffer the rule writes into) a rule's working set is a
few tens of bytes per entry of one block (`radix.block_size`). Explicit and transposed entries
(tests; Hugging Face Conv1D weights) take a per-row path that compacts the rank's own rows whole.

`all_reduce` is any in-place sum over the ranks (torch.distributed.all_reduce over a process group, or an
identity on one process), so the module imports no distributed framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from dstlm.sparse.radix import (ROW_DIGITS, Eligible, Entries, Source, block, blocks, emit_choice, inside, order_bits,
                                outside, radix_select)
from dstlm.sparse.rules import srigl_keep_is_salient, srigl_survivors
from dstlm.sparse.selection import Ties, row_top_k

AllReduce = Callable[[torch.Tensor], torch.Tensor]
Index = Union[torch.Tensor, Entries]


def single_process(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Shard:
    """One rank's part of one sparse [R, C] matrix: the entries it decides, as 1-D tensors over the same
    positions (any subset of the matrix; ZeRO's flat partitions cut rows anywhere), and the reduction that
    joins the ranks deciding the other parts."""

    weight: torch.Tensor
    """Weight values (fp32 master where one exists)."""
    mask: torch.Tensor
    """bool: the current mask at these entries."""
    score: Optional[torch.Tensor]
    """|dense gradient| accumulated over the score window (None for methods that read no gradient)."""
    entries: Entries
    """Each entry's flat index in the [R, C] matrix, made on demand (row = index // C)."""
    all_reduce: AllReduce = single_process

    def count(self, sel: torch.Tensor) -> int:
        """Entries selected by `sel` (bool over this shard's entries) over all ranks."""
        return _global_count(sel, self.all_reduce)


def torch_all_reduce(group=None) -> AllReduce:
    """An in-place SUM all-reduce over `group` (the default process group when None)."""
    import torch.distributed as dist

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return reduce


def float_order_bits(values: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32), increasing with the float32 value (the IEEE bits, sign-folded; -0.0 as +0.0)."""
    return order_bits(values, magnitude=False)


def _global_count(mask: torch.Tensor, all_reduce: AllReduce) -> int:
    return int(all_reduce(torch.count_nonzero(mask).reshape(1).to(torch.int64)).item())


def select_top(src: Source, entries: Entries, k: int, ties: Ties, all_reduce: AllReduce,
               out: Union[torch.Tensor, Callable], total: Optional[int] = None) -> None:
    """out |= this rank's part of the k first eligible entries of the layer (over all ranks) in (value desc,
    hash desc) order (`out` a function: called with each block's choice, as radix_select does). `total`: the
    eligible entries over all ranks, when the caller knows it (k = 0 or all of them then need no pass)."""
    if total is not None:
        k = max(0, min(int(k), int(total)))
        if k == 0:
            return
        if k == total:
            for a, b in blocks([(0, entries.n)], entries.device):
                ok = src.ok(a, b)
                ok = torch.ones(b - a, dtype=torch.bool, device=entries.device) if ok is None else ok
                if callable(out):
                    out(a, b, ok)
                else:
                    out[a:b] |= ok
            return
    radix_select(src, entries, torch.tensor([max(0, int(k))]), ties, all_reduce, out)


def sharded_top_k(values: torch.Tensor, index: Index, k: int, ties: Ties,
                  all_reduce: AllReduce = single_process, total: Optional[int] = None,
                  eligible: Optional[torch.Tensor] = None, nonnegative: bool = False) -> torch.Tensor:
    """bool per local entry: whether it is among the k first entries of the whole layer in (value desc, hash of
    index desc) order, where the layer's entries are the union of every rank's (values, index) — only the
    `eligible` ones (bool per entry) when given. `total`: the number of (eligible) entries over all ranks, if
    known. `nonnegative`: the values are >= 0 (|W|, |grad|), ordered by their magnitude bits."""
    entries = Entries.of(index)
    out = torch.zeros(entries.n, dtype=torch.bool, device=values.device)
    src = Source(values, magnitude=nonnegative, eligible=None if eligible is None else inside(eligible))
    select_top(src, entries, k, ties, all_reduce, out, total)
    return out


# -- rules on shards: each equal, over the union of the ranks' entries, to its whole-layer form in rules.py --


def keep_largest_shard(weight: torch.Tensor, mask: torch.Tensor, index: Index, n_keep: int, ties: Ties,
                       all_reduce: AllReduce, nnz: Optional[int] = None) -> torch.Tensor:
    """rules.keep_largest on a shard: the n_keep largest |W| (over all ranks) among the active entries."""
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    nnz = _global_count(mask, all_reduce) if nnz is None else nnz
    select_top(Source(weight, True, inside(mask)), Entries.of(index), n_keep, ties.sub("keep"), all_reduce, out,
               total=nnz)
    return out.view(mask.shape)


def grow_top_shard(mask: torch.Tensor, score: Union[torch.Tensor, Source, None], index: Index, k: int, ties: Ties,
                   all_reduce: AllReduce, nonnegative: bool = False,
                   n_eligible: Optional[int] = None) -> torch.Tensor:
    """rules.grow_top on a shard: `mask` plus the k highest scores (over all ranks) outside it (`score` a
    Source: its own order). `n_eligible`: the entries outside the mask over all ranks, if known."""
    out = mask.reshape(-1).clone()
    src = score if isinstance(score, Source) else Source(score, nonnegative, outside(mask))
    select_top(src, Entries.of(index), k, ties.sub("grow"), all_reduce, out, total=n_eligible)
    return out.view(mask.shape)


def drop_and_grow_shard(weight: torch.Tensor, mask: torch.Tensor, score: Optional[torch.Tensor], n_swap: int,
                        index: Index, ties: Ties, all_reduce: AllReduce,
                        numel: Optional[int] = None) -> torch.Tensor:
    """RigL (score = |dense gradient|) or SET (score None: random growth) on a shard; `n_swap` is the layer's
    (the same on every rank), `numel` its size if known. Equal over the union of shards to
    rules.rigl_update / rules.set_update. The keep is written into the new mask and the grow into the same
    buffer (its complement is what may grow): one byte per entry besides the blocks' working set."""
    entries = Entries.of(index)
    nnz = _global_count(mask, all_reduce)
    n_keep = nnz - min(n_swap, nnz)
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    select_top(Source(weight, True, inside(mask)), entries, n_keep, ties.sub("keep"), all_reduce, out, total=nnz)
    select_top(Source(score, True, outside(out)), entries, nnz - n_keep, ties.sub("grow"), all_reduce, out,
               total=None if numel is None else numel - n_keep)
    return out.view(mask.shape)


def gmp_prune_shard(weight: torch.Tensor, mask: torch.Tensor, n_keep: int, index: Index, ties: Ties,
                    all_reduce: AllReduce) -> torch.Tensor:
    """rules.gmp_prune on a shard: keep the layer's n_keep largest |W| among active entries."""
    nnz = _global_count(mask, all_reduce)
    return keep_largest_shard(weight, mask, index, min(n_keep, nnz), ties, all_reduce, nnz=nnz)


# -- per-row selections (SRigL's constant fan-in, N:M's groups) when a shard cuts rows anywhere ------------


def row_counts_shard(eligible: Eligible, entries: Entries, n_rows: int, all_reduce: AllReduce,
                     local_only: bool = False) -> torch.Tensor:
    """int64 [n_rows]: the entries `eligible` selects in each row (of entries.row_len), over all ranks (this
    rank's alone with local_only), counted a block at a time."""
    counts = torch.zeros(n_rows, dtype=torch.int64, device=entries.device)
    for a, b in blocks([(0, entries.n)], entries.device):
        entries.add_row_counts(counts, eligible(a, b), a, b)
    return counts if local_only else all_reduce(counts)


def select_rows(src: Source, entries: Entries, k: torch.Tensor, n_rows: int, ties: Ties, all_reduce: AllReduce,
                out: torch.Tensor, assign: bool = False) -> None:
    """In every row r over all ranks, the k[r] first eligible entries in (value desc, hash of the flat index
    desc) order, written into `out` as radix_select does (out |= chosen; with `assign`, out = chosen at the
    eligible entries). Rows whose eligible entries are all on this rank are decided here alone
    (selection.row_top_k); the rows cut between ranks by radix rounds over those rows only. Collective: every
    rank calls it with the same k."""
    cols = entries.row_len
    local = row_counts_shard(lambda a, b: src.ok(a, b), entries, n_rows, all_reduce, local_only=True)
    per_row = all_reduce(local.clone())
    k = torch.minimum(k.to(device=local.device, dtype=torch.int64), per_row)
    shared = all_reduce(((local > 0) & (local < per_row)).to(torch.int64)) > 0  # the same on every rank
    own_k = torch.where(shared, 0, k)
    if entries.run is not None:
        spans = _own_rows_of_run(src, entries, own_k, cols, ties, out, assign, shared)
    else:
        _own_rows_compacted(src, entries, own_k, shared, cols, ties, out, assign)
        spans = None
    shared_ids = shared.nonzero().squeeze(1)
    if shared_ids.numel():
        slot = torch.full((n_rows,), -1, dtype=torch.int64, device=local.device)
        slot[shared_ids] = torch.arange(shared_ids.numel(), device=local.device)
        radix_select(src, entries, k[shared_ids], ties, all_reduce, out, spans=spans,
                     segment=lambda a, b: entries.per_row(slot, a, b), n_seg=shared_ids.numel(), digits=ROW_DIGITS,
                     assign=assign)


def _own_rows_of_run(src: Source, entries: Entries, k: torch.Tensor, cols: int, ties: Ties, out: torch.Tensor,
                     assign: bool, shared: torch.Tensor) -> list[tuple[int, int]]:
    """select_rows' rows held whole here, for a contiguous run: blocks of whole rows read in place (the first
    and the last row padded when the run cuts them). Returns the local spans of the rows cut between ranks."""
    n, start, dev = entries.n, entries.run, out.device
    if n == 0:
        return []
    first, last = start // cols, (start + n - 1) // cols
    per_block = max(1, block(dev) // cols)
    for r0 in range(first, last + 1, per_block):
        r1 = min(last + 1, r0 + per_block)
        kk = k[r0:r1]
        a, b = max(0, r0 * cols - start), min(n, r1 * cols - start)
        if not bool((kk > 0).any()):  # nothing chosen in these rows: with `assign` their eligible entries clear
            if assign:
                ok = src.ok(a, b)
                clear = ~shared[r0:r1].repeat_interleave(cols)[a - (r0 * cols - start):][:b - a]
                out[a:b] &= ~clear if ok is None else ~(ok & clear)
            continue
        pad = a - (r0 * cols - start)
        values, ok = src.floats(a, b, dev), src.ok(a, b)
        if pad or b - a != (r1 - r0) * cols:  # a row the run cuts: padded with ineligible entries
            dense = torch.zeros((r1 - r0) * cols, device=dev)
            dense[pad:pad + b - a] = values
            okd = torch.zeros((r1 - r0) * cols, dtype=torch.bool, device=dev)
            okd[pad:pad + b - a] = True if ok is None else ok
            values, okp = dense, okd
        else:
            okp = ok
        sel = row_top_k(values.view(r1 - r0, cols), kk, ties, eligible=None if okp is None else okp.view(r1 - r0, cols),
                        row_ids=torch.arange(r0, r1, device=dev)).reshape(-1)[pad:pad + b - a]
        if assign:  # rows cut between ranks are assigned by the collective pass, not here
            in_shared = shared[r0:r1].repeat_interleave(cols)[pad:pad + b - a]
            ok = ~in_shared if ok is None else ok & ~in_shared
        emit_choice(out, a, b, sel, ok, assign)
    spans = []
    if bool(shared[first]):
        spans.append((0, min(n, (first + 1) * cols - start)))
    if last > first and bool(shared[last]):
        spans.append((last * cols - start, n))
    return spans


def _own_rows_compacted(src: Source, entries: Entries, k: torch.Tensor, shared: torch.Tensor, cols: int,
                        ties: Ties, out: torch.Tensor, assign: bool) -> None:
    """select_rows' rows held whole here, for entries that are not a contiguous run (explicit indices, a
    transposed storage): the rank's eligible entries of those rows compacted into a dense table (O(entries))."""
    n, dev = entries.n, out.device
    if n == 0 or (not assign and not bool(((k > 0) & ~shared).any())):
        return
    ok = src.ok(0, n)
    index = entries.all()
    rows = index // cols
    own = ~shared[rows] if assign else (k[rows] > 0) & ~shared[rows]
    idx = (own if ok is None else own & ok).nonzero().squeeze(1)
    if not idx.numel():
        return
    r, c = rows[idx], index[idx] % cols
    r0 = int(r.min())
    dense = torch.zeros(int(r.max()) + 1 - r0, cols, device=dev)
    okd = torch.zeros(dense.shape, dtype=torch.bool, device=dev)
    dense[r - r0, c] = src.floats(0, n, dev)[idx]
    okd[r - r0, c] = True
    sel = row_top_k(dense, k[r0:r0 + dense.shape[0]], ties, eligible=okd,
                    row_ids=torch.arange(r0, r0 + dense.shape[0], device=dev))
    if assign:
        out[idx] = sel[r - r0, c]
    else:
        out[idx] |= sel[r - r0, c]


def sharded_row_top_k(values: torch.Tensor, index: Index, k: torch.Tensor, n_rows: int, cols: int,
                      ties: Ties, all_reduce: AllReduce = single_process,
                      eligible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool per local entry: among the (eligible) entries of its row over all ranks, whether it is one of the
    k[row] first in (value desc, hash of index desc) order: selection.row_top_k when the layer's rows are cut
    across ranks. `index`: each entry's flat index in the [n_rows, cols] layer (a tensor or Entries)."""
    entries = Entries.of(index, cols) if not isinstance(index, Entries) else index
    out = torch.zeros(entries.n, dtype=torch.bool, device=values.device)
    src = Source(values, magnitude=False, eligible=None if eligible is None else inside(eligible))
    select_rows(src, entries, k, n_rows, ties, all_reduce, out)
    return out


class _Ranked(Source):
    """|score| order with the entries of some rows ranked below every other (dead rows: grown last)."""

    def __init__(self, score: Optional[torch.Tensor], last: torch.Tensor, eligible: Eligible) -> None:
        super().__init__(score, True, eligible)
        self.last, self.constant = last.reshape(-1), False

    def keys(self, a: int, b: int) -> torch.Tensor:
        base = torch.zeros(b - a, dtype=torch.int32, device=self.last.device) if self.values is None \
            else super().keys(a, b)  # magnitude keys: >= 0
        return torch.where(self.last[a:b], -1, base)


def reclaim_shard(new: torch.Tensor, score: Optional[torch.Tensor], in_dead: torch.Tensor, k: int,
                  entries: Entries, ties: Ties, all_reduce: AllReduce) -> torch.Tensor:
    """`new` plus the k entries outside it ranked first by |score| (equal scores when None), entries of dead
    rows (`in_dead`) only after every other: the dead-row reclaim of DSTMethod.update_layer on a shard."""
    return grow_top_shard(new, _Ranked(score, in_dead, outside(new)), entries, k, ties, all_reduce)


def rows_in(rows: torch.Tensor, entries: Entries) -> torch.Tensor:
    """bool per entry: whether its row is marked in `rows` (bool [R])."""
    out = torch.zeros(entries.n, dtype=torch.bool, device=entries.device)
    rows = rows.to(entries.device)
    for a, b in blocks([(0, entries.n)], entries.device):
        out[a:b] = entries.per_row(rows, a, b)
    return out


def srigl_update_shard(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int, budget: int,
                       gamma_sal: float, allow_ablation: bool, index: Index, shape: tuple[int, int], ties: Ties,
                       all_reduce: AllReduce, force_ablate: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """rules.srigl_update on a shard (entries with their flat index in the [R, C] layer `shape`): the same
    steps with layer-wide selections by radix_select, per-row ones by select_rows and row counts all-reduced;
    over the union of the ranks equal to the whole-layer rule. Returns (mask, k). The kept and grown entries
    go into one new buffer; the step-1 saliency of the gradient is counted per row, never stored."""
    n_rows, cols = shape
    entries = Entries.of(index, cols) if not isinstance(index, Entries) else index
    weight, mask, grad = weight.reshape(-1), mask.reshape(-1), grad.reshape(-1)
    dev = mask.device

    def counts_of(elig: Eligible) -> torch.Tensor:
        return row_counts_shard(elig, entries, n_rows, all_reduce)

    row_nnz = counts_of(inside(mask))
    active_rows = row_nnz > 0
    n_active_rows = int(active_rows.sum())
    nnz = int(row_nnz.sum())
    n_swap = min(n_swap, nnz)
    kept = torch.zeros(entries.n, dtype=torch.bool, device=dev)
    counts = None
    if allow_ablation and n_active_rows > 0:
        select_top(Source(weight, True, inside(mask)), entries, nnz - n_swap, ties.sub("keep"), all_reduce, kept,
                   total=nnz)  # step 4's keep when nothing is ablated
        salient_g = torch.zeros(n_rows, dtype=torch.int64, device=dev)  # per row, counted as chosen: not stored
        select_top(Source(grad, True, outside(mask)), entries, n_swap, ties.sub("salient-g"), all_reduce,
                   lambda a, b, chosen: entries.add_row_counts(salient_g, chosen, a, b), total=n_rows * cols - nnz)
        counts = counts_of(inside(kept)) + all_reduce(salient_g)  # disjoint: inside and outside the mask
    survivors, k = srigl_survivors(active_rows, counts, budget, cols, gamma_sal, force_ablate)
    n_surv = int(survivors.sum())
    keep_total = max(0, k * n_surv - n_swap)
    if counts is None or not srigl_keep_is_salient(keep_total, nnz, n_swap, survivors, active_rows):
        kept.zero_()  # decided alike on every rank (all-reduced counts): the collectives stay in step
        surv = survivors.to(dev)
        select_top(Source(weight, True, lambda a, b: mask[a:b] & entries.per_row(surv, a, b)), entries, keep_total,
                   ties.sub("keep"), all_reduce, kept, total=int(row_nnz[survivors].sum()))
    kept_rows = counts_of(inside(kept))
    over = kept_rows > k
    if bool(over.any()):  # the same on every rank (all-reduced counts): the collective trim runs on all or none
        over_d = over.to(dev)
        k_rows = torch.where(over, k, 0)
        select_rows(Source(weight, True, lambda a, b: kept[a:b] & entries.per_row(over_d, a, b)), entries, k_rows,
                    n_rows, ties.sub("trim"), all_reduce, kept, assign=True)
        kept_rows = torch.where(over, k, kept_rows)
    deficit = (k - kept_rows) * survivors
    select_rows(Source(grad, True, outside(kept)), entries, deficit, n_rows, ties.sub("grow"), all_reduce, kept)
    return kept.view(mask.shape), k


def nm_update_shard(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int, n: int, m: int,
                    index: Index, numel: int, ties: Ties, all_reduce: AllReduce) -> torch.Tensor:
    """rules.nm_update on a shard: groups are m consecutive flat entries (a cut may split one group across
    ranks); drop by |W| layer-wide, refill every group to n by |grad|."""
    weight, mask, grad = weight.reshape(-1), mask.reshape(-1), grad.reshape(-1)
    entries = Entries.of(index).grouped(m)
    nnz = _global_count(mask, all_reduce)
    kept = keep_largest_shard(weight, mask, entries, nnz - min(n_swap, nnz), ties, all_reduce, nnz=nnz).reshape(-1)
    n_groups = numel // m
    deficit = n - row_counts_shard(inside(kept), entries, n_groups, all_reduce)
    select_rows(Source(grad, True, outside(kept)), entries, deficit, n_groups, ties.sub("nm-grow"), all_reduce, kept)
    return kept.view(mask.shape)
