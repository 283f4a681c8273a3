"""Sort-based references of dstlm's selections, and the decision check built on them (tests and benchmarks only).

`reference_top_k` and `reference_row_top_k` choose what dstlm's selector chooses (by value descending, ties by
the keyed hash of the flat index) by sorting composite (value, hash) keys of the whole tensor: slow, and
obviously right. `ReferenceSelector` is a whole-matrix selector built on them; `reference_selection(engine)`
makes the engine decide every whole matrix with it, and `ReferenceCheck` decides every sharded mask update
again whole with it from gathered weights and scores, stopping the run at any difference
(tests/helpers/dst_run.py's DSTLM_CHECK_REFERENCE).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch

from dstlm.sparse.checks import MaskMismatchError
from dstlm.sparse.masks import param_name
from dstlm.sparse.selection import Ties, count

INT64_MIN = -(2**63)



def order_keys(score: torch.Tensor, ties: Ties, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 keys whose order is (score desc, hash desc): the float's order-preserving bits above the hash of
    each entry's index (`index`, same shape; default: its flat position)."""
    b = score.reshape(-1).float().contiguous().view(torch.int32).to(torch.int64)
    b = torch.where(b < 0, b ^ 0x7FFFFFFF, b)
    index = torch.arange(b.numel(), device=score.device) if index is None else index.reshape(-1)
    return ((b << 32) | ties.hash(index)).view(score.shape)


def reference_top_k(score: torch.Tensor, k: int, ties: Ties, eligible: Optional[torch.Tensor] = None,
                    n_eligible: Optional[int] = None) -> torch.Tensor:
    keys = order_keys(score, ties).reshape(-1)
    if eligible is not None:
        keys = keys.masked_fill(~eligible.reshape(-1), INT64_MIN)
        k = min(k, int(eligible.sum()))
    out = torch.zeros(keys.numel(), dtype=torch.bool, device=score.device)
    out[torch.argsort(keys, descending=True)[: max(0, k)]] = True
    return out.view(score.shape)


def reference_row_top_k(score: torch.Tensor, k: Union[int, torch.Tensor], ties: Ties,
                        eligible: Optional[torch.Tensor] = None,
                        row_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    rows, cols = score.shape
    index = None
    if row_ids is not None:
        index = row_ids[:, None] * cols + torch.arange(cols, device=score.device)
    keys = order_keys(score, ties, index)
    kk = torch.as_tensor(k, dtype=torch.int64, device=score.device).expand(rows).clamp(0, cols)
    if eligible is not None:
        keys = keys.masked_fill(~eligible, INT64_MIN)
        kk = torch.minimum(kk, eligible.sum(dim=1))
    ranks = torch.argsort(torch.argsort(keys, dim=1, descending=True), dim=1)
    return ranks < kk[:, None]


def _and(x: Optional[torch.Tensor], y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if x is None:
        return y
    return x if y is None else x & y


class ReferenceSelector:
    """dstlm's selector interface (dstlm/sparse/selectors.py) over a whole [R, C] matrix, choosing by sorting."""

    def __init__(self, shape: tuple[int, int], device=None, seg_len: Optional[int] = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.numel = self.shape[0] * self.shape[1]
        self.device = device
        self.seg_len = self.shape[1] if seg_len is None else int(seg_len)
        self.n_rows = self.numel // self.seg_len

    def grouped(self, m: int) -> "ReferenceSelector":
        return ReferenceSelector(self.shape, self.device, m)

    def _seg(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.n_rows, self.seg_len)

    def count(self, x: torch.Tensor) -> int:
        return count(x)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=torch.bool, device=self.device)

    def in_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(torch.bool)[:, None].expand(self.n_rows, self.seg_len).reshape(self.shape)

    def _eligible(self, inside, outside, rows) -> Optional[torch.Tensor]:
        e = None if inside is None else self._seg(inside)
        e = _and(e, None if outside is None else ~self._seg(outside))
        if rows is not None:
            e = _and(e, rows.to(torch.bool)[:, None].expand(self.n_rows, self.seg_len))
        return e

    def _ranked(self, values: Optional[torch.Tensor], last_rows=None) -> torch.Tensor:
        v = torch.zeros(self.shape, device=self.device) if values is None else values.abs().float()
        if last_rows is not None:
            v = torch.where(self.in_rows(last_rows), torch.full_like(v, -1.0), v)
        return v

    def row_counts(self, inside=None, outside=None, rows=None) -> torch.Tensor:
        e = self._eligible(inside, outside, rows)
        if e is None:
            return torch.full((self.n_rows,), self.seg_len, dtype=torch.int64, device=self.device)
        return e.sum(dim=1)

    def top(self, values, k, ties, *, inside=None, outside=None, rows=None, last_rows=None, total=None,
            into=None):
        e = self._eligible(inside, outside, rows)
        chosen = reference_top_k(self._ranked(values, last_rows), k, ties,
                                 None if e is None else e.reshape(self.shape))
        return chosen if into is None else into.logical_or_(chosen)

    def top_row_counts(self, values, k, ties, *, outside=None, total=None):
        return self._seg(self.top(values, k, ties, outside=outside, total=total)).sum(dim=1)

    def row_top(self, values, k, ties, *, inside=None, outside=None, rows=None, into=None, assign=False):
        v = self._seg(self._ranked(values))
        e = self._eligible(inside, outside, None)
        kk = torch.as_tensor(k, dtype=torch.int64, device=v.device).expand(self.n_rows)
        if rows is not None:  # rows outside the marked ones choose nothing and, with assign, keep their entries
            kk = torch.where(rows.to(torch.bool), kk, 0)
            keep = ~rows.to(torch.bool)[:, None]
            e = keep.logical_not().expand_as(v) if e is None else e & ~keep
        out = self.zeros() if into is None else into
        chosen = reference_row_top_k(v, kk, ties, eligible=e)
        seg_out = self._seg(out)
        if assign:
            seg_out.copy_(chosen if e is None else torch.where(e, chosen, seg_out))
        else:
            seg_out |= chosen
        return out


@contextlib.contextmanager
def reference_selection(engine) -> Iterator[None]:
    """The engine decides every whole matrix with the sort-based reference inside."""
    saved, engine.decider.selector = engine.decider.selector, ReferenceSelector
    try:
        yield
    finally:
        engine.decider.selector = saved


class ReferenceCheck:
    """An observer of an engine's decisions (`engine.decider.observers`): every decision taken on shards is
    taken again whole, from the gathered weights and scores, with the reference selection; a difference stops
    the run (MaskMismatchError). Costs the gathers: for tests and debugging."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __call__(self, group, u, old: torch.Tensor, new: torch.Tensor) -> None:
        if not u.sharded:
            return
        layers = self.engine.layers
        scores = u.scores.joined([group], u.backend, u.masks.size)
        fan_in = {sp.name: layers[sp.name].fan_in for sp in group}
        try:
            with reference_selection(self.engine):
                reference = self.engine.decider.local(group, u, u.backend.full_weight(group[0].weight).detach(), old,
                                                      lambda sp: scores.get(sp.name))
        finally:
            for sp in group:  # as the sharded rule set it
                layers[sp.name].fan_in = fan_in[sp.name]
        reference = reference.reshape(new.shape)
        if not torch.equal(reference, new):
            raise MaskMismatchError(f"{param_name(group)}: the sharded decision at step {u.t} differs from the "
                                    f"whole-tensor reference in {count(reference != new)} entries")


def check_decisions(engine) -> None:
    """Install a ReferenceCheck on the engine."""
    engine.decider.observers.append(ReferenceCheck(engine))
