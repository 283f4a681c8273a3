"""Exact top-k over a layer split across ranks, without gathering it: the distributed form of
`selection.top_k`, the same set in the same total order (value desc, then the keyed hash of the entry's index
in the layer desc).

Each rank holds some entries of the layer (any split: ZeRO's flat partitions cut rows anywhere) as values
and their flat indices in the whole layer. The k-th entry of the order is found by radix selection on
order-preserving bit patterns, 8 bits at a time, with one all-reduce of a 256-bin histogram per round: 4
rounds over the float's 32 bits give the threshold value and how many entries above it are in; when the
threshold is tied, 4 more rounds over the 32-bit hashes of only the tied entries pick which of them. Each
rank then keeps its entries at or above the threshold. Communication: at most 8 x 256 counts per selection,
whatever the layer's size; compute: a few passes over the rank's own entries.

`all_reduce` is any in-place sum over the ranks (torch.distributed.all_reduce over a process group, or an
identity on one process), so the module imports no distributed framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dstlm.sparse.rules import srigl_survivors
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
    """int64 in [0, 2^32), increasing with the float32 value (the IEEE bits, sign-folded)."""
    b = values.float().contiguous().view(torch.int32).to(torch.int64) & M32
    negative = b >= 2**31
    return torch.where(negative, (~b) & M32, b | 2**31)


def _radix_select(bits: torch.Tensor, k: int, all_reduce: AllReduce) -> tuple[int, int]:
    """Over all ranks' 32-bit patterns `bits` (int64 in [0, 2^32)), the k-th largest pattern (1 <= k <= total)
    and how many patterns are strictly above it, in 4 all-reduced histogram rounds."""
    prefix, above = 0, 0
    live = bits
    for shift in (24, 16, 8, 0):
        digit = (live >> shift) & 0xFF
        hist = torch.bincount(digit, minlength=256).to(torch.int64)
        hist = all_reduce(hist.to(bits.device)).cpu()
        from_top = torch.flip(hist, [0]).cumsum(0)  # from_top[j]: patterns with digit >= 255 - j
        j = int(torch.searchsorted(from_top, torch.tensor(k - above)))
        d = 255 - j
        above += int(from_top[j - 1]) if j > 0 else 0
        prefix |= d << shift
        live = live[digit == d]
    return prefix, above


def sharded_top_k(values: torch.Tensor, index: torch.Tensor, k: int, ties: Ties,
                  all_reduce: AllReduce = single_process, total: Optional[int] = None) -> torch.Tensor:
    """bool per local entry: whether it is among the k first entries of the whole layer in (value desc, hash of
    index desc) order, where the layer's entries are the union of every rank's (values, index).
    `total`: the number of entries over all ranks, if the caller knows it (saves one all-reduce)."""
    values, index = values.reshape(-1), index.reshape(-1)
    if total is None:
        total = int(all_reduce(torch.tensor([values.numel()], dtype=torch.int64, device=values.device)).item())
    k = max(0, min(int(k), total))
    if k == 0:
        return torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k == total:
        return torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    bits = float_order_bits(values)
    threshold, above = _radix_select(bits, k, all_reduce)
    out = bits > threshold
    tied = (bits == threshold).nonzero().squeeze(1)
    need = k - above  # entries to take among those tied at the threshold value, over all ranks
    n_tied = int(all_reduce(torch.tensor([tied.numel()], dtype=torch.int64, device=values.device)).item())
    if need >= n_tied:
        out[tied] = True
    else:
        h = ties.hash(index[tied])
        h_threshold, _ = _radix_select(h, need, all_reduce)
        out[tied[h >= h_threshold]] = True
    return out


# -- rules on shards: each equal, over the union of the ranks' entries, to its whole-layer form in rules.py --


def _global_count(mask: torch.Tensor, all_reduce: AllReduce) -> int:
    return int(all_reduce(torch.count_nonzero(mask).reshape(1).to(torch.int64)).item())


def keep_largest_shard(weight: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, n_keep: int, ties: Ties,
                       all_reduce: AllReduce, nnz: Optional[int] = None) -> torch.Tensor:
    """rules.keep_largest on a shard: the n_keep largest |W| (over all ranks) among the active entries."""
    active = mask.reshape(-1).nonzero().squeeze(1)
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    sel = sharded_top_k(weight.reshape(-1)[active].abs(), index.reshape(-1)[active], max(0, n_keep),
                        ties.sub("keep"), all_reduce, total=nnz)
    out[active[sel]] = True
    return out.view(mask.shape)


def grow_top_shard(mask: torch.Tensor, score: torch.Tensor, index: torch.Tensor, k: int, ties: Ties,
                   all_reduce: AllReduce) -> torch.Tensor:
    """rules.grow_top on a shard: `mask` plus the k highest scores (over all ranks) outside it."""
    inactive = (~mask.reshape(-1)).nonzero().squeeze(1)
    sel = sharded_top_k(score.reshape(-1)[inactive].float(), index.reshape(-1)[inactive], k, ties.sub("grow"),
                        all_reduce)
    out = mask.reshape(-1).clone()
    out[inactive[sel]] = True
    return out.view(mask.shape)


def drop_and_grow_shard(weight: torch.Tensor, mask: torch.Tensor, score: Optional[torch.Tensor], n_swap: int,
                        index: torch.Tensor, ties: Ties, all_reduce: AllReduce) -> torch.Tensor:
    """RigL (score = |dense gradient|) or SET (score None: random growth) on a shard; `n_swap` is the layer's
    (the same on every rank). Equal over the union of shards to rules.rigl_update / rules.set_update."""
    nnz = _global_count(mask, all_reduce)
    kept = keep_largest_shard(weight, mask, index, nnz - min(n_swap, nnz), ties, all_reduce, nnz=nnz)
    n_grow = nnz - _global_count(kept, all_reduce)
    grow_score = torch.zeros(mask.shape, device=mask.device) if score is None else score.abs()
    return grow_top_shard(kept, grow_score, index, n_grow, ties, all_reduce)


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
                      ties: Ties, all_reduce: AllReduce = single_process) -> torch.Tensor:
    """bool per local entry: among the entries of its row (over all ranks), whether it is one of the k[row]
    first in (value desc, hash of index desc) order: selection.row_top_k when the layer's rows are cut
    across ranks. `index`: each entry's flat index in the [n_rows, cols] layer; k: [n_rows].
    Rows whose entries are all on one rank are decided there alone (selection.row_top_k on those rows);
    only rows cut between ranks (at most world - 1 per layer for contiguous fragments) go through the
    collective radix selection, on histograms of those rows only."""
    values, index = values.reshape(-1), index.reshape(-1)
    rows = index // cols
    local = torch.bincount(rows, minlength=n_rows).to(torch.int64)
    per_row = all_reduce(local.clone())
    k = torch.minimum(k.to(torch.int64).to(values.device), per_row)
    shared = all_reduce(((local > 0) & (local < per_row)).to(torch.int64)) > 0  # the same on every rank
    out = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    own = (~shared[rows]).nonzero().squeeze(1)
    if own.numel():
        r, c = rows[own], index[own] % cols
        row_ids, inv = torch.unique(r, return_inverse=True)
        dense = torch.zeros(row_ids.numel(), cols, dtype=torch.float32, device=values.device)
        eligible = torch.zeros(row_ids.numel(), cols, dtype=torch.bool, device=values.device)
        dense[inv, c] = values[own].float()
        eligible[inv, c] = True
        sel = row_top_k(dense, k[row_ids], ties, eligible=eligible, row_ids=row_ids)
        out[own] = sel[inv, c]
    shared_ids = shared.nonzero().squeeze(1)
    if shared_ids.numel():  # the same on every rank: the collective part runs on all or none
        slot = torch.full((n_rows,), -1, dtype=torch.int64, device=values.device)
        slot[shared_ids] = torch.arange(shared_ids.numel(), device=values.device)
        cut = (shared[rows]).nonzero().squeeze(1)
        out[cut] = _collective_row_top_k(values[cut], slot[rows[cut]], index[cut], k[shared_ids],
                                         shared_ids.numel(), ties, all_reduce)
    return out


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

    def row_counts(sel: torch.Tensor) -> torch.Tensor:
        return all_reduce(torch.bincount(rows[sel], minlength=n_rows).to(torch.int64))

    def pick(sel: torch.Tensor, values: torch.Tensor, k: int, sub: str, total: Optional[int] = None):
        idx = sel.nonzero().squeeze(1)
        out = torch.zeros_like(sel)
        out[idx[sharded_top_k(values[idx], index[idx], k, ties.sub(sub), all_reduce, total=total)]] = True
        return out

    row_nnz = row_counts(mask)
    active_rows = row_nnz > 0
    n_active_rows = int(active_rows.sum())
    nnz = int(row_nnz.sum())
    n_swap = min(n_swap, nnz)
    w_abs, g_abs = weight.abs(), grad.abs()
    counts = None
    if allow_ablation and n_active_rows > 0:
        salient = pick(mask, w_abs, nnz - n_swap, "salient-w", total=nnz) | pick(~mask, g_abs, n_swap, "salient-g")
        counts = row_counts(salient)
    survivors, k = srigl_survivors(active_rows, counts, budget, cols, gamma_sal, force_ablate)
    n_surv = int(survivors.sum())
    kept = pick(mask & survivors[rows], w_abs, max(0, k * n_surv - n_swap), "keep")
    over = row_counts(kept) > k
    if bool(over.any()):  # the same on every rank (all-reduced counts): the collective trim runs on all or none
        trim_rows = kept & over[rows]
        idx = trim_rows.nonzero().squeeze(1)
        k_rows = torch.where(over, torch.full_like(over, k, dtype=torch.int64), 0)
        sel = sharded_row_top_k(w_abs[idx], index[idx], k_rows, n_rows, cols, ties.sub("trim"), all_reduce)
        kept[idx[~sel]] = False
    deficit = (k - row_counts(kept)) * survivors
    idx = (~kept).nonzero().squeeze(1)
    sel = sharded_row_top_k(g_abs[idx], index[idx], deficit, n_rows, cols, ties.sub("grow"), all_reduce)
    grown = torch.zeros_like(kept)
    grown[idx[sel]] = True
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
    idx = (~kept).nonzero().squeeze(1)
    sel = sharded_row_top_k(grad[idx].abs(), index[idx], deficit, n_groups, m, ties.sub("nm-grow"), all_reduce)
    out = kept.clone()
    out[idx[sel]] = True
    return out
