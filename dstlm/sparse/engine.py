"""SparseEngine: when masks are captured, decided and applied; the same for every method and every layout.

Lifecycle (driven by the training layer, identically on every rank):
    engine = SparseEngine(model, cfg, seed, max_steps)    # selects weights, sets densities, first masks
    per optimizer step t -> t+1:
        engine.before_optimizer_step(t + 1, backend)      # capture dense-gradient scores, mask gradients
        optimizer.step()
        engine.after_optimizer_step(t + 1, backend)       # at update steps: new masks, zero W and state
Weights at pruned entries are kept exactly 0 by masking their gradients and zeroing their optimizer state, so
no per-step weight multiply is needed in forward. The engine delegates: layers and budgets (density.py), first
masks (first_masks.py), where masks live (storage.py), scores (scores.py), the rules (the method, over a
selector: selectors.py), checks (checks.py) and telemetry (report.py).

A mask update decides each parameter's new mask where its entries live: whole in this process (one process,
or every rank alike without shards), by its owner alone (DDP replicas, `backend.whole_fragments`), or on every
rank's fragment through the collective selector (ZeRO; partitioned masks). Owners' and shards' decisions are
joined by one byte all-reduce unless masks are partitioned.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn as nn

from dstlm.sparse import checks, report
from dstlm.sparse.checks import MaskMismatchError
from dstlm.sparse.config import SparsityConfig
from dstlm.sparse.decide import Decider, Update
from dstlm.sparse.connectivity import MaskCounts, links_between, spread, unit_census
from dstlm.sparse.density import plan_layers
from dstlm.sparse.distributed import SparseBackend, TorchBackend
from dstlm.sparse.first_masks import FirstMasks
from dstlm.sparse.masks import SparseParam, matrix_shapes, sparse_params_of
from dstlm.sparse.methods import DSTMethod
from dstlm.sparse.schedule import UpdateSchedule
from dstlm.sparse.scores import Scores
from dstlm.sparse.selection import count


class SparseEngine:
    def __init__(self, model: nn.Module, cfg: SparsityConfig, seed: int, max_steps: int,
                 input_norms: Optional[dict[str, torch.Tensor]] = None, partitioned=None) -> None:
        """`input_norms`: per sparse matrix, ||X_j|| over calibration tokens of each input j (mask_init=wanda).
        A model may choose its own sparse weights (`model.sparse_params(include, exclude)`, e.g. the Hugging
        Face adapter: transposed and fused layouts) and mark itself `pretrained` (magnitude masks by default).
        `partitioned`: the partitioned build (trainer.zero_init) the model was built under, when its weights are
        placeholders (first_masks.py)."""
        self.cfg = cfg
        self.method: DSTMethod = cfg.method_class(cfg)
        self.params: list[SparseParam] = sparse_params_of(model, cfg)
        self.mask_init = cfg.mask_init or ("magnitude" if getattr(model, "pretrained", False) else "random")
        if self.mask_init == "wanda" and not input_norms:
            raise ValueError("sparsity.mask_init=wanda needs input-activation norms from calibration batches; "
                             "train through `dstlm fit` (it computes them) or use mask_init=magnitude")
        shapes = matrix_shapes(model, cfg, self.params)
        groups: dict[tuple[int, str], list[SparseParam]] = {}  # matrices by the parameter holding them
        for sp in self.params:
            groups.setdefault((id(sp.module), sp.attr), []).append(sp)
        self.groups: list[list[SparseParam]] = list(groups.values())
        self.schedule = UpdateSchedule(cfg.delta_t, cfg.t_start, cfg.resolve_t_end(max_steps), cfg.drop_fraction,
                                       cfg.drop_schedule)
        self.layers = plan_layers(shapes, cfg)
        self.links = links_between(model.unit_links() if hasattr(model, "unit_links") else [], shapes)
        # every random choice (first masks, SET's growth, ties) comes from hashes keyed by this seed, the step
        # and the layer (dstlm/sparse/selection.py): nothing to carry in checkpoints, the same on every rank
        self.tie_seed = int(cfg.seed if cfg.seed is not None else seed)
        self.scores = Scores()
        self.last_stats: dict[str, float] = {}
        self.n_updates = 0
        self._backend: Optional[SparseBackend] = None
        self._planned: Optional[SparseBackend] = None
        self.decider = Decider(self.method, self.layers, self.schedule, self.tie_seed)
        first = FirstMasks(self.method, self.layers, self.tie_seed, self.mask_init, input_norms, partitioned)
        self.masks = first.attach(self.groups, cfg.sparse_init == "rescale", bool(cfg.partition_masks))
        self.kept_masks, self.wanda_unseen = first.kept_masks, first.wanda_unseen

    # -- views ------------------------------------------------------------------------------------------
    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: la.shape for n, la in self.layers.items()}

    @property
    def densities(self) -> dict[str, float]:
        return {n: la.density for n, la in self.layers.items()}

    @property
    def budgets(self) -> dict[str, int]:
        return {n: la.budget for n, la in self.layers.items()}

    @property
    def fan_in(self) -> dict[str, int]:
        return {n: la.fan_in for n, la in self.layers.items() if la.fan_in is not None}

    @property
    def partitioned(self) -> bool:
        return self.masks.partitioned

    @property
    def fragments(self):
        """sparsity.partition_masks: per parameter, this rank's part of its mask (None: masks are whole)."""
        return self.masks.fragments if self.masks.partitioned else None

    @property
    def ever_active(self) -> dict[str, torch.Tensor]:
        return self.masks.state()

    def counts(self) -> dict[str, MaskCounts]:
        """Per matrix, active entries per row and per column (partitioned: summed over the ranks, a collective at
        the first call after a change, which the engine makes at `partition` and after each update)."""
        return self.masks.counts()

    def whole_masks(self) -> dict[str, torch.Tensor]:
        """Every matrix's whole [out, in] mask (partitioned: joined from the ranks' fragments, a collective)."""
        return self.masks.whole()

    def active_entries(self) -> dict[tuple[int, str], int]:
        """Active entries of every sparse parameter, keyed (id(module), attr): what FLOP counts read."""
        out: dict[tuple[int, str], int] = {}
        counts = self.counts()
        for sp in self.params:
            key = (id(sp.module), sp.attr)
            out[key] = out.get(key, 0) + counts[sp.name].active
        return out

    @torch.no_grad()
    def partition(self, backend: SparseBackend, files: Optional[list] = None) -> None:
        """Keep only this rank's fragment of every mask (the flat run `backend.fragment` gives, the rank's
        partition of the weight) and free the whole masks; from `files` (a checkpoint's saved fragments, any
        world size) when given. Fragments cut at build (trainer.zero_init) are checked against the backend's.
        Every rank calls it, before the first step."""
        self._backend = backend
        if not self.masks.partitioned:
            self.masks = self.masks.cut(backend, files, self.scores)
            self.scores.in_files = False
            self.masks.counts()  # on every rank now (a collective): later reads on one rank find them cached
        elif files is not None:
            self.masks.reload(backend, files, self.scores)
        else:
            self.masks.adopt(backend)

    def fragment_state(self) -> dict:
        """This rank's fragments, bit-packed with their ranges (what it saves in a checkpoint)."""
        return self.masks.file_state(self.scores.fragments)

    # -- per step -----------------------------------------------------------------------------------------
    def is_update_step(self, t: int) -> bool:
        return self.method.is_update_step(t, self.schedule)

    def needs_scores(self, t: int) -> bool:
        """Whether the dense gradient of the step ending at t feeds a score (the last k steps before an update)."""
        return self.method.uses_dense_grad and any(self.is_update_step(t + j)
                                                   for j in range(self.cfg.grad_accumulation))

    def sharded(self, backend: SparseBackend) -> bool:
        """Whether masks are decided on ranks' fragments: on more than one rank with a backend that has them;
        partitioned masks always (on one rank too: the fragment is read a block at a time)."""
        if self.partitioned:
            return True
        sharded = backend.world_size > 1 and backend.shards
        if sharded and self._planned is not backend:
            backend.plan([group[0].weight for group in self.groups])  # who owns which parameter
            self._planned = backend
        return sharded

    @torch.no_grad()
    def before_optimizer_step(self, t: int, backend: SparseBackend) -> None:
        """Called with the accumulated gradients of the step that will become optimizer step t."""
        self._backend = backend
        if self.needs_scores(t):
            self.scores.capture(self.groups, backend, self.sharded(backend), lambda name: self.layers[name].shape)
        for group in self.groups:
            backend.mask_grad_(group[0].weight, self.masks.local(group))

    @torch.no_grad()
    def after_optimizer_step(self, t: int, backend: SparseBackend) -> Optional[dict[str, float]]:
        """Update masks if t is an update step; returns telemetry then, else None."""
        return self._update(t, backend) if self.is_update_step(t) else None

    def _update(self, t: int, backend: SparseBackend) -> dict[str, float]:
        """New masks, one parameter (group of matrices) at a time: its weights and optimizer state are zeroed
        before the next is decided (owners decide all theirs first: joining each in turn would serialise them)."""
        start = time.perf_counter()
        if not self.partitioned:  # partitioned masks cannot drift apart: no two ranks hold the same entries
            checks.check_ranks_agree(self.params, self.layers, backend, t, self._device, when="before")
        before = self.counts()
        dead = {link.producer: before[link.consumer].cols == 0 for link in self.links} \
            if self.cfg.reclaim_dead_units else {}
        u = Update(t, self.schedule.drop_fraction(t), dead, before, self.sharded(backend), backend, self.masks,
                   self.scores)
        if u.sharded:
            self.scores.localize(self.groups, backend)
        owned = [self.decider.decide(group, u) for group in self.groups] if u.by_owner else None
        kept = {}  # per matrix: entries active before and after (this rank's part when partitioned)
        for i, group in enumerate(self.groups):
            new = self.decider.join(group, u, owned[i] if owned is not None else self.decider.decide(group, u))
            param = group[0].weight
            kept.update(self.masks.commit(group, new, lambda keep, p=param: (
                backend.mask_weight_(p, keep), backend.mask_optimizer_state_(p, keep))))
            del new  # one new mask alive at a time
        if u.by_owner:
            self.decider.share_fan_ins(self.params, backend, self._device)
        self.scores.clear()
        self.n_updates += 1
        self.last_stats = self._stats(backend, u, kept, dead, before, time.perf_counter() - start)
        return self.last_stats

    def _stats(self, backend: SparseBackend, u: Update, kept: dict[str, int], dead: dict, before: dict,
               seconds: float) -> dict[str, float]:
        """Telemetry of the update just made (the counts over all ranks), after the ranks are checked to agree."""
        after = self.counts()
        ever = self.masks.ever_active()
        if self.partitioned:  # the kept entries and the ever-active record, summed over the ranks' fragments
            joined = backend.all_reduce_sum_(torch.tensor([kept[sp.name] for sp in self.params] + [ever],
                                                          dtype=torch.int64, device=self._device))
            kept, ever = dict(zip((sp.name for sp in self.params), joined[:-1].tolist())), int(joined[-1])
        active = {n: c.active for n, c in after.items()}
        checks.check_ranks_agree(self.params, self.layers, backend, u.t, self._device, active if u.sharded else None)
        reclaimed = sum(count(d & (before[n].rows > 0)) for n, d in dead.items()) \
            if self.cfg.reclaim_dead_units else None
        return report.update_stats(after, kept, ever, self.links, u.drop_fraction, seconds, u.sharded, reclaimed)

    # -- checks and reporting ---------------------------------------------------------------------------------
    def check_ranks_agree(self, backend: SparseBackend, t: int, active: Optional[dict[str, int]] = None,
                          when: str = "after") -> None:
        checks.check_ranks_agree(self.params, self.layers, backend, t, self._device, active, when)

    @torch.no_grad()
    def verify(self, backend: SparseBackend) -> list[str]:
        """Invariant violations (empty: all hold), the same list on every rank: weights and optimizer state zero
        off the mask (no weight gathered), and the method's invariants on the counts."""
        return checks.violations(self.groups, self.masks.local, backend, self._device) + \
            checks.method_invariants(self.method, self.layers, self.counts())

    def density(self) -> float:
        return report.density(self.counts())

    def census(self, counts: Optional[dict[str, MaskCounts]] = None) -> dict:
        """Dead and orphan hidden units of the linked layers (dstlm/sparse/connectivity.py)."""
        return unit_census(counts or self.counts(), self.links)

    def spread(self, counts: Optional[dict[str, MaskCounts]] = None) -> dict:
        """Fan-in and fan-out spread of the masks (dstlm/sparse/connectivity.py `spread`)."""
        return spread(counts or self.counts())

    def census_stats(self, counts: Optional[dict[str, MaskCounts]] = None) -> dict[str, float]:
        return report.census_stats(counts or self.counts(), self.links)

    def describe(self) -> str:
        return report.describe(self.cfg, self.shapes, self.counts(), self.partitioned)

    @property
    def _device(self) -> torch.device:
        """Where the masks live (and the process group's reductions run)."""
        return self.masks.local(self.groups[0]).device

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Called on every rank. Inside a score window sharded scores are pending: with partitioned masks each rank
        saves its own in its fragment file (`fragment_state`); else they are joined whole here (a collective)."""
        scores = dict(self.scores.whole)
        if self.scores.fragments and not self.partitioned:
            scores.update(self.scores.joined(self.groups, self._backend, self.masks.size))
        return {"tie_seed": self.tie_seed, "ever_active": self.masks.state(),
                "scores": scores, "scores_in_fragments": self.partitioned and bool(self.scores.fragments),
                "score_steps": self.scores.steps, "n_updates": self.n_updates,
                "fan_in": dict(self.fan_in), "method": self.cfg.method, "sparsity": self.cfg.sparsity,
                "last_stats": dict(self.last_stats), "partitioned": bool(self.cfg.partition_masks)}

    def load_state_dict(self, state: dict) -> None:
        checks.check_resumable(state, self.cfg)
        self.tie_seed = int(state["tie_seed"])
        if not self.partitioned:
            self.masks.load(state["ever_active"], self._device)
        self.scores = Scores()
        self.scores.whole = {k: v.to(self._device, copy=True) for k, v in state["scores"].items()}
        self.scores.in_files = bool(state.get("scores_in_fragments"))  # read by `partition` from the files
        self.scores.steps = state["score_steps"]
        self.n_updates = state["n_updates"]
        for name, k in state["fan_in"].items():
            self.layers[name].fan_in = k
        self.last_stats = dict(state["last_stats"])


__all__ = ["MaskMismatchError", "SparseEngine", "TorchBackend"]
