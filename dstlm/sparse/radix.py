"""Exact selection over a matrix's entries wherever they are (one process, or split across ranks), one block of
entries at a time: the engine under the selector (dstlm/sparse/selectors.py).

A selection picks, in every segment s (the whole layer, a row, an N:M group), the k[s] eligible entries that
come first in (value desc, hash of the entry's flat index in the layer desc) order over every rank's entries.
It finds two thresholds per segment: the k-th value T (radix selection on the value's order-preserving 32 bits,
a few digits per round, one all-reduced histogram per round) and, when T is tied and only some of the tied
entries fit, the hash H the last of them has (the same rounds over their 32-bit hashes). An entry is chosen
when its value is above T, or equals it with a hash at or above H. The thresholds depend only on the union of
the entries, so every rank decides its own entries alike, whatever the split.

A layer-wide selection's first round starts from a sample (every 64th entry): its all-reduced histogram
brackets the digit of the k-th value, one pass counts the entries above the bracket and keeps the keys inside
it, and the first round reads those alone (`_bracket`); a bracket that misses costs the full first round.

Memory: no per-entry tensor of the rank's whole fragment. Every pass reads `block()` entries at a time (256K
on the CPU, 1M on a GPU), computing keys, eligibility and flat indices on the fly (`Entries`); once at most
four blocks' worth of entries are left over all ranks their keys are kept and later rounds read only those.
The choice is written into a caller's bool buffer (`out`) block by block, so a rule can grow into the buffer
whose complement is the eligible set (RigL's keep, then its grow).

Communication: every rank runs the same rounds whatever entries it holds (none included), so collectives stay
in step: 3 rounds (13, 10, 9 bits) for a layer-wide selection, 4 (8 bits each) per-row, as many over hashes
when a threshold is tied.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from dstlm.sparse.selection import Ties

AllReduce = Callable[[torch.Tensor], torch.Tensor]
Eligible = Callable[..., Optional[torch.Tensor]]  # (a, b, step=1): eligibility of every step-th of a .. b
Segment = Callable[[int, int], torch.Tensor]

LAYER_DIGITS = (13, 10, 9)  # a first round of 13 bits (sign, exponent, 4 mantissa bits) leaves ~1/100 of
# |W| or |grad| entries, which the next rounds then read alone (11 bits left ~1/30; 16 cost more in histograms)
ROW_DIGITS = (8, 8, 8, 8)
INT32_MIN = -(2**31)
CPU_BLOCK, GPU_BLOCK = 1 << 18, 1 << 20
SAMPLE_EVERY = 64  # a layer-wide selection's first round brackets the k-th key from every 64th entry
_KEEP_BLOCKS = 4  # the rounds after the first keep the entries left once they are at most 4 blocks' worth
_BLOCK: Optional[int] = None


def block(device: Optional[torch.device] = None) -> int:
    """Entries a pass reads at a time, unless set by `block_size`: 256K on the CPU, 1M on a GPU (where fewer,
    larger kernels pay); the working set is a few tens of bytes per entry of one block (~10 MB, ~40 MB)."""
    if _BLOCK is not None:
        return _BLOCK
    return GPU_BLOCK if device is not None and torch.device(device).type == "cuda" else CPU_BLOCK


@contextlib.contextmanager
def block_size(n: int) -> Iterator[None]:
    """Read `n` entries at a time inside the block, on every device (tests make it small to cross block edges)."""
    global _BLOCK
    if n < 1:
        raise ValueError(f"block size {n} must be >= 1")
    before, _BLOCK = _BLOCK, int(n)
    try:
        yield
    finally:
        _BLOCK = before


def blocks(spans: list[tuple[int, int]], device: Optional[torch.device] = None) -> Iterator[tuple[int, int]]:
    step = block(device)
    for a, b in spans:
        for lo in range(a, b, step):
            yield lo, min(b, lo + step)


class Entries:
    """Which entries of an [R, C] matrix a rank holds, in its local order, with their flat [R, C] indices made on
    demand for a block or a few positions, never for the whole fragment at once: a contiguous run of the layer
    (start + position), a run of a transposed storage ([C, R] storage: position q is entry (q % R) * C + q // R,
    e.g. Hugging Face's Conv1D), or any explicit index tensor."""

    def __init__(self, n: int, cols: int, device: torch.device, start: Optional[int] = None,
                 index: Optional[torch.Tensor] = None, storage_rows: Optional[int] = None) -> None:
        if (start is None) == (index is None):
            raise ValueError("Entries: give either start (a run) or index (explicit indices)")
        self.n, self.cols, self.device = int(n), int(cols), torch.device(device)
        self.start, self._index, self.storage_rows = start, index, storage_rows
        self.row_len = self.cols

    def grouped(self, row_len: int) -> "Entries":
        """The same entries with `rows()` counting runs of `row_len` flat indices (N:M's groups) as rows."""
        other = Entries(self.n, self.cols, self.device, self.start, self._index, self.storage_rows)
        other.row_len = int(row_len)
        return other

    @classmethod
    def of(cls, index, cols: int = 1) -> "Entries":
        """`index` as Entries: already Entries, or an explicit int64 tensor of flat indices."""
        if isinstance(index, Entries):
            return index
        index = index.reshape(-1)
        return cls(index.numel(), cols, index.device, index=index)

    @property
    def run(self) -> Optional[int]:
        """The layer index of entry 0 when the entries are the contiguous run run .. run + n, else None."""
        return self.start if self._index is None and self.storage_rows is None else None

    def _from_storage(self, q: torch.Tensor) -> torch.Tensor:
        if self.storage_rows is None:
            return q
        return (q % self.storage_rows) * self.cols + q // self.storage_rows

    def index(self, a: int, b: int) -> torch.Tensor:
        """int64 flat indices of entries a .. b."""
        if self._index is not None:
            return self._index[a:b]
        return self._from_storage(torch.arange(self.start + a, self.start + b, device=self.device))

    def index_at(self, pos: torch.Tensor) -> torch.Tensor:
        if self._index is not None:
            return self._index[pos]
        return self._from_storage(pos + self.start)

    def rows(self, a: int, b: int) -> torch.Tensor:
        """int64 row of entries a .. b (rows of `row_len` flat indices)."""
        return self.index(a, b) // self.row_len

    def per_row(self, values: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """values[row of each entry a .. b] (values: one per row): for a run, each row's value repeated over its
        entries, with no per-entry index or division."""
        if self.run is None:
            return values[self.rows(a, b)]
        first, last = (self.start + a) // self.row_len, (self.start + b - 1) // self.row_len
        off = self.start + a - first * self.row_len
        return values[first:last + 1].repeat_interleave(self.row_len)[off:off + b - a]

    def add_row_counts(self, counts: torch.Tensor, sel: Optional[torch.Tensor], a: int, b: int) -> None:
        """counts[row] += the entries a .. b of each row that `sel` (bool over them; None: all) selects."""
        if b <= a:
            return
        if self.run is None:
            rows = self.rows(a, b)
            counts += torch.bincount(rows if sel is None else rows[sel], minlength=counts.numel())
            return
        first, last = (self.start + a) // self.row_len, (self.start + b - 1) // self.row_len
        off = self.start + a - first * self.row_len
        padded = torch.zeros((last - first + 1) * self.row_len, dtype=torch.bool, device=counts.device)
        padded[off:off + b - a] = True if sel is None else sel
        counts[first:last + 1] += torch.count_nonzero(padded.view(-1, self.row_len), dim=1)

    def all(self) -> torch.Tensor:
        """Every entry's flat index (one int64 tensor of the fragment: for the paths that are not streamed)."""
        return self.index(0, self.n)


def order_bits(values: torch.Tensor, magnitude: bool) -> torch.Tensor:
    """int64 in [0, 2^32), increasing with |value| (magnitude) or with the float32 value (-0.0 counted as +0.0)."""
    return order_key(values, magnitude).to(torch.int64) - INT32_MIN


def order_key(values: torch.Tensor, magnitude: bool) -> torch.Tensor:
    """int32 whose signed order is the order of |value| (magnitude: the float's bits without the sign, >= 0) or
    of the float32 value (the bits sign-folded; -0.0 counted as +0.0)."""
    b = values.float().contiguous().view(torch.int32)
    if magnitude:
        return b & 0x7FFFFFFF
    b = (values.float() + 0.0).contiguous().view(torch.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def hash_key(ties: Ties, index: torch.Tensor) -> torch.Tensor:
    """int32 whose signed order is the order of the 32-bit tie-break hashes of `index`."""
    return (ties.hash(index) + INT32_MIN).to(torch.int32)


class Source:
    """What one selection orders, a block at a time: the values' order bits (|values| when `magnitude`; all
    equal when values is None, e.g. SET's random growth, which is then decided by the hash alone) and which
    entries are eligible (`eligible(a, b)`: bool over entries a .. b, None for all)."""

    def __init__(self, values: Optional[torch.Tensor], magnitude: bool = True,
                 eligible: Optional[Eligible] = None) -> None:
        self.values = None if values is None else values.reshape(-1)
        self.magnitude, self._eligible = magnitude, eligible
        self.constant = values is None
        """Every key equal (keys() None): the hash alone orders the entries."""

    def keys(self, a: int, b: int, step: int = 1) -> Optional[torch.Tensor]:
        """int32 signed-order keys of entries a .. b (every step-th; None when all are equal)."""
        return None if self.values is None else order_key(self.values[a:b:step], self.magnitude)

    def ok(self, a: int, b: int, step: int = 1) -> Optional[torch.Tensor]:
        """Eligibility of every step-th entry of a .. b (None: all eligible)."""
        return None if self._eligible is None else self._eligible(a, b, step)

    def floats(self, a: int, b: int, device: torch.device) -> torch.Tensor:
        """fp32 of entries a .. b in the order's sense (|values|, or zeros when all are equal)."""
        if self.values is None:
            return torch.zeros(b - a, device=device)
        v = self.values[a:b].float()
        return v.abs() if self.magnitude else v


def _and(x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if x is None:
        return y
    return x if y is None else x & y


class _Rounds:
    """Radix rounds over int32 signed-order keys, per segment: the digits chosen so far (`prefix`, low bits 0),
    the entries above them (`above`), and those at the last chosen digit (`at`), over every rank."""

    def __init__(self, n_seg: int, device: torch.device) -> None:
        self.n_seg, self.device = n_seg, device
        self.prefix = torch.zeros(n_seg, dtype=torch.int32, device=device)
        self.above = torch.zeros(n_seg, dtype=torch.int64, device=device)
        self.at: Optional[torch.Tensor] = None
        self.hi = 32

    def matching(self, key, seg, ok):
        """Eligible entries whose bits above `hi` are the prefix chosen so far."""
        if self.hi >= 32:
            return ok
        pre = self.prefix[0] if seg is None else self.prefix[seg.clamp_min(0)]
        return _and(ok, (key >> self.hi) == (pre >> self.hi))  # arithmetic shifts on both: the same top bits

    def histogram(self, parts, first: bool, lo: int, nb: int) -> torch.Tensor:
        """This rank's counts per (segment, digit) of the matching entries (the first digit read as signed)."""
        hist = torch.zeros(self.n_seg * nb + 1, dtype=torch.int64, device=self.device)  # + one for the ineligible
        for key, seg, *rest in parts:
            ok = self.matching(key, seg, rest[0] if rest else None)
            slot = (key >> lo) + (nb >> 1) if first else (key >> lo) & (nb - 1)
            if seg is not None:
                slot = slot + seg.clamp_min(0).to(torch.int32) * nb
            if ok is not None:
                slot = torch.where(ok, slot, self.n_seg * nb)
            hist += torch.bincount(slot, minlength=self.n_seg * nb + 1)
        return hist[:-1].contiguous()

    def choose(self, h: torch.Tensor, k: torch.Tensor, first: bool, lo: int, nb: int) -> None:
        """Take, per segment, the digit where the k-th largest key lies, from the all-reduced histogram `h`."""
        from_top = torch.flip(h, [1]).cumsum(1)
        j = torch.searchsorted(from_top, (k - self.above).clamp_min(1)[:, None]).squeeze(1).clamp_max(nb - 1)
        self.above += torch.where(j > 0, from_top.gather(1, (j - 1).clamp_min(0)[:, None]).squeeze(1), 0)
        d = nb - 1 - j
        self.prefix |= ((d - (nb >> 1)) << lo if first else d << lo).to(torch.int32)
        self.at = h.gather(1, d[:, None]).squeeze(1)
        self.hi = lo

    def collect(self, produce: Callable[[], Iterator]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The keys (and segments) of every matching entry, kept for the later rounds."""
        keys, segs = [], []
        for key, seg, *rest in produce():
            keep = self.matching(key, seg, rest[0] if rest else None)
            keep = keep.nonzero().squeeze(1) if keep is not None else slice(None)
            keys.append(key[keep])
            segs.append(None if seg is None else seg[keep])
        key = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int32, device=self.device)
        seg = None if (not segs or segs[0] is None) else torch.cat(segs)
        if seg is None and self.n_seg > 1:
            seg = torch.zeros(0, dtype=torch.int64, device=self.device)
        return key, seg


def _find(produce: Callable[[], Iterator], k: torch.Tensor, n_seg: int, digits: tuple[int, ...],
          all_reduce: AllReduce, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Radix rounds over the int32 signed-order keys `produce()` yields as (key, segment or None, eligible or
    None) per block, in every segment: the k-th largest key T (int32), how many are above it, how many sit at
    it, and k clamped to the segment's eligible entries, all over every rank. The first digit is the key's
    top bits read as signed (offset to 0 .. 2^bits - 1), the others unsigned. Once a round leaves at most four
    blocks of entries over all ranks, those entries' keys are kept and later rounds read them, not the blocks."""
    rounds = _Rounds(n_seg, device)
    live: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
    for r, bits in enumerate(digits):
        lo, nb = rounds.hi - bits, 1 << bits
        h = all_reduce(rounds.histogram([live] if live is not None else produce(), r == 0, lo, nb)).view(n_seg, nb)
        if r == 0:
            k = torch.minimum(k, h.sum(1))
        rounds.choose(h, k, r == 0, lo, nb)
        if r + 1 == len(digits):
            break
        if live is not None:
            keep = rounds.matching(*live, None)
            live = (live[0][keep], None if live[1] is None else live[1][keep])
        elif int(rounds.at[k > 0].sum()) <= _KEEP_BLOCKS * block(device):  # few left over all ranks (alike)
            live = rounds.collect(produce)
    return rounds.prefix, rounds.above, rounds.at, k


def radix_select(src: Source, entries: Entries, k: torch.Tensor, ties: Ties, all_reduce: AllReduce,
                 out: torch.Tensor, spans: Optional[list[tuple[int, int]]] = None,
                 segment: Optional[Segment] = None, n_seg: int = 1,
                 digits: tuple[int, ...] = LAYER_DIGITS, assign: bool = False, fresh: bool = False) -> None:
    """In every segment s over all ranks, choose the k[s] first eligible entries in (value desc, hash of flat
    index desc) order, and write this rank's choice into `out` (bool [entries.n]): out |= chosen, or with
    `assign`, out = chosen at every eligible entry. `spans`: the local positions taking part (all by
    default); `segment(a, b)`: each entry's segment (-1: none) when n_seg > 1. Every rank calls it with the
    same k, n_seg and digits (collectives inside), whatever entries it holds. `out` may instead be a function,
    called with (a, b, chosen) for every block (e.g. to count the chosen entries without storing them).
    `fresh`: `out` is all False and no eligibility reads it (a layer-wide choice may then write ahead, see
    _Bracketed)."""
    sel = _Selection(src, entries, segment, [(0, entries.n)] if spans is None else spans)
    k = k.to(device=entries.device, dtype=torch.int64).reshape(n_seg).clone()
    if segment is None and not src.constant and not assign and \
            _Bracketed(sel, ties, all_reduce, digits, out, fresh).select(int(k[0])):
        return
    thr, h_thr, k, tied = sel.thresholds(k, ties, n_seg, digits, all_reduce)
    simple = segment is None and h_thr is None and not src.constant and not assign
    for a, b in blocks(sel.spans, entries.device):
        if simple and not bool(k[0] > 0):
            break
        chosen, ok = sel.block(a, b, thr, h_thr, k, tied, ties, simple)
        emit_choice(out, a, b, chosen, ok, assign)


class _Selection:
    """One radix selection's blocks: keys, segments and eligibility of entries a .. b, and its thresholds."""

    def __init__(self, src: Source, entries: Entries, segment: Optional[Segment], spans: list) -> None:
        self.src, self.entries, self.segment, self.spans = src, entries, segment, spans

    def load(self, a: int, b: int):
        ok = self.src.ok(a, b)
        seg = self.segment(a, b) if self.segment is not None else None
        if seg is not None:
            ok = _and(ok, seg >= 0)
        return self.src.keys(a, b), seg, ok

    def thresholds(self, k, ties, n_seg, digits, all_reduce):
        """(value threshold T, hash threshold H or None, k clamped, tied): per segment, entries above T are
        chosen, and those at T with a hash at or above H (all of them where H is None or not tied)."""
        device = self.entries.device
        if not self.src.constant:
            thr, above, at, k = _find(lambda: (self.load(a, b) for a, b in blocks(self.spans, device)), k, n_seg,
                                      digits, all_reduce, device)
            need = k - above
            tied = (k > 0) & (need < at)  # the threshold is tied and only some of the tied entries fit
        else:  # all values equal: the hash alone orders the eligible entries
            thr = torch.zeros(n_seg, dtype=torch.int32, device=device)
            need, tied = k, k > 0
        if not bool(tied.any()):
            return thr, None, k, tied

        def hashes():
            for a, b in blocks(self.spans, device):
                key, seg, ok = self.load(a, b)
                pos = _at_threshold(key, seg, ok, thr, tied, b - a, device).nonzero().squeeze(1)
                yield hash_key(ties, self.entries.index_at(pos + a)), None if seg is None else seg[pos]

        h_thr, _, _, _ = _find(hashes, torch.where(tied, need, 0), n_seg, digits, all_reduce, device)
        return thr, h_thr, k, tied

    def block(self, a, b, thr, h_thr, k, tied, ties, simple: bool):
        """The choice among entries a .. b, and their eligibility."""
        key, seg, ok = self.load(a, b)
        if simple:  # one segment, every entry at the threshold taken: value >= T
            chosen = key >= thr[0]
            return (chosen if ok is None else chosen & ok), ok
        device = self.entries.device
        s = None if seg is None else seg.clamp_min(0)
        live = (k[0] > 0) if seg is None else (k[s] > 0)
        chosen = torch.zeros(b - a, dtype=torch.bool, device=device) if key is None else \
            key > (thr[0] if seg is None else thr[s])
        eq = _at_threshold(key, seg, ok, thr, k > 0, b - a, device)
        if h_thr is not None:
            pos = (eq & (tied[0] if seg is None else tied[s])).nonzero().squeeze(1)
            if pos.numel():
                hs = hash_key(ties, self.entries.index_at(pos + a))
                eq[pos[hs < (h_thr[0] if seg is None else h_thr[s[pos]])]] = False
        return _and(_and(chosen, live), ok) | eq, ok


class _Bracketed:
    """A layer-wide selection in one pass over the entries, most of the time. A sample (every SAMPLE_EVERY-th
    entry), its first-digit histogram all-reduced, brackets the keys that can hold the k-th largest. One pass
    then counts the entries above the bracket (written to `out` ahead when it is fresh, since they are chosen if
    the bracket holds; else their positions kept while they are few) and keeps the keys and positions of those
    inside it; the radix rounds run over those alone, and the chosen ones are written at their positions (a
    second pass only when the entries above the bracket were too many to keep and not written ahead). When the
    bracket misses over all ranks (a misleading sample) or holds too many entries, the writes ahead are undone
    and `select` returns False: every rank then takes the full rounds alike (the counts are all-reduced)."""

    def __init__(self, sel: "_Selection", ties: Ties, all_reduce: AllReduce, digits: tuple[int, ...], out,
                 fresh: bool) -> None:
        self.sel, self.ties, self.all_reduce, self.digits, self.out = sel, ties, all_reduce, digits, out
        self.ahead = fresh and not callable(out)  # above-bracket entries written during the pass
        self.device = sel.entries.device
        self.limit = _KEEP_BLOCKS * block(self.device)

    def select(self, want: int) -> bool:
        if want <= 0:
            return True
        lowest, highest = self._bounds(want)
        n_above, keys, pos, n_in, above_pos = self._scan(lowest, highest)
        above, n_in = self.all_reduce(torch.cat([n_above, n_above.new_tensor([n_in])])).tolist()
        if not above < want <= above + n_in or n_in > self.limit:
            if self.ahead:
                self._emit(highest, None, undo=True)
            return False
        chosen = pos[self._choose(keys, pos, want, above)]
        if self.ahead:
            self.out[chosen.long()] = True
        elif above_pos is not None:
            self._write(torch.cat([above_pos, chosen]))
        else:
            self._emit(highest, chosen)
        return True

    def _write(self, positions: torch.Tensor) -> None:
        """The chosen entries, at their positions, into `out` (a function: block by block)."""
        if not callable(self.out):
            self.out[positions.long()] = True
            return
        positions = positions.sort().values
        for a, b in blocks(self.sel.spans, self.device):
            chosen = torch.zeros(b - a, dtype=torch.bool, device=self.device)
            chosen[self._in_block(positions, a, b)] = True
            self.out(a, b, chosen)

    def _in_block(self, positions: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Of sorted positions, those in a .. b, as offsets into the block."""
        lo, hi = torch.searchsorted(positions, torch.tensor([a, b], dtype=positions.dtype,
                                                            device=self.device)).tolist()
        return positions[lo:hi].long() - a

    def _bounds(self, want: int) -> tuple[int, int]:
        """The bracket's lowest and highest int32 keys, from the all-reduced sample."""
        lo, nb = 32 - self.digits[0], 1 << self.digits[0]
        hist = torch.zeros(nb, dtype=torch.int64, device=self.device)
        for a, b in blocks(self.sel.spans, self.device):
            key, ok = self.sel.src.keys(a, b, SAMPLE_EVERY), self.sel.src.ok(a, b, SAMPLE_EVERY)
            hist += torch.bincount(((key if ok is None else key[ok]) >> lo) + (nb >> 1), minlength=nb)
        est = torch.flip(self.all_reduce(hist), [0]).cumsum(0).cpu() * SAMPLE_EVERY  # at or above each digit
        slack = 4.0 * (want * SAMPLE_EVERY) ** 0.5 + 16 * SAMPLE_EVERY
        bounds = torch.tensor([max(0.0, want - slack), want + slack], device=est.device).long()
        top, bottom = torch.searchsorted(est, bounds).tolist()
        return ((nb >> 1) - 1 - min(bottom, nb - 1)) << lo, ((nb >> 1) - top << lo) - 1

    def _scan(self, lowest: int, highest: int):
        """(entries above the bracket here, the keys inside it, their positions, how many are inside, and the
        positions of those above it when kept)."""
        n_above = torch.zeros(1, dtype=torch.int64, device=self.device)
        keys, pos, n_in, above_pos, n_kept = [], [], 0, [], 0  # above_pos: None once too many (or written ahead)
        index_type = torch.int32 if self.sel.entries.n < 2**31 else torch.int64
        for a, b in blocks(self.sel.spans, self.device):
            key, _, ok = self.sel.load(a, b)
            q_up, q_in, k_in = self._split(key, ok, lowest, highest, a, b)
            n_above += q_up if self.ahead else q_up.numel()
            if above_pos is not None and not self.ahead:  # kept while few (a grow's are about k)
                n_kept += q_up.numel()
                above_pos.append((q_up + a).to(index_type))
                if n_kept > self.limit:
                    above_pos = None
            n_in += q_in.numel()
            if n_in <= self.limit:
                keys.append(k_in)
                pos.append((q_in + a).to(index_type))
        above_pos = None if above_pos is None or self.ahead else self._cat(above_pos, index_type)
        return n_above, self._cat(keys, torch.int32), self._cat(pos, index_type), n_in, above_pos

    def _split(self, key, ok, lowest: int, highest: int, a: int, b: int):
        """Of one block: the entries above the bracket (written ahead, and their count; else their block
        positions, found with the bracket's by one nonzero), and the positions and keys of those inside it."""
        above = key > highest
        if self.ahead:
            inside = (key >= lowest) ^ above
            if ok is not None:
                above &= ok
                inside &= ok
            self.out[a:b] |= above
            q = inside.nonzero().squeeze(1)
            return torch.count_nonzero(above), q, key[q]
        reach = key >= lowest
        if ok is not None:
            reach &= ok
        q = reach.nonzero().squeeze(1)
        kq = key[q]
        up = kq > highest
        return q[up], q[~up], kq[~up]

    def _cat(self, parts: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=self.device)

    def _choose(self, keys: torch.Tensor, pos: torch.Tensor, want: int, above: int) -> torch.Tensor:
        """bool over the bracket's entries: chosen (radix rounds over them; ties by hash)."""
        rounds = _Rounds(1, self.device)
        rounds.above += above
        k, live = torch.tensor([want], device=self.device), keys
        for r, bits in enumerate(self.digits):
            lo, nb = rounds.hi - bits, 1 << bits
            rounds.choose(self.all_reduce(rounds.histogram([(live, None)], r == 0, lo, nb)).view(1, nb), k,
                          r == 0, lo, nb)
            live = live[rounds.matching(live, None, None)]
        thr, need = rounds.prefix[0], want - int(rounds.above[0])
        chosen, eq = keys > thr, keys == thr
        if need < int(rounds.at[0]):  # the threshold is tied and only some of the tied entries fit
            tied = eq.nonzero().squeeze(1)
            h = hash_key(self.ties, self.sel.entries.index_at(pos[tied].long()))
            h_thr = _find(lambda: iter([(h, None)]), torch.tensor([need], device=self.device), 1, self.digits,
                          self.all_reduce, self.device)[0]
            eq[tied[h < h_thr[0]]] = False
        return chosen | eq

    def _emit(self, highest: int, chosen: Optional[torch.Tensor], undo: bool = False) -> None:
        """Per block: the entries above the bracket with the chosen ones inside it (positions, sorted) written
        to `out`, or, `undo`, the entries above it cleared again."""
        for a, b in blocks(self.sel.spans, self.device):
            key, _, ok = self.sel.load(a, b)
            above = key > highest
            if ok is not None:
                above &= ok
            if undo:
                self.out[a:b] &= ~above
                continue
            above[self._in_block(chosen, a, b)] = True
            emit_choice(self.out, a, b, above, ok, False)


def emit_choice(out, a: int, b: int, chosen: torch.Tensor, ok: Optional[torch.Tensor], assign: bool) -> None:
    """Write a block's choice: to a function, or into the bool buffer (or-ed in, or assigned where eligible)."""
    if callable(out):
        out(a, b, chosen)
    elif assign:
        out[a:b] = chosen if ok is None else torch.where(ok, chosen, out[a:b])
    else:
        out[a:b] |= chosen


def _at_threshold(key, seg, ok, thr, live, n, device) -> torch.Tensor:
    """bool [n]: eligible entries of live segments whose key equals their segment's threshold."""
    if seg is None:
        eq = torch.full((n,), bool(live[0]), device=device) if key is None else (key == thr[0]) & live[0]
    else:
        s = seg.clamp_min(0)
        eq = live[s] if key is None else (key == thr[s]) & live[s]
    return eq if ok is None else eq & ok
