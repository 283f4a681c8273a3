"""Exact top-k over a layer split across ranks, without gathering it: the distributed form of
`selection.top_k`, the same set in the same total order (value desc, then the keyed hash of the entry's index
in the layer desc).

Each rank holds some entries of the layer (any split: ZeRO's flat partitions cut rows anywhere) as values
and their flat indices in the whole layer. The k-th entry of the order is found by radix selection on
order-preserving int32 keys (a non-negative float's own bits), 11, 11 and 10 bits at a time, with one
all-reduce of a histogram of at most 2048 counts per round: 3 rounds give the threshold value, how many
entries above it are in and how many sit at it (only the first round reads every entry; the others read the
entries sharing the digits chosen so far); when the threshold is tied, 3 more rounds over the 32-bit hashes
of only the tied entries pick which of them. Entries that are not candidates (eligibility) take the lowest
key instead of being compacted out. Communication: 3 (or 6) small all-reduces per selection, whatever the
layer's size; compute: a few passes over the rank's own entries, about what the one-process selection
makes.

Per-row selections (SRigL's fan-in, N:M's groups) decide every row whose candidates are all on one rank
there alone, with `selection.row_top_k`; only the rows cut between ranks (at most world - 1 per layer for
contiguous fragments) go through radix rounds, on [cut rows, 256] histograms.

`all_reduce` is any in-place sum over the ranks (torch.distributed.all_reduce over a process group, or an
identity on one process), so the module imports no distributed framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dstlm.sparse.rules import srigl_keep_is_salient, srigl_survivors
from dstlm.sparse.selection import M32, Ties, row_top_k

AllReduce = Callable[[torch.Tensor], torch.Tensor]


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
    index: torch.Tensor
    """int64: each entry's flat index in the [R, C] matrix (row = index // C)."""
    all_reduce: AllReduce = single_process

    def rows(self, cols: int) -> torch.Tensor:
        return self.index // cols

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
    b = (values.float() + 0.0).contiguous().view(torch.int32).to(torch.int64) & M32
    negative = b >= 2**31
    return torch.where(negative, (~b) & M32, b | 2**31)


INT32_MIN = -(2**31)


