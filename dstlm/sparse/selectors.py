"""The selector seam: how a rule chooses entries of one sparse [R, C] matrix, wherever those entries live.

A rule (dstlm/sparse/rules.py) never looks at where the matrix is. It holds this process's entries of the
weight, the mask and the score as tensors of one shape (the whole [R, C] matrix, or a 1-D run of it: a rank's
fragment), combines them entry by entry, and asks its `Selector` for everything that spans entries:

- `count(x)`, `row_counts(...)`: how many entries a bool tensor (or an eligibility) selects, in all, or per
  segment (a row; an N:M group with `grouped(m)`), over every process that holds part of the matrix;
- `top(values, k, ...)`: the k first eligible entries of the matrix in one total order: |value| descending,
  then a keyed hash of the entry's flat [R, C] index (`selection.Ties`) descending;
- `row_top(values, k, ...)`: the same order inside every segment, k[segment] of them;
- `in_rows(rows)`: which of this process's entries lie in the marked segments.

Eligibility is given as `inside` (entries True there), `outside` (entries False there) and `rows` (entries of
marked segments), all optional and and-ed, so a selector that streams its fragment never builds the set.
`values` None ranks every entry equal (the hash alone decides: a uniformly random choice to a user).

One `Selector` serves every layout: a run of the matrix's entries on each rank (`Entries`), read a block at a
time; a whole matrix in one process is the run that covers it, reduced over no other process (`whole`). A
choice across many entries is an exact radix selection over all-reduced histograms (dstlm/sparse/radix.py);
segments held whole by this process are decided here by `selection.row_top_k`. Every rank calls it in the same
order with the same k (collectives inside), so a rule decides the same mask on one process or on shards at any
world size.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from dstlm.sparse.radix import ROW_DIGITS, Entries, Source, block, blocks, emit_choice, radix_select
from dstlm.sparse.selection import Ties, check_size, row_top_k

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def single_process(t: torch.Tensor) -> torch.Tensor:
    return t


def torch_all_reduce(group=None) -> AllReduce:
    """An in-place SUM all-reduce over `group` (the default process group when None)."""
    import torch.distributed as dist

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return reduce


def whole(shape: tuple[int, int], device=None) -> "Selector":
    """The selector of a whole [R, C] matrix in this process: one fragment that covers it, reduced over no other
    process; its choices come back [R, C]."""
    rows, cols = int(shape[0]), int(shape[1])
    entries = Entries(rows * cols, cols, torch.device("cpu" if device is None else device), start=0)
    return Selector(entries, (rows, cols), out_shape=(rows, cols))


class Selector:
    """This process's entries of one [R, C] matrix (`Entries`: a rank's run, with their flat [R, C] indices; or
    the whole matrix, `whole`): tensors are 1-D over those entries (`out_shape`: the shape choices come back
    in). Every selection is a collective over `all_reduce` (an in-place sum over the ranks; nothing on one
    process): call it on every rank, in the same order, with the same k."""

    def __init__(self, entries: Entries, shape: tuple[int, int], all_reduce: AllReduce = single_process,
                 seg_len: Optional[int] = None, out_shape: Optional[tuple[int, ...]] = None) -> None:
        self.entries = entries if seg_len is None else entries.grouped(seg_len)
        self.shape = (int(shape[0]), int(shape[1]))
        self.numel = self.shape[0] * self.shape[1]
        check_size(self.numel)
        self.all_reduce = all_reduce
        self.device = entries.device
        self.n_rows = self.numel // self.entries.row_len
        self.out_shape = (self.entries.n,) if out_shape is None else out_shape

    def grouped(self, m: int) -> "Selector":
        if self.shape[1] % m:
            raise ValueError(f"N:M needs in_features divisible by m={m}; got a layer with in_features={self.shape[1]}")
        return Selector(self.entries, self.shape, self.all_reduce, m, self.out_shape)

    def count(self, x: torch.Tensor) -> int:
        return int(self.all_reduce(torch.count_nonzero(x).reshape(1).to(torch.int64)).item())

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.out_shape, dtype=torch.bool, device=self.device)

    def in_rows(self, rows: torch.Tensor) -> torch.Tensor:
        out = self.zeros()
        flat, rows = out.view(-1), rows.to(self.device)
        for a, b in blocks([(0, self.entries.n)], self.device):
            flat[a:b] = self.entries.per_row(rows, a, b)
        return out

    def _eligible(self, inside, outside, rows):
        """Eligibility of every step-th entry of a .. b, read a block at a time (never a tensor of the whole
        fragment)."""
        parts = []
        if inside is not None:
            flat_in = inside.reshape(-1)
            parts.append(lambda a, b, step: flat_in[a:b:step])
        if outside is not None:
            flat_out = outside.reshape(-1)
            parts.append(lambda a, b, step: ~flat_out[a:b:step])
        if rows is not None:
            marked = rows.to(device=self.device, dtype=torch.bool)
            parts.append(lambda a, b, step: self.entries.per_row(marked, a, b)[::step])
        if not parts:
            return None

        def eligible(a: int, b: int, step: int = 1) -> torch.Tensor:
            e = parts[0](a, b, step)
            for p in parts[1:]:
                e = e & p(a, b, step)
            return e

        return eligible

    def _source(self, values, eligible, last_rows=None) -> Source:
        if last_rows is None:
            return Source(values, True, eligible)
        return _Ranked(values, self.in_rows(last_rows), eligible)

    def _counts(self, eligible, local_only: bool = False) -> torch.Tensor:
        counts = torch.zeros(self.n_rows, dtype=torch.int64, device=self.device)
        for a, b in blocks([(0, self.entries.n)], self.device):
            self.entries.add_row_counts(counts, None if eligible is None else eligible(a, b), a, b)
        return counts if local_only else self.all_reduce(counts)

    def row_counts(self, inside=None, outside=None, rows=None) -> torch.Tensor:
        return self._counts(self._eligible(inside, outside, rows))

    def top(self, values, k, ties, *, inside=None, outside=None, rows=None, last_rows=None, total=None,
            into=None):
        out = self.zeros() if into is None else into
        fresh = into is None  # an empty buffer that no eligibility reads
        self._select(self._source(values, self._eligible(inside, outside, rows), last_rows), k, ties, out.view(-1),
                     total, fresh)
        return out

    def top_row_counts(self, values, k, ties, *, outside=None, total=None):
        counts = torch.zeros(self.n_rows, dtype=torch.int64, device=self.device)
        self._select(self._source(values, self._eligible(None, outside, None)), k, ties,
                     lambda a, b, chosen: self.entries.add_row_counts(counts, chosen, a, b), total)
        return self.all_reduce(counts)

    def _select(self, src: Source, k: int, ties: Ties, out, total: Optional[int], fresh: bool = False) -> None:
        """out |= this rank's part of the k first eligible entries (`total`: the eligible entries over all
        ranks, when known: k = 0 or all of them then need no pass)."""
        if total is not None:
            k = max(0, min(int(k), int(total)))
            if k == 0:
                return
            if k == total:
                for a, b in blocks([(0, self.entries.n)], self.device):
                    ok = src.ok(a, b)
                    emit_choice(out, a, b, torch.ones(b - a, dtype=torch.bool, device=self.device) if ok is None
                                else ok, None, False)
                return
        radix_select(src, self.entries, torch.tensor([max(0, int(k))], device=self.device), ties, self.all_reduce,
                     out, fresh=fresh)

    def row_top(self, values, k, ties, *, inside=None, outside=None, rows=None, into=None, assign=False):
        """In every segment over all ranks, its k[segment] first eligible entries. Segments whose eligible
        entries all lie on this rank are decided here alone (`selection.row_top_k`, whole segments a block at a
        time); only the segments cut between ranks go through radix rounds."""
        result = self.zeros() if into is None else into
        out = result.view(-1)
        src = Source(values, True, self._eligible(inside, outside, rows))
        local = self._counts(src.ok, local_only=True)
        per_row = self.all_reduce(local.clone())
        kk = torch.minimum(torch.as_tensor(k, dtype=torch.int64, device=self.device).expand(self.n_rows), per_row)
        shared = self.all_reduce(((local > 0) & (local < per_row)).to(torch.int64)) > 0  # alike on every rank
        own_k = torch.where(shared, 0, kk)
        if self.entries.run is not None:
            spans = _own_rows_of_run(src, self.entries, own_k, ties, out, assign, shared)
        else:
            _own_rows_compacted(src, self.entries, own_k, shared, ties, out, assign)
            spans = None
        ids = shared.nonzero().squeeze(1)
        if ids.numel():
            slot = torch.full((self.n_rows,), -1, dtype=torch.int64, device=self.device)
            slot[ids] = torch.arange(ids.numel(), device=self.device)
            radix_select(src, self.entries, kk[ids], ties, self.all_reduce, out, spans=spans,
                         segment=lambda a, b: self.entries.per_row(slot, a, b), n_seg=ids.numel(),
                         digits=ROW_DIGITS, assign=assign)
        return result


class _Ranked(Source):
    """|values| order with the entries of some rows ranked below every other (dead rows: regrown last)."""

    def __init__(self, values: Optional[torch.Tensor], last: torch.Tensor, eligible) -> None:
        super().__init__(values, True, eligible)
        self.last, self.constant = last.reshape(-1), False

    def keys(self, a: int, b: int, step: int = 1) -> torch.Tensor:
        last = self.last[a:b:step]
        base = torch.zeros(last.numel(), dtype=torch.int32, device=last.device) if self.values is None \
            else super().keys(a, b, step)  # magnitude keys: >= 0
        return torch.where(last, -1, base)


def _own_rows_of_run(src: Source, entries: Entries, k: torch.Tensor, ties: Ties, out: torch.Tensor, assign: bool,
                     shared: torch.Tensor) -> list[tuple[int, int]]:
    """row_top's segments held whole here, for a contiguous run: blocks of whole segments read in place (the
    first and the last padded when the run cuts them). Returns the local spans of the segments cut between
    ranks."""
    n, start, cols = entries.n, entries.run, entries.row_len
    if n == 0:
        return []
    first, last = start // cols, (start + n - 1) // cols
    per_block = max(1, block(out.device) // cols)
    for r0 in range(first, last + 1, per_block):
        r1 = min(last + 1, r0 + per_block)
        a, b = max(0, r0 * cols - start), min(n, r1 * cols - start)
        pad = a - (r0 * cols - start)
        in_shared = shared[r0:r1].repeat_interleave(cols)[pad:pad + b - a]
        if not bool((k[r0:r1] > 0).any()):  # nothing chosen in these rows: with `assign` their eligible entries clear
            if assign:
                ok = src.ok(a, b)
                out[a:b] &= in_shared if ok is None else ~(ok & ~in_shared)
            continue
        sel, ok = _padded_row_top(src, a, b, pad, r0, r1, cols, k, ties, out.device)
        if assign:  # rows cut between ranks are assigned by the collective pass, not here
            ok = ~in_shared if ok is None else ok & ~in_shared
        emit_choice(out, a, b, sel, ok, assign)
    spans = []
    if bool(shared[first]):
        spans.append((0, min(n, (first + 1) * cols - start)))
    if last > first and bool(shared[last]):
        spans.append((last * cols - start, n))
    return spans


def _padded_row_top(src: Source, a: int, b: int, pad: int, r0: int, r1: int, cols: int, k: torch.Tensor,
                    ties: Ties, dev) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The per-row choice of entries a .. b (rows r0 .. r1 of the layer, the first starting `pad` entries
    before a), and their eligibility."""
    values, ok = src.floats(a, b, dev), src.ok(a, b)
    okp = ok
    if pad or b - a != (r1 - r0) * cols:  # a row the run cuts: padded with ineligible entries
        dense = torch.zeros((r1 - r0) * cols, device=dev)
        dense[pad:pad + b - a] = values
        okp = torch.zeros((r1 - r0) * cols, dtype=torch.bool, device=dev)
        okp[pad:pad + b - a] = True if ok is None else ok
        values = dense
    sel = row_top_k(values.view(r1 - r0, cols), k[r0:r1], ties,
                    eligible=None if okp is None else okp.view(r1 - r0, cols),
                    row_ids=torch.arange(r0, r1, device=dev)).reshape(-1)[pad:pad + b - a]
    return sel, ok


def _own_rows_compacted(src: Source, entries: Entries, k: torch.Tensor, shared: torch.Tensor, ties: Ties,
                        out: torch.Tensor, assign: bool) -> None:
    """row_top's segments held whole here, for entries that are not a contiguous run (explicit indices, a
    transposed storage): the rank's eligible entries of those rows compacted into a dense table (O(entries))."""
    n, dev, cols = entries.n, out.device, entries.row_len
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
