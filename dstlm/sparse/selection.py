"""Exact top-k selection with seeded, sharding-invariant tie-breaks: the primitive every mask rule uses.

Every selection here picks the k entries that come first in one total order: by score (descending), and
among equal scores by a 32-bit hash of the entry's flat index in its layer, keyed by (seed, step, layer,
purpose) (`Ties`). The order depends on nothing but the scores and those keys, not on which rank holds the
entry, the device, or the order entries are visited in; a decision taken on shards can therefore equal
the whole-tensor one (the sharded update builds on that), and no rank needs a permutation of a whole layer.

Here: the tie-break hash, the byte-wise counts of bool masks, and `row_top_k` for rows held whole in one
process (the layer-wide and cut-row choices are radix selections, dstlm/sparse/radix.py). The tests hold both
to sort-based references of the same order (tests/helpers/reference_selection.py).
"""

from __future__ import annotations

import hashlib
from typing import Optional, Union

import torch

M32 = 0xFFFFFFFF


def _round(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^32) (the 'lowbias32' integer hash), in place on an int64 tensor."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x &= M32
    x ^= x >> 15
    x *= 0x846CA68B
    x &= M32
    x ^= x >> 16
    return x


class Ties:
    """Seeded tie-breaks: `hash(index)` maps flat indices (< 2^32) to distinct 32-bit values in an order that
    looks random and is fixed by the scope (seed, step, layer, purpose...). `sub(...)` narrows the scope."""

    def __init__(self, seed: int, *scope: Union[int, str]) -> None:
        self.scope = (int(seed),) + tuple(scope)
        digest = hashlib.blake2b(repr(self.scope).encode(), digest_size=8).digest()
        self.k1 = int.from_bytes(digest[:4], "little")
        self.k2 = int.from_bytes(digest[4:], "little")

    def sub(self, *scope: Union[int, str]) -> "Ties":
        return Ties(*self.scope, *scope)

    def hash(self, index: torch.Tensor) -> torch.Tensor:
        x = index.to(torch.int64).clone()
        x ^= self.k1
        _round(x)
        x ^= self.k2
        return _round(x)

    def __repr__(self) -> str:
        return f"Ties{self.scope}"


def count(mask: torch.Tensor) -> int:
    """True entries of a bool tensor (count_nonzero: ~20x faster than bool.sum() on the CPU)."""
    return int(torch.count_nonzero(mask))


def _byte_chunk(n: int) -> int:
    """The largest divisor of n that is at most 255 (a uint8 sum of that many 0/1 bytes cannot overflow)."""
    return next(c for c in range(min(n, 255), 0, -1) if n % c == 0)


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: True entries per row of a bool [rows, cols]. Summed as bytes in runs of <= 255 (no
    overflow), then the run sums: a sum with dtype=int64 first widens every byte (~15x slower on the CPU)."""
    rows, cols = mask.shape
    c = _byte_chunk(cols) if cols else 1
    if c < 16:  # e.g. a prime width: widen to int32 instead (still 4x cheaper than int64)
        return mask.view(torch.uint8).sum(dim=1, dtype=torch.int32).to(torch.int64)
    runs = mask.view(torch.uint8).reshape(rows, cols // c, c).sum(dim=2, dtype=torch.uint8)
    return runs.sum(dim=1, dtype=torch.int64)


def column_counts(mask: torch.Tensor) -> torch.Tensor:
    """int64 [cols]: True entries per column of a bool [rows, cols] (byte runs as in row_counts)."""
    rows, cols = mask.shape
    c = _byte_chunk(rows) if rows else 1
    if c < 16:
        return mask.view(torch.uint8).sum(dim=0, dtype=torch.int32).to(torch.int64)
    runs = mask.view(torch.uint8).reshape(rows // c, c, cols).sum(dim=1, dtype=torch.uint8)
    return runs.sum(dim=0, dtype=torch.int64)


def active_rows(mask: torch.Tensor) -> torch.Tensor:
    """uint8 [rows], non-zero where a row of the bool [rows, cols] has a True entry (a byte max: bool any()
    along rows is ~50x slower on the CPU)."""
    return mask.view(torch.uint8).amax(dim=1)


def check_size(n: int) -> None:
    if n >= 2**32:
        raise ValueError(f"a sparse matrix of {n} entries is beyond the 2^32 entries tie-breaks index; split it")


def _take_by_hash(flat_index: torch.Tensor, segment: torch.Tensor, need: torch.Tensor, ties: Ties) -> torch.Tensor:
    """Of entries with (sorted or not) segment ids, a bool per entry: among each segment's entries, the
    `need[segment]` with the largest hashes."""
    h = ties.hash(flat_index)
    composite = segment.to(torch.int64) * (M32 + 1) + (M32 - h)  # by segment, then hash descending
    order = torch.argsort(composite)
    seg_sorted = segment[order]
    first = torch.searchsorted(seg_sorted, seg_sorted, right=False)
    pos = torch.arange(seg_sorted.numel(), device=seg_sorted.device) - first
    take = torch.zeros_like(order, dtype=torch.bool)
    take[order] = pos < need[seg_sorted]
    return take


def row_top_k(score: torch.Tensor, k: Union[int, torch.Tensor], ties: Ties,
              eligible: Optional[torch.Tensor] = None, row_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool [R, C]: in every row i, the k[i] first entries in (score desc, hash of the flat index desc) order
    among its eligible ones (fewer when fewer are eligible), by torch.topk along the rows; hashes only for the
    entries tied at a row's threshold. `row_ids`: the layer rows these R rows are (when they are a selection of
    its rows), so ties hash the entries' indices in the whole layer."""
    rows, cols = score.shape
    check_size(rows * cols)
    kk = torch.as_tensor(k, device=score.device, dtype=torch.int64).expand(rows).clamp(0, cols)
    s = score.float()
    if eligible is not None:
        kk = torch.minimum(kk, row_counts(eligible))
        s = s.masked_fill(~eligible, float("-inf"))
    kmax = int(kk.max()) if rows else 0
    if kmax == 0:
        return torch.zeros(rows, cols, dtype=torch.bool, device=score.device)
    thr = torch.topk(s, kmax, dim=1, sorted=True).values.gather(1, (kk - 1).clamp_min(0)[:, None])
    thr.masked_fill_((kk == 0)[:, None], float("inf"))  # rows choosing nothing: no entry reaches +inf
    out, eq = s > thr, s == thr
    if eligible is not None and bool(torch.isneginf(thr).any()):  # a -inf threshold would admit ineligibles
        eq &= eligible
    need = kk - row_counts(out)
    ambiguous = row_counts(eq) > need
    if bool(ambiguous.any()):
        r, c = (eq & ambiguous[:, None]).nonzero(as_tuple=True)
        take = _take_by_hash((r if row_ids is None else row_ids[r]) * cols + c, r, need, ties)
        eq[r[~take], c[~take]] = False
    return out | eq