def float_order_key(values: torch.Tensor) -> torch.Tensor:
    """int32 whose (signed) order is the float32 order of `values` (-0.0 counted as +0.0; INT32_MIN is
    left to mark ineligible entries: only a negative NaN maps there)."""
    b = (values.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 becomes +0.0
    return b ^ ((b >> 31) & 0x7FFFFFFF)


# radix rounds over int32 keys: (shift, bits) from the top; small histograms (2048 counts, 16 KB) keep each
# all-reduce latency-bound, and the first round already leaves only the entries near the threshold
_ROUNDS = ((21, 11), (10, 11), (0, 10))


def _pick_digit(digit: torch.Tensor, bins: int, k: int, all_reduce: AllReduce) -> tuple[int, int, int]:
    """Over all ranks' digits (0..bins-1), the digit of the k-th largest, how many are larger and how many
    equal it."""
    hist = all_reduce(torch.bincount(digit, minlength=bins).to(torch.int64)).cpu()
    from_top = torch.flip(hist, [0]).cumsum(0)  # from_top[j]: digits >= bins - 1 - j
    j = int(torch.searchsorted(from_top, torch.tensor(k)))
    return bins - 1 - j, (int(from_top[j - 1]) if j > 0 else 0), int(hist[bins - 1 - j])


def _select_keys(key: torch.Tensor, k: int,
                 all_reduce: AllReduce) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Over all ranks' int32 keys: the local entries surely among the k largest (bool), the local entries at
    the k-th largest key (indices), how many of those tied entries, over all ranks, are still to be taken,
    and how many there are over all ranks. Three radix rounds (11, 11, 10 bits); only the first reads every
    entry, the others read the entries that share the digits chosen so far."""
    (shift, bits), rest = _ROUNDS[0], _ROUNDS[1:]
    digit = key >> shift
    digit += 1 << (bits - 1)  # the signed top digit, shifted to 0..2^bits-1
    d, above, _ = _pick_digit(digit, 1 << bits, k, all_reduce)
    out = digit > d
    live = (digit == d).nonzero().squeeze(1)
    del digit
    live_key = key[live]
    for shift, bits in rest:
        digit = (live_key >> shift) & ((1 << bits) - 1)
        d, more, at = _pick_digit(digit, 1 << bits, k - above, all_reduce)
        above += more
        out[live[digit > d]] = True
        same = digit == d
        live, live_key = live[same], live_key[same]
    return out, live, k - above, at


def sharded_top_k(values: torch.Tensor, index: torch.Tensor, k: int, ties: Ties,
                  all_reduce: AllReduce = single_process, total: Optional[int] = None,
                  eligible: Optional[torch.Tensor] = None, nonnegative: bool = False) -> torch.Tensor:
    """bool per local entry: whether it is among the k first entries of the whole layer in (value desc, hash of
    index desc) order, where the layer's entries are the union of every rank's (values, index) — only the
    `eligible` ones (bool per entry) when given. `total`: the number of (eligible) entries over all ranks, if
    the caller knows it (saves one all-reduce). `nonnegative`: the caller guarantees values >= 0 (|W|, |grad|):
    their float bits are then their order, with no conversion pass. Entries are never compacted: ineligible
    ones get the lowest key, below every eligible one, and k never reaches them."""
    values, index = values.reshape(-1), index.reshape(-1)
    if total is None:
        n = values.numel() if eligible is None else torch.count_nonzero(eligible)
        total = int(all_reduce(torch.as_tensor(n, dtype=torch.int64, device=values.device).reshape(1)).item())
    k = max(0, min(int(k), total))
    if k == 0:
        return torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k == total:
        return torch.ones(values.numel(), dtype=torch.bool, device=values.device) if eligible is None \
            else eligible.reshape(-1).clone()
    if nonnegative:  # + 0.0 would only turn -0.0 into +0.0, which |x| never yields
        key = values.float().contiguous().view(torch.int32)
    else:
        key = float_order_key(values)
    if eligible is not None:
        key = torch.where(eligible.reshape(-1), key, torch.tensor(INT32_MIN, dtype=torch.int32, device=key.device))
    out, tied, need, n_tied = _select_keys(key, k, all_reduce)
    if need >= n_tied:
        out[tied] = True
    else:  # the tied entries' 32-bit hashes, shifted into int32's signed range (an order-preserving shift)
        h = (ties.hash(index[tied]) - 2**31).to(torch.int32)
        sure, at, _, _ = _select_keys(h, need, all_reduce)
        out[tied[sure]] = True
        out[tied[at]] = True  # hashes are distinct: the need-th one is the only one at the threshold
    return out


# -- rules on shards: each equal, over the union of the ranks' entries, to its whole-layer form in rules.py --


def _global_count(mask: torch.Tensor, all_reduce: AllReduce) -> int:
    return int(all_reduce(torch.count_nonzero(mask).reshape(1).to(torch.int64)).item())


def keep_largest_shard(weight: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, n_keep: int, ties: Ties,
                       all_reduce: AllReduce, nnz: Optional[int] = None) -> torch.Tensor:
    """rules.keep_largest on a shard: the n_keep largest |W| (over all ranks) among the active entries."""
    out = sharded_top_k(weight.reshape(-1).abs(), index, max(0, n_keep), ties.sub("keep"), all_reduce,
                        total=nnz, eligible=mask.reshape(-1), nonnegative=True)
    return out.view(mask.shape)


def grow_top_shard(mask: torch.Tensor, score: torch.Tensor, index: torch.Tensor, k: int, ties: Ties,
                   all_reduce: AllReduce, nonnegative: bool = False,
                   n_eligible: Optional[int] = None) -> torch.Tensor:
    """rules.grow_top on a shard: `mask` plus the k highest scores (over all ranks) outside it. `n_eligible`:
    the entries outside the mask over all ranks, if known (saves an all-reduce)."""
    grown = sharded_top_k(score.reshape(-1), index, k, ties.sub("grow"), all_reduce, eligible=~mask.reshape(-1),
                          nonnegative=nonnegative, total=n_eligible)
    return (mask.reshape(-1) | grown).view(mask.shape)


def drop_and_grow_shard(weight: torch.Tensor, mask: torch.Tensor, score: Optional[torch.Tensor], n_swap: int,
                        index: torch.Tensor, ties: Ties, all_reduce: AllReduce,
                        numel: Optional[int] = None) -> torch.Tensor:
    """RigL (score = |dense gradient|) or SET (score None: random growth) on a shard; `n_swap` is the layer's
    (the same on every rank), `numel` its size if known. Equal over the union of shards to
    rules.rigl_update / rules.set_update."""
    nnz = _global_count(mask, all_reduce)
    n_keep = nnz - min(n_swap, nnz)
    kept = keep_largest_shard(weight, mask, index, n_keep, ties, all_reduce, nnz=nnz)  # exactly n_keep, over all
    grow_score = torch.zeros(mask.shape, device=mask.device) if score is None else score.abs()
    return grow_top_shard(kept, grow_score, index, nnz - n_keep, ties, all_reduce, nonnegative=True,
                          n_eligible=None if numel is None else numel - n_keep)


def gmp_prune_shard(weight: torch.Tensor, mask: torch.Tensor, n_keep: int, index: torch.Tensor, ties: Ties,
                    all_reduce: AllReduce) -> torch.Tensor:
    """rules.gmp_prune on a shard: keep the layer's n_keep largest |W| among active entries."""
    nnz = _global_count(mask, all_reduce)
    return keep_largest_shard(weight, mask, index, min(n_keep, nnz), ties, all_reduce, nnz=nnz)


# -- per-row selections (SRigL's constant fan-in) when a shard cuts rows anywhere --------------------------


def _radix_select_rows(bits: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, n_rows: int,
                       all_reduce: AllReduce) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row r (over all ranks' entries, row ids `rows`), the k[r]-th largest 32-bit pattern and the count
    strictly above it (k[r] >= 1 and <= the row's entries; rows with k[r] = 0 get meaningless values).
    One all-reduced [n_rows, 256] histogram per round."""
    prefix = torch.zeros(n_rows, dtype=torch.int64, device=bits.device)
    above = torch.zeros(n_rows, dtype=torch.int64, device=bits.device)
    live_bits, live_rows = bits, rows
    for shift in (24, 16, 8, 0):
        digit = (live_bits >> shift) & 0xFF
        hist = torch.bincount(live_rows * 256 + digit, minlength=n_rows * 256).view(n_rows, 256)
        hist = all_reduce(hist.to(torch.int64))
        from_top = torch.flip(hist, [1]).cumsum(1)
        j = torch.searchsorted(from_top, (k - above).clamp_min(1)[:, None]).squeeze(1).clamp_max(255)
        above += torch.where(j > 0, from_top.gather(1, (j - 1).clamp_min(0)[:, None]).squeeze(1), 0)
        d = 255 - j
        prefix |= d << shift
        keep = digit == d[live_rows]
        live_bits, live_rows = live_bits[keep], live_rows[keep]
    return prefix, above


def sharded_row_top_k(values: torch.Tensor, index: torch.Tensor, k: torch.Tensor, n_rows: int, cols: int,
                      ties: Ties, all_reduce: AllReduce = single_process,
                      eligible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool per local entry: among the (eligible) entries of its row over all ranks, whether it is one of the
    k[row] first in (value desc, hash of index desc) order: selection.row_top_k when the layer's rows are cut
    across ranks. `index`: each entry's flat index in the [n_rows, cols] layer, ascending; k: [n_rows].
    Rows whose eligible entries are all on one rank are decided there alone (selection.row_top_k); only rows
    cut between ranks (at most world - 1 per layer for contiguous fragments) go through the collective radix
    selection, on histograms of those rows only. A contiguous run of indices (ZeRO's and the engine's
    fragments) is laid out as whole rows in place, with no compaction."""
    values, index = values.reshape(-1), index.reshape(-1)
    n = values.numel()
    eligible = torch.ones(n, dtype=torch.bool, device=values.device) if eligible is None else eligible.reshape(-1)
    if n and int(index[-1]) - int(index[0]) + 1 == n:
        return _row_top_k_run(values, eligible, int(index[0]), k, n_rows, cols, ties, all_reduce)
    idx = eligible.nonzero().squeeze(1)  # any other subset of entries: the eligible ones, compacted
    rows = index[idx] // cols
    local = torch.bincount(rows, minlength=n_rows).to(torch.int64)
    k, shared = _clamp_and_cut_rows(local, k, all_reduce)
    out = torch.zeros(n, dtype=torch.bool, device=values.device)
    own = (~shared[rows]).nonzero().squeeze(1)
    if own.numel():
        r, c = rows[own], index[idx[own]] % cols
        r0 = int(r.min())
        dense = torch.zeros(int(r.max()) + 1 - r0, cols, dtype=torch.float32, device=values.device)
        ok = torch.zeros(dense.shape, dtype=torch.bool, device=values.device)
        dense[r - r0, c] = values[idx[own]].float()
        ok[r - r0, c] = True
        sel = row_top_k(dense, k[r0:r0 + dense.shape[0]], ties, eligible=ok,
                        row_ids=torch.arange(r0, r0 + dense.shape[0], device=values.device))
        out[idx[own]] = sel[r - r0, c]
    cut = shared[rows]
    _cut_rows(out, idx[cut], values[idx[cut]], index[idx[cut]], rows[cut], shared, k, ties, all_reduce)
    return out


def _clamp_and_cut_rows(local: torch.Tensor, k: torch.Tensor, all_reduce: AllReduce):
    """k clamped to each row's eligible entries over all ranks, and the rows cut between ranks (the same on
    every rank): a rank holds some but not all of the row's eligible entries."""
    per_row = all_reduce(local.clone())
    k = torch.minimum(k.to(torch.int64).to(local.device), per_row)
    shared = all_reduce(((local > 0) & (local < per_row)).to(torch.int64)) > 0
    return k, shared


def _cut_rows(out: torch.Tensor, pos: torch.Tensor, values: torch.Tensor, index: torch.Tensor, rows: torch.Tensor,
              shared: torch.Tensor, k: torch.Tensor, ties: Ties, all_reduce: AllReduce) -> None:
    """Decide out[pos], the entries of the cut rows (their values, flat indices and rows), collectively.
    Every rank calls it; the collective part runs when any row is cut (the same on every rank)."""
    shared_ids = shared.nonzero().squeeze(1)
    if shared_ids.numel():
        slot = torch.full((shared.numel(),), -1, dtype=torch.int64, device=values.device)
        slot[shared_ids] = torch.arange(shared_ids.numel(), device=values.device)
        out[pos] = _collective_row_top_k(values, slot[rows], index, k[shared_ids], shared_ids.numel(), ties,
                                         all_reduce)


def _row_top_k_run(values: torch.Tensor, eligible: torch.Tensor, start: int, k: torch.Tensor, n_rows: int,
                   cols: int, ties: Ties, all_reduce: AllReduce) -> torch.Tensor:
    """sharded_row_top_k for the entries [start, start + n) of the layer: padded to whole rows in place."""
    n, dev = values.numel(), values.device
    first, last = start // cols, (start + n - 1) // cols
    pad, n_local = start - first * cols, last - first + 1
    dense = torch.zeros(n_local * cols, dtype=torch.float32, device=dev)
    ok = torch.zeros(n_local * cols, dtype=torch.bool, device=dev)
    dense[pad:pad + n] = values
    ok[pad:pad + n] = eligible
    dense, ok = dense.view(n_local, cols), ok.view(n_local, cols)
    local = torch.zeros(n_rows, dtype=torch.int64, device=dev)
    local[first:last + 1] = torch.count_nonzero(ok, dim=1)
    k, shared = _clamp_and_cut_rows(local, k, all_reduce)
    sel = torch.zeros(n_local, cols, dtype=torch.bool, device=dev)
    # only the first and the last row of a run can be cut; the rows between are this rank's alone
    a = 1 if bool(shared[first]) else 0
    b = n_local - 1 if (last > first and bool(shared[last])) else n_local
    if b > a:
        sel[a:b] = row_top_k(dense[a:b], k[first + a:first + b], ties, eligible=ok[a:b],
                             row_ids=torch.arange(first + a, first + b, device=dev))
    cut = [r for r in {0, n_local - 1} if bool(shared[first + r])]
    pos = torch.cat([r * cols + ok[r].nonzero().squeeze(1) for r in cut]) if cut else \
        torch.zeros(0, dtype=torch.int64, device=dev)
    flat = sel.view(-1)
    _cut_rows(flat, pos, dense.view(-1)[pos], pos + first * cols, first + pos // cols, shared, k, ties, all_reduce)
    return flat[pad:pad + n].clone()


def _collective_row_top_k(values: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, k: torch.Tensor,
                          n_rows: int, ties: Ties, all_reduce: AllReduce) -> torch.Tensor:
    """sharded_row_top_k's radix selection for rows cut between ranks (`rows`: 0..n_rows-1, the same row
    numbering on every rank; k already clamped to each row's entries over all ranks)."""
    bits = float_order_bits(values)
    threshold, above = _radix_select_rows(bits, rows, k, n_rows, all_reduce)
    live = k[rows] > 0
    out = (bits > threshold[rows]) & live
    tied = ((bits == threshold[rows]) & live).nonzero().squeeze(1)
    need = k - above
    n_tied = all_reduce(torch.bincount(rows[tied], minlength=n_rows).to(torch.int64))
    take_all = need >= n_tied
    all_in = tied[take_all[rows[tied]]]
    out[all_in] = True
    part = tied[~take_all[rows[tied]]]
    # every rank takes part in the hash round (it is collective), with or without entries of its own
    h = ties.hash(index[part])
    need_h = torch.where(take_all, torch.zeros_like(need), need)
    h_threshold, _ = _radix_select_rows(h, rows[part], need_h, n_rows, all_reduce)
    out[part[h >= h_threshold[rows[part]]]] = True
    return out


def srigl_update_shard(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int, budget: int,
                       gamma_sal: float, allow_ablation: bool, rows: torch.Tensor, index: torch.Tensor,
                       shape: tuple[int, int], ties: Ties, all_reduce: AllReduce,
                       force_ablate: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """rules.srigl_update on a shard (entries with their row and flat index in the [R, C] layer `shape`):
    the same steps with layer-wide selections by sharded_top_k, per-row ones by sharded_row_top_k and row
    counts all-reduced; over the union of the ranks equal to the whole-layer rule. Returns (mask, k)."""
    n_rows, cols = shape
    weight, mask, grad = weight.reshape(-1), mask.reshape(-1), grad.reshape(-1)
    rows, index = rows.reshape(-1), index.reshape(-1)

    def row_counts(sel: torch.Tensor) -> torch.Tensor:  # one pass, no compaction
        counts = torch.zeros(n_rows, dtype=torch.int32, device=sel.device).index_add_(0, rows, sel.to(torch.int32))
        return all_reduce(counts.to(torch.int64))

    def pick(sel: torch.Tensor, values: torch.Tensor, k: int, sub: str, total: Optional[int] = None):
        return sharded_top_k(values, index, k, ties.sub(sub), all_reduce, total=total, eligible=sel,
                             nonnegative=True)

    row_nnz = row_counts(mask)
    active_rows = row_nnz > 0
    n_active_rows = int(active_rows.sum())
    nnz = int(row_nnz.sum())
    n_swap = min(n_swap, nnz)
    w_abs, g_abs = weight.abs(), grad.abs()
    counts = salient_w = None
    if allow_ablation and n_active_rows > 0:
        salient_w = pick(mask, w_abs, nnz - n_swap, "keep", total=nnz)  # step 4's keep when nothing is ablated
        counts = row_counts(salient_w | pick(~mask, g_abs, n_swap, "salient-g"))
    survivors, k = srigl_survivors(active_rows, counts, budget, cols, gamma_sal, force_ablate)
    n_surv = int(survivors.sum())
    keep_total = max(0, k * n_surv - n_swap)
    if salient_w is not None and srigl_keep_is_salient(keep_total, nnz, n_swap, survivors, active_rows):
        kept = salient_w  # decided alike on every rank (all-reduced counts): the collectives stay in step
    else:
        kept = pick(mask & survivors[rows], w_abs, keep_total, "keep")
    over = row_counts(kept) > k
    if bool(over.any()):  # the same on every rank (all-reduced counts): the collective trim runs on all or none
        trim_rows = kept & over[rows]
        k_rows = torch.where(over, torch.full_like(over, k, dtype=torch.int64), 0)
        sel = sharded_row_top_k(w_abs, index, k_rows, n_rows, cols, ties.sub("trim"), all_reduce, eligible=trim_rows)
        kept &= ~trim_rows | sel
    deficit = (k - row_counts(kept)) * survivors
    grown = sharded_row_top_k(g_abs, index, deficit, n_rows, cols, ties.sub("grow"), all_reduce, eligible=~kept)
    return kept | grown, k


def nm_update_shard(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int, n: int, m: int,
                    index: torch.Tensor, numel: int, ties: Ties, all_reduce: AllReduce) -> torch.Tensor:
    """rules.nm_update on a shard: groups are m consecutive flat entries (a cut may split one group across
    ranks); drop by |W| layer-wide, refill every group to n by |grad|."""
    weight, mask, grad, index = weight.reshape(-1), mask.reshape(-1), grad.reshape(-1), index.reshape(-1)
    nnz = _global_count(mask, all_reduce)
    kept = keep_largest_shard(weight, mask, index, nnz - min(n_swap, nnz), ties, all_reduce, nnz=nnz)
    groups = index // m
    n_groups = numel // m
    deficit = n - all_reduce(torch.bincount(groups[kept], minlength=n_groups).to(torch.int64))
    grown = sharded_row_top_k(grad.abs(), index, deficit, n_groups, m, ties.sub("nm-grow"), all_reduce,
                              eligible=~kept)
    return kept | grown
