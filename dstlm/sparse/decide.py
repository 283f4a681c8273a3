"""One parameter's new mask, decided where its entries live.

The method's rule (methods.py, over rules.py) runs on every sparse matrix of the parameter with a selector
(selectors.py) over the entries it decides:
- the whole matrix in this process: one process, or every rank alike when the backend has no fragments;
- the whole matrix, by its owner alone: DDP replicas that give each parameter to one rank
  (`backend.whole_fragments`); the other ranks get an empty fragment;
- every rank's fragment (collectives inside): ZeRO's partitions, DDP split by entries, and partitioned masks.
`join` then makes the mask the store takes: whole masks joined from the ranks' fragments by one byte
all-reduce, or the rank's own fragment when masks are partitioned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from dstlm.sparse.connectivity import MaskCounts
from dstlm.sparse.density import Layer
from dstlm.sparse.masks import SparseParam, matrix_run
from dstlm.sparse.methods import DSTMethod, Shard
from dstlm.sparse.schedule import UpdateSchedule
from dstlm.sparse.scores import Scores
from dstlm.sparse.selection import Ties
from dstlm.sparse.selectors import Selector, whole

Group = list[SparseParam]


@dataclass
class Update:
    """One mask update's inputs, the same for every parameter."""

    t: int
    drop_fraction: float
    dead: dict[str, torch.Tensor]
    """Per producer matrix, its rows to reclaim (sparsity.reclaim_dead_units)."""
    before: dict[str, MaskCounts]
    sharded: bool
    backend: object
    masks: object
    """The store (storage.py)."""
    scores: Scores

    @property
    def by_owner(self) -> bool:
        return self.sharded and not self.masks.partitioned and self.backend.whole_fragments


