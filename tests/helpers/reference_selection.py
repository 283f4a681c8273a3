"""Sort-based references of dstlm's selections, and the decision check built on them (tests and benchmarks only).

`reference_top_k` and `reference_row_top_k` choose the same sets as `selection.top_k` and `row_top_k` (by value
descending, ties by the keyed hash of the flat index) by sorting composite (value, hash) keys of the whole
tensor: slow, and obviously right. `reference_selection()` routes the local selector to them, and
`ReferenceCheck` decides every sharded mask update again whole with them from gathered weights and scores,
stopping the run at any difference (tests/helpers/dst_run.py's DSTLM_CHECK_REFERENCE).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Union

import torch

from dstlm.sparse import selectors
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


@contextlib.contextmanager
def reference_selection() -> Iterator[None]:
    """The local selector (and the collective one's rows held whole) choose with the references inside."""
    saved = selectors.top_k, selectors.row_top_k
    selectors.top_k, selectors.row_top_k = reference_top_k, reference_row_top_k
    try:
        yield
    finally:
        selectors.top_k, selectors.row_top_k = saved


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
            with reference_selection():
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