class Decider:
    def __init__(self, method: DSTMethod, layers: dict[str, Layer], schedule: UpdateSchedule, tie_seed: int) -> None:
        self.method, self.layers, self.schedule, self.tie_seed = method, layers, schedule, tie_seed
        self.selector = whole
        """Makes the selector of a matrix decided whole (tests swap in a sort-based reference)."""
        self.observers: list[Callable] = []
        """Called as f(group, update, old, new) with each group's old and new whole masks (parameter-shaped),
        before the store takes the new one: tests check decisions against references there. On shards `old`
        and `new` are joined for it (a collective)."""

    def decide(self, group: Group, u: Update) -> torch.Tensor:
        """This rank's new mask of the group's parameter: parameter-shaped when decided whole; flat over the
        rank's fragment when decided on shards or by owner (empty on a rank that owns nothing of it)."""
        param, backend = group[0].weight, u.backend
        if self.method.uses_dense_grad and u.sharded and u.scores.fragment(group) is None:
            no_score(group[0])  # on every rank alike: no rank may wait in a collective the others skip
        if not u.sharded:
            return self.local(group, u, backend.full_weight(param).detach(), u.masks.local(group),
                              lambda sp: u.scores.whole.get(sp.name))
        start, n = backend.fragment(param)
        if not u.by_owner:
            return self.shards(group, u, start, n)
        full = u.masks.local(group)
        if n != full.numel():
            return torch.zeros(0, dtype=torch.bool, device=full.device)
        score = u.scores.fragment(group)
        whole_score = None if score is None else score.reshape(full.shape)
        weight = backend.local_weight(param).detach().reshape(full.shape)
        return self.local(group, u, weight, full, lambda sp: None if whole_score is None
                          else sp.view(whole_score)).reshape(-1)

    def local(self, group: Group, u: Update, full: torch.Tensor, old_full: torch.Tensor, score_of) -> torch.Tensor:
        """Every matrix of the group decided whole in this process from the parameter's weight `full` and mask
        `old_full`; the parameter-shaped new mask."""
        news = []
        for sp in group:
            layer = self.layers[sp.name]
            old = sp.view(old_full)
            w = sp.view(full).reshape(layer.shape).contiguous()  # [out, in] (a copy only for transposed storage)
            score = None
            if self.method.uses_dense_grad:
                score = score_of(sp)
                score = (score if score is not None else no_score(sp)).to(w.device).reshape(layer.shape)
            shard = Shard(w, old.to(w.device).contiguous(), score, self.selector(layer.shape, w.device))
            news.append(sp.to_storage(self.rule(sp, shard, u).to(old.device)))
        return news[0] if group[0].index is None else torch.stack(news)  # matrices in index order

    def shards(self, group: Group, u: Update, start: int, n: int) -> torch.Tensor:
        """Each matrix's entries in this rank's fragment decided through the collective selector (every rank
        calls it for every matrix); the fragment's new mask. No rank reads another's weights or scores."""
        old = u.masks.old(group, start, n)
        weight = u.backend.local_weight(group[0].weight).detach().reshape(-1)
        score = u.scores.fragment(group) if self.method.uses_dense_grad else None
        new = None  # a parameter with one matrix takes the rule's new mask itself (no second buffer)
        for sp in group:
            layer = self.layers[sp.name]
            base, a, b = matrix_run(sp, layer.shape, start, n)
            lo, hi = a - start, b - start
            select = Selector(sp.entries(a - base, b - a, old.device), layer.shape,
                                        u.backend.all_reduce_sum_)
            shard = Shard(weight[lo:hi].to(old.device), old[lo:hi],
                          None if score is None else score[lo:hi].to(old.device), select)
            decided = self.rule(sp, shard, u).reshape(-1)
            if (lo, hi) == (0, n) and new is None:
                new = decided
            else:
                new = torch.zeros(n, dtype=torch.bool, device=old.device) if new is None else new
                new[lo:hi] = decided
        return new if new is not None else torch.zeros(n, dtype=torch.bool, device=old.device)

    def rule(self, sp: SparseParam, shard: Shard, u: Update) -> torch.Tensor:
        layer = self.layers[sp.name]
        layer.dead_rows = u.dead.get(sp.name)  # the rows to reclaim at this update (None: none)
        try:
            return self.method.update_layer(layer, shard, int(round(u.drop_fraction * u.before[sp.name].active)),
                                            u.t, self.schedule, Ties(self.tie_seed, "update", u.t, sp.name))
        finally:
            layer.dead_rows = None

    def join(self, group: Group, u: Update, new: torch.Tensor) -> torch.Tensor:
        """The new mask as the store takes it: the rank's fragment when masks are partitioned, else the whole
        parameter-shaped mask (joined from the ranks' fragments by one byte all-reduce when decided on shards).
        Observers see the old and new whole masks first."""
        numel, shape = u.masks.size(group)
        start = u.backend.fragment(group[0].weight)[0] if u.sharded else 0
        joined: Optional[torch.Tensor] = None
        if not u.sharded:
            joined = new.reshape(shape)
        elif not u.masks.partitioned or self.observers:
            joined = u.backend.assemble(numel, start, new).reshape(shape)
        if self.observers:
            old = u.masks.local(group)
            if u.masks.partitioned:
                old = u.backend.assemble(numel, start, old).reshape(shape)
            for observe in self.observers:
                observe(group, u, old, joined)
        return new if u.masks.partitioned else joined

    def share_fan_ins(self, params: list[SparseParam], backend, device: torch.device) -> None:
        """After decisions by owner: the fan-ins the owners' rules set (SRigL), on every rank (one all-reduce)."""
        names = [sp.name for sp in params if self.layers[sp.name].fan_in is not None]
        if not names:
            return
        owned = {sp.name: backend.fragment(sp.weight)[1] > 0 for sp in params}
        values = torch.tensor([self.layers[n].fan_in if owned[n] else 0 for n in names], dtype=torch.int64,
                              device=device)  # where the process group's backend reduces
        for name, k in zip(names, backend.all_reduce_sum_(values).tolist()):
            self.layers[name].fan_in = int(k)


def no_score(sp: SparseParam) -> torch.Tensor:
    raise RuntimeError(f"no gradient score was captured for {sp.name} before the mask update; "
                       f"the weight received no gradient")
