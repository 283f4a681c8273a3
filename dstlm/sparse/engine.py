"""SparseEngine: one mask-update path shared by every method.

Lifecycle (driven by the training layer, identically on every rank):
    engine = SparseEngine(model, cfg, seed, max_steps)    # selects weights, sets densities, initial masks
    per optimizer step t -> t+1:
        engine.before_optimizer_step(t + 1, backend)      # capture dense-gradient scores, mask gradients
        optimizer.step()
        engine.after_optimizer_step(t + 1, backend)       # at update steps: new masks, zero W and state
Weights at pruned entries are kept exactly 0 by masking their gradients and zeroing their optimizer
state, so no per-step weight multiply is needed in forward. What differs between methods (initial mask,
update steps, the update itself, invariants) is asked of the method object (dstlm/sparse/methods.py).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn as nn

from dstlm.sparse.config import SparsityConfig
from dstlm.sparse.connectivity import MaskCounts, UnitLink, links_between, spread, unit_census
from dstlm.sparse.density import Layer, plan_layers
from dstlm.sparse.distributed import SparseBackend, TorchBackend, count_packed, pack_mask, unpack_bits
from dstlm.sparse.fragments import Fragment, fragment_state, partial_counts, read_fragments
from dstlm.sparse.masks import (SparseParam, attach_mask, check_patterns_match, flat_storage, mask_checksum, param_name,
                                release_whole_mask, select_params)
from dstlm.sparse.methods import DSTMethod, Shard
from dstlm.sparse.radix import Entries
from dstlm.sparse.schedule import UpdateSchedule
from dstlm.sparse.scores import Scores
from dstlm.sparse.selection import Ties, count, reference_selection
from dstlm.sparse.selectors import CollectiveSelector, LocalSelector


class MaskMismatchError(ValueError):
    """Masks that must agree do not (across ranks, or a sharded decision against its whole-tensor reference);
    a ValueError, so the command line prints it as one line."""


class SparseEngine:
    def __init__(self, model: nn.Module, cfg: SparsityConfig, seed: int, max_steps: int,
                 input_norms: Optional[dict[str, torch.Tensor]] = None, partitioned=None) -> None:
        """`input_norms`: per sparse matrix, ||X_j|| over calibration tokens of each input j (mask_init=wanda).
        A model may choose its own sparse weights (`model.sparse_params(include, exclude)`, e.g. the Hugging
        Face adapter: transposed and fused layouts) and mark itself `pretrained` (magnitude masks by default).
        `partitioned`: the partitioned build (trainer.zero_init) the model was built under, when its weights are
        placeholders: `local_values(param)` gives this rank's slice and `all_reduce` joins the ranks, so that
        magnitude masks are decided on the slices (the same masks as from whole weights)."""
        self.cfg = cfg
        self._partitioned = partitioned
        self.method: DSTMethod = cfg.method_class(cfg)
        self.params: list[SparseParam] = sparse_params_of(model, cfg)
        self.mask_init = cfg.mask_init or ("magnitude" if getattr(model, "pretrained", False) else "random")
        if self.mask_init == "wanda" and not input_norms:
            raise ValueError("sparsity.mask_init=wanda needs input-activation norms from calibration batches; "
                             "train through `dstlm fit` (it computes them) or use mask_init=magnitude")
        self._input_norms = input_norms or {}
        matrices = [sp.name for sp in self.params]
        check_patterns_match(model, cfg.overrides.keys(), "sparsity.overrides", matrices)
        check_patterns_match(model, cfg.no_ablate, "sparsity.no_ablate", matrices)
        shapes = {sp.name: tuple(sp.view(sp.weight).shape) for sp in self.params}
        for sp in self.params:
            if len(shapes[sp.name]) != 2:
                raise ValueError(f"{sp.name} has shape {tuple(sp.weight.shape)}; sparsify [out, in] weights only "
                                 f"(use an adapter that presents an [out, in] view)")
        # sparse matrices grouped by the parameter holding them (several for batched expert weights):
        # backends act once per parameter, with its whole mask
        groups: dict[tuple[int, str], list[SparseParam]] = {}
        for sp in self.params:
            groups.setdefault((id(sp.module), sp.attr), []).append(sp)
        self.groups: list[list[SparseParam]] = list(groups.values())
        self._by_name = {sp.name: sp for sp in self.params}
        t_end = cfg.resolve_t_end(max_steps)
        self.schedule = UpdateSchedule(cfg.delta_t, cfg.t_start, t_end, cfg.drop_fraction, cfg.drop_schedule)
        self.final_density = 1.0 - cfg.sparsity
        self.layers: dict[str, Layer] = plan_layers(shapes, cfg)
        # producer rows / consumer columns the model pairs (`unit_links()`: matrix names), for the census
        pairs = model.unit_links() if hasattr(model, "unit_links") else []
        self.links: list[UnitLink] = links_between(pairs, shapes)
        # every random choice (initial masks, SET's growth, ties) comes from hashes keyed by this seed, the
        # step and the layer (dstlm/sparse/selection.py): nothing to carry in checkpoints, same on every rank
        self.tie_seed = int(cfg.seed if cfg.seed is not None else seed)
        self.ever_active: dict[str, torch.Tensor] = {}  # per matrix, bit-packed (1/8 byte per sparse weight)
        self.scores = Scores()
        self._backend: Optional[SparseBackend] = None
        self._planned: Optional[SparseBackend] = None
        self.check_reference = False
        """Tests and debugging: with sharded decisions, also decide every mask whole from gathered weights and
        scores with the sort-based reference selection, and stop if any differs (costs the gathers)."""
        self.last_stats: dict[str, float] = {}
        self.n_updates = 0
        self.fragments: Optional[dict[str, Fragment]] = None
        """sparsity.partition_masks, once `partition` ran: per parameter, this rank's part of its mask."""
        self._counts: Optional[dict[str, MaskCounts]] = None  # partitioned masks' all-reduced counts (cached)
        self._init_masks()

    # per-layer views (read-only dicts) of the layers' state
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

    # -- initial masks ------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_masks(self) -> None:
        self.kept_masks = 0
        self.wanda_unseen = 0  # mask_init=wanda matrices calibration gave no input (an expert no token reached)
        """Sparse matrices whose mask came with the model (an exported sparse model) and was kept."""
        # a partitioned build (trainer.zero_init) with partitioned masks keeps only this rank's fragment of each
        # mask from the start: decided whole one parameter at a time (as the whole build does), then cut
        cut = self._partitioned is not None and bool(self.cfg.partition_masks)
        fragments: dict[str, Fragment] = {}
        counts: dict[str, MaskCounts] = {}
        for group in self.groups:
            param = group[0].weight
            # the weights' factor: 0 where pruned, the sparse-aware rescale (or 1) where kept; applied to the
            # whole parameter in one multiply, which a partitioned build (trainer.zero_init) can apply to its
            # slice alone. Weights on the meta device are such a build's placeholders: masks need only shapes.
            device = torch.device("cpu") if param.is_meta else param.device
            factor = torch.ones(param.shape, dtype=param.dtype, device=device)
            for sp in group:
                mask, kept = self._init_mask(sp, device)
                attach_mask(sp, mask, persistent=not self.cfg.partition_masks)
                f = sp.mask.to(param.dtype)
                # the sparse-aware rescale is for random initialisations, never for pretrained or kept weights
                if self.cfg.sparse_init == "rescale" and not kept and self.mask_init == "random":
                    row_nnz = sp.mask.sum(dim=1, keepdim=True).clamp_min(1).to(param.dtype)
                    f = f * torch.sqrt(self.layers[sp.name].shape[1] / row_nnz)
                sp.view(factor).copy_(f)
                self.ever_active[sp.name] = pack_mask(sp.mask)
            param.mul_(factor)
            del factor
            if cut:
                self._cut_at_build(group, fragments, counts)
        if cut:
            self.fragments, self._counts, self.ever_active = fragments, counts, {}

    def _cut_at_build(self, group: list[SparseParam], fragments: dict[str, Fragment],
                      counts: dict[str, MaskCounts]) -> None:
        """Keep this rank's fragment of the group's first mask (the slice the partitioned build holds of its
        weight, which is the rank's ZeRO-3 partition) and the matrices' counts (every rank decided the same whole
        mask: no collective), then free the whole mask."""
        found = self._partitioned.local_values(group[0].weight)
        if found is None:
            raise RuntimeError(f"{param_name(group)} is not a placeholder of the partitioned build "
                               f"(trainer.zero_init)")
        start, values = found
        full = group[0].full_mask
        for sp in group:
            counts[sp.name] = MaskCounts.of(sp.mask)
        part = full.reshape(-1)[start:start + values.numel()].clone()
        fragments[param_name(group)] = Fragment(start, part, pack_mask(part), tuple(full.shape))
        for sp in group:
            self.ever_active.pop(sp.name, None)
        release_whole_mask(group, full.device)

    def _init_mask(self, sp: SparseParam, device: torch.device) -> tuple[torch.Tensor, bool]:
        """The first [out, in] mask of one sparse matrix, and whether it came with the model (kept)."""
        layer = self.layers[sp.name]
        ties = Ties(self.tie_seed, "init", sp.name)
        existing = getattr(sp.module, f"{sp.attr}_mask", None)
        if existing is not None and getattr(sp.module, "dstlm_keep_mask", False):
            mask = sp.view(existing).clone()  # a mask that came with the model: kept, never re-pruned
            self.method.adopt_mask(layer, mask)
            self.kept_masks += 1
            return mask, True
        w = sp.view(sp.weight)
        if w.is_meta and self.mask_init == "magnitude" and not self.method.init_reads_weights and \
                getattr(self._partitioned, "all_reduce", None) is not None:
            return self._init_mask_on_slices(sp, ties, device), False
        if w.is_meta and (self.mask_init != "random" or self.method.init_reads_weights):
            how = f"sparsity.mask_init={self.mask_init!r}" if self.mask_init != "random" else \
                f"sparsity.method={self.method.name!r}"
            raise ValueError(f"{how} ranks {sp.name} by its weights, which a partitioned build (trainer.zero_init) "
                             f"holds only in part; use mask_init=random with another method, or "
                             f"trainer.zero_init=false")
        if self.mask_init == "random" and not self.method.init_reads_weights:  # decided from the shape alone
            probe = w.contiguous() if not w.is_meta else torch.zeros((), device=device).expand(w.shape)
            return self.method.init_mask(layer, probe, ties), False
        if self.mask_init == "random":
            return self.method.init_mask(layer, w.contiguous(), ties), False
        score = w.detach().abs().float()
        norms = self._input_norms.get(sp.name) if self.mask_init == "wanda" else None
        self.wanda_unseen += int(self.mask_init == "wanda" and norms is None)
        if norms is not None:
            score = score * norms.to(score.device, torch.float32)[None, :]
        return self.method.init_mask_scored(layer, score, LocalSelector(layer.shape, score.device), ties,
                                            per_row=norms is not None), False

    def _matrix_run(self, sp: SparseParam, start: int, length: int) -> tuple[int, int, int]:
        """(base, a, b): matrix `sp` occupies base..base+rows*cols of its parameter's flat index (a batched
        parameter holds several), and a..b is the part of it inside the flat range start..start+length."""
        rows, cols = self.layers[sp.name].shape
        numel = rows * cols
        base = 0 if sp.index is None else sp.index * numel
        a = min(max(start, base), base + numel)
        return base, a, max(a, min(start + length, base + numel))

    def _init_mask_on_slices(self, sp: SparseParam, ties: Ties, device: torch.device) -> torch.Tensor:
        """A magnitude mask decided from this rank's slice of a partitioned weight by the sharded selection,
        joined whole (masks are whole on every rank) by one byte all-reduce: each entry is decided by the one
        rank holding it. Every rank calls it for every matrix, in the same order (collectives inside)."""
        layer = self.layers[sp.name]
        start, values = self._partitioned.local_values(sp.weight)
        numel = layer.shape[0] * layer.shape[1]
        base, a, b = self._matrix_run(sp, start, values.numel())
        index = sp.storage_index(torch.arange(a - base, b - base, device=device))
        score = values[a - start:b - start].detach().abs().float().to(device)
        select = CollectiveSelector(Entries.of(index, layer.shape[1]), layer.shape, self._partitioned.all_reduce)
        local = self.method.init_mask_scored(layer, score, select, ties, per_row=False)
        whole = torch.zeros(numel, dtype=torch.uint8, device=device)
        whole[index] = local.to(torch.uint8)
        return self._partitioned.all_reduce(whole).bool().reshape(layer.shape)

    # -- partitioned masks (sparsity.partition_masks) --------------------------------------------------
    @property
    def partitioned(self) -> bool:
        return self.fragments is not None

    @torch.no_grad()
    def partition(self, backend: SparseBackend, files: Optional[list] = None) -> None:
        """Keep only this rank's fragment of every mask (the flat run `backend.fragment` gives, the rank's
        partition of the weight) and free the whole masks. `files`: a checkpoint's saved fragments
        (dstlm/sparse/fragments.py) to restore them from, at any world size; else the whole masks held now
        (the first masks) are cut, unless the partitioned build cut them already (trainer.zero_init: then the
        cuts are checked against the backend's). Every rank calls it, before the first step."""
        self._backend = backend
        runs = {param_name(g): backend.fragment(g[0].weight) for g in self.groups}
        if self.partitioned and files is None:  # cut at build (trainer.zero_init), or a second fit of the module
            self._adopt_fragments(runs)
            return
        saved = read_fragments(files, runs, scores=self.scores.in_files) if files is not None else None
        fragments = {}
        for group in self.groups:
            key, full = param_name(group), group[0].full_mask
            start, n = runs[key]
            shape = self.fragments[key].shape if self.partitioned else tuple(full.shape)
            if saved is not None:
                mask, ever, score = saved[key]
                mask, ever = mask.to(full.device), pack_mask(ever.to(full.device))
                if score is not None:
                    self.scores.restore_fragment(group, score.to(full.device), shape, backend.world_size)
            else:
                mask = full.reshape(-1)[start:start + n].clone()
                shapes = [self.layers[sp.name].shape for sp in group]
                ever = flat_storage(group, [unpack_bits(self.ever_active[sp.name], math.prod(shape)).reshape(shape)
                                             for sp, shape in zip(group, shapes)])
                ever = pack_mask(ever[start:start + n].to(full.device))
            fragments[key] = Fragment(start, mask, ever, shape)
            release_whole_mask(group, full.device)
        self.fragments = fragments
        self.ever_active = {}
        self.scores.in_files = False
        self._counts = None
        self.counts()  # on every rank now (a collective), so that later reads on one rank find them cached

    def _adopt_fragments(self, runs: dict[str, tuple[int, int]]) -> None:
        """Fragments cut before the backend existed: they must be the runs the backend gives (the rank's ZeRO-3
        partitions), and move to where the module's (placeholder) masks now live (the training device)."""
        for group in self.groups:
            key = param_name(group)
            f = self.fragments[key]
            if (f.start, f.length) != tuple(runs[key]):
                raise RuntimeError(f"{key}: the mask fragment cut at build covers ({f.start}, {f.length}) but this "
                                   f"rank's ZeRO-3 partition is {tuple(runs[key])}")
            device = group[0].full_mask.device
            f.mask, f.ever = f.mask.to(device), f.ever.to(device)
        if self._counts is not None:
            device = self._device
            self._counts = {k: MaskCounts(c.rows.to(device), c.cols.to(device)) for k, c in self._counts.items()}
        else:
            self.counts()

    def active_entries(self) -> dict[tuple[int, str], int]:
        """Active entries of every sparse parameter, keyed (id(module), attr), from the counts: what FLOP counts
        read (partitioned masks leave no whole mask on the module to sum)."""
        out: dict[tuple[int, str], int] = {}
        for name, c in self.counts().items():
            sp = self._by_name[name]
            out[(id(sp.module), sp.attr)] = out.get((id(sp.module), sp.attr), 0) + c.active
        return out

    def counts(self) -> dict[str, MaskCounts]:
        """Per matrix, active entries per row and per column: from the whole masks, or (partitioned) the sum of
        every rank's partial counts, computed once per mask change (a collective: every rank's first call after
        a change must be at the same point; the engine makes it at `partition` and after each update)."""
        if not self.partitioned:
            return {sp.name: MaskCounts.of(sp.mask) for sp in self.params}
        if self._counts is None:
            parts = []
            for group in self.groups:
                f = self.fragments[param_name(group)]
                for sp in group:
                    rows, cols = self.layers[sp.name].shape
                    base, a, b = self._matrix_run(sp, f.start, f.length)
                    parts += partial_counts(rows, cols, sp.storage_index, f.mask[a - f.start:b - f.start], a - base)
            flat = self._backend.all_reduce_sum_(torch.cat(parts))
            out, i = {}, 0
            for sp in self.params:
                rows, cols = self.layers[sp.name].shape
                out[sp.name] = MaskCounts(flat[i:i + rows], flat[i + rows:i + rows + cols])
                i += rows + cols
            self._counts = out
        return self._counts

    def whole_masks(self) -> dict[str, torch.Tensor]:
        """Every matrix's whole [out, in] mask. Partitioned: joined from the ranks' fragments (a collective, and
        whole masks on every rank: for tests and tools, not for training)."""
        if not self.partitioned:
            return {sp.name: sp.mask for sp in self.params}
        out = {}
        for group in self.groups:
            f = self.fragments[param_name(group)]
            whole = self._backend.assemble(f.numel, f.start, f.mask).reshape(f.shape)
            out.update({sp.name: sp.view(whole) for sp in group})
        return out

    def _local_mask(self, group: list[SparseParam]) -> torch.Tensor:
        """The mask the backend masks gradients, weights and state with: this rank's fragment when
        partitioned, else the whole parameter's."""
        return self.fragments[param_name(group)].mask if self.partitioned else group[0].full_mask

    def fragment_state(self) -> dict:
        """This rank's fragments, bit-packed with their ranges (what it saves in a checkpoint)."""
        return fragment_state(self.fragments or {}, self._backend.rank, self._backend.world_size,
                              self.scores.fragments)

    # -- per step -------------------------------------------------------------------------------------
    def is_update_step(self, t: int) -> bool:
        return self.method.is_update_step(t, self.schedule)

    def needs_scores(self, t: int) -> bool:
        """Whether the dense gradient of the step ending at t feeds a score (the last k steps before an update)."""
        if not self.method.uses_dense_grad:
            return False
        return any(self.is_update_step(t + j) for j in range(self.cfg.grad_accumulation))

    def sharded(self, backend: SparseBackend) -> bool:
        """Whether masks are decided on shards (a `CollectiveSelector` per matrix): on more than one rank, with a
        backend that exposes fragments; else every rank decides whole. Partitioned masks are always decided on
        their fragments (on one rank too: the fragment is read a block at a time, where deciding the whole
        matrix makes several whole-matrix temporaries)."""
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
            backend.mask_grad_(group[0].weight, self._local_mask(group))

    @torch.no_grad()
    def after_optimizer_step(self, t: int, backend: SparseBackend) -> Optional[dict[str, float]]:
        """Update masks if t is an update step; returns telemetry then, else None."""
        if not self.is_update_step(t):
            return None
        return self._update(t, backend)

    def _update(self, t: int, backend: SparseBackend) -> dict[str, float]:
        """New masks, decided where the masks and weights live, one parameter (group of matrices) at a time;
        that group's weights and optimizer state are zeroed before the next is read."""
        start = time.perf_counter()
        partitioned = self.partitioned
        if not partitioned:  # partitioned masks cannot drift apart: no two ranks hold the same entries
            self.check_ranks_agree(backend, t, when="before")
        drop_fraction = self.schedule.drop_fraction(t)
        before = self.counts()
        dead = {link.producer: before[link.consumer].cols == 0 for link in self.links} \
            if self.cfg.reclaim_dead_units else {}
        reclaimed_rows = sum(count(d & (before[name].rows > 0)) for name, d in dead.items())
        sharded = self.sharded(backend)
        if sharded:
            self.scores.localize(self.groups, backend)
        by_owner = sharded and not partitioned and backend.whole_fragments
        owned = None
        if by_owner:
            # every owner decides all its parameters first (no collective), then the masks are joined: joining
            # each right after its decision would make the ranks take turns
            owned = [self._decide_owned(group, backend, t, drop_fraction, dead) for group in self.groups]
        kept = {}  # per matrix: entries active before and after the update (this rank's part when partitioned)
        for gi, group in enumerate(self.groups):
            if partitioned:
                f = self.fragments[param_name(group)]
                reference = self._reference(group, backend, t, drop_fraction, dead, backend.assemble(
                    f.numel, f.start, f.mask).reshape(f.shape)) if sharded and self.check_reference else None
                new = self._decide_shards(group, backend, t, drop_fraction, dead, before) if sharded else \
                    self._decide_whole(group, backend, t, drop_fraction, dead, f.mask.reshape(f.shape)).reshape(-1)
                if reference is not None:
                    self._check_reference(group, t, reference, backend.assemble(f.numel, f.start, new))
                f.ever |= pack_mask(new)
                keep = f.mask.logical_and_(new)  # in place: zero dropped and newly grown entries (grown start at 0)
                for sp in group:
                    _, a, b = self._matrix_run(sp, f.start, f.length)
                    kept[sp.name] = count(keep[a - f.start:b - f.start])
            else:
                new = self._decide_group(group, backend, t, drop_fraction, dead, before,
                                         None if owned is None else owned[gi])
                keep = new & group[0].full_mask
                for sp in group:
                    self.ever_active[sp.name] |= pack_mask(sp.view(new)).to(self.ever_active[sp.name].device)
                    kept[sp.name] = count(sp.view(keep))
                group[0].full_mask.copy_(new)
            param = group[0].weight
            backend.mask_weight_(param, keep)
            backend.mask_optimizer_state_(param, keep)
            if partitioned:
                f.mask.copy_(new)  # the fragment held the kept entries while its state was zeroed
            del new, keep  # freed before the next parameter is decided: one new mask alive at a time
        if by_owner:
            self._share_fan_ins(backend)
        self.scores.clear()
        self.n_updates += 1
        self._counts = None
        after = self.counts()
        ever = sum(count_packed(e) for e in (self.ever_active.values() if not partitioned else
                                             (f.ever for f in self.fragments.values())))
        if partitioned:  # the kept entries and the ever-active record, summed over the ranks' fragments
            joined = backend.all_reduce_sum_(torch.tensor([kept[sp.name] for sp in self.params] + [ever],
                                                          dtype=torch.int64, device=self._device))
            kept = dict(zip((sp.name for sp in self.params), joined[:-1].tolist()))
            ever = int(joined[-1])
        active = {n: c.active for n, c in after.items()}
        numel_total = sum(c.numel for c in after.values())
        active_total = sum(active.values())
        grown_total = active_total - sum(kept.values())
        ablated = sum(count(c.rows == 0) for c in after.values())
        self.check_ranks_agree(backend, t, active if sharded else None)
        self.last_stats = {
            "density": active_total / max(1, numel_total), "churn": grown_total / max(1, active_total),
            "itop": ever / max(1, numel_total), "ablated_neurons": float(ablated), "drop_fraction": drop_fraction,
            "update_ms": (time.perf_counter() - start) * 1e3, "sharded": float(sharded),
        }
        if self.cfg.reclaim_dead_units:
            self.last_stats["reclaimed_rows"] = float(reclaimed_rows)
        self.last_stats.update(self.census_stats(after))
        self.last_stats.update({f"layer/{n}": active[n] / after[n].numel for n in active})
        return self.last_stats

    def _decide_group(self, group: list[SparseParam], backend: SparseBackend, t: int, drop_fraction: float,
                      dead: dict[str, torch.Tensor], before: dict[str, MaskCounts],
                      owned: Optional[torch.Tensor]) -> torch.Tensor:
        """The group's whole new mask (parameter-shaped), from whole masks: the owner's decision joined, the
        sharded decisions joined, or decided whole; checked against the whole-tensor reference when asked."""
        sharded = self.sharded(backend)
        reference = self._reference(group, backend, t, drop_fraction, dead) if sharded and \
            self.check_reference else None
        if owned is not None:
            new_full = backend.assemble(group[0].full_mask.numel(), 0, owned)
        elif sharded:
            new_full = self._decide_shards(group, backend, t, drop_fraction, dead, before)
        else:
            new_full = self._decide_whole(group, backend, t, drop_fraction, dead)
        new_full = new_full.reshape(group[0].full_mask.shape)
        if reference is not None:
            self._check_reference(group, t, reference, new_full)
        return new_full

    @staticmethod
    def _check_reference(group: list[SparseParam], t: int, reference: torch.Tensor, new: torch.Tensor) -> None:
        reference = reference.reshape(new.shape)
        if not torch.equal(reference, new):
            raise MaskMismatchError(f"{param_name(group)}: the sharded decision at step {t} differs from the "
                                    f"whole-tensor reference in {count(reference != new)} entries")

    def _decide_whole(self, group: list[SparseParam], backend: SparseBackend, t: int, drop_fraction: float,
                      dead: dict[str, torch.Tensor], old_full: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The group's new masks from its whole weight (one collective read where it is sharded)."""
        full = backend.full_weight(group[0].weight).detach()
        return self._decide_matrices(group, full, lambda sp: self.scores.whole.get(sp.name), t, drop_fraction, dead,
                                     old_full)

    def _decide_matrices(self, group: list[SparseParam], full: torch.Tensor, score_of, t: int,
                         drop_fraction: float, dead: dict[str, torch.Tensor],
                         old_full: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The one-process rules on every matrix of the group, from the parameter's whole weight `full`."""
        news = []
        for sp in group:
            layer = self.layers[sp.name]
            old = sp.mask if old_full is None else sp.view(old_full)
            w = sp.view(full).reshape(layer.shape).contiguous()  # [out, in] (a copy only for transposed storage)
            score = self._need(score_of(sp), sp) if self.method.uses_dense_grad else None
            if score is not None:
                score = score.to(w.device).reshape(layer.shape).contiguous()
            n_swap = int(round(drop_fraction * count(old)))
            layer.dead_rows = dead.get(sp.name)  # the rows to reclaim at this update (None: none)
            shard = Shard(w, old.to(w.device).contiguous(), score, LocalSelector(layer.shape, w.device))
            new = self.method.update_layer(layer, shard, n_swap, t, self.schedule,
                                           Ties(self.tie_seed, "update", t, sp.name))
            news.append(sp.to_storage(new.to(old.device)))
            layer.dead_rows = None
        # a group lists its matrices in index order (select_params builds them so)
        return news[0] if group[0].index is None else torch.stack(news)

    def _decide_owned(self, group: list[SparseParam], backend: SparseBackend, t: int, drop_fraction: float,
                      dead: dict[str, torch.Tensor]) -> torch.Tensor:
        """With whole-parameter fragments (replicas): the owner's new masks of the group, flat, decided with the
        one-process rules and no collective; an empty tensor on the other ranks."""
        param, full_mask = group[0].weight, group[0].full_mask
        score = self.scores.fragment(group) if self.method.uses_dense_grad else None
        if self.method.uses_dense_grad and score is None:
            self._need(None, group[0])  # on every rank alike (no rank may wait in a join the others skip)
        if backend.fragment(param)[1] != full_mask.numel():
            return torch.zeros(0, dtype=torch.bool, device=full_mask.device)
        whole_score = None if score is None else score.reshape(full_mask.shape)
        weight = backend.local_weight(param).detach().reshape(full_mask.shape)
        return self._decide_matrices(group, weight, lambda sp: None if whole_score is None else sp.view(whole_score),
                                     t, drop_fraction, dead).reshape(-1)

    def _decide_shards(self, group: list[SparseParam], backend: SparseBackend, t: int, drop_fraction: float,
                       dead: dict[str, torch.Tensor], before: dict[str, MaskCounts]) -> torch.Tensor:
        """Each rank decides the entries of its fragment of the parameter's flat index with the sharded rules.
        Partitioned masks: the rank's new fragment; else the group's whole new mask, joined by one byte
        all-reduce. No rank reads another's weights or scores."""
        param = group[0].weight
        f_start, f_len = backend.fragment(param)
        if self.partitioned:
            f = self.fragments[param_name(group)]
            if (f.start, f.length) != (f_start, f_len):
                raise RuntimeError(f"{param_name(group)}: this rank's mask fragment covers {f.start}+{f.length} "
                                   f"but its weight partition {f_start}+{f_len}")
            old = f.mask
        else:
            old = group[0].full_mask.reshape(-1)[f_start:f_start + f_len]
        weight = backend.local_weight(param).detach().reshape(-1)
        score = self.scores.fragment(group) if self.method.uses_dense_grad else None
        if self.method.uses_dense_grad and score is None:
            self._need(None, group[0])
        new_local = None  # a parameter with one matrix takes the rule's new mask itself (no second buffer)
        for sp in group:
            layer = self.layers[sp.name]
            base, a, b = self._matrix_run(sp, f_start, f_len)
            lo, hi = a - f_start, b - f_start
            select = CollectiveSelector(sp.entries(a - base, b - a, old.device), layer.shape, backend.all_reduce_sum_)
            shard = Shard(weight[lo:hi].to(old.device), old[lo:hi],
                          None if score is None else score[lo:hi].to(old.device), select)
            layer.dead_rows = dead.get(sp.name)
            n_swap = int(round(drop_fraction * before[sp.name].active))
            decided = self.method.update_layer(layer, shard, n_swap, t, self.schedule,
                                               Ties(self.tie_seed, "update", t, sp.name)).reshape(-1)
            layer.dead_rows = None
            if (lo, hi) == (0, f_len) and new_local is None:
                new_local = decided
            else:
                if new_local is None:
                    new_local = torch.zeros(f_len, dtype=torch.bool, device=old.device)
                new_local[lo:hi] = decided
            del decided
        if new_local is None:  # no matrix of the group in this rank's fragment
            new_local = torch.zeros(f_len, dtype=torch.bool, device=old.device)
        if self.partitioned:
            return new_local
        return backend.assemble(group[0].full_mask.numel(), f_start, new_local)

    def _share_fan_ins(self, backend: SparseBackend) -> None:
        """After decisions by owner: the fan-ins the owners' rules set (SRigL), on every rank (one all-reduce)."""
        names = [sp.name for sp in self.params if self.layers[sp.name].fan_in is not None]
        if not names:
            return
        owned = {sp.name: backend.fragment(sp.weight)[1] > 0 for sp in self.params}
        values = torch.tensor([self.layers[n].fan_in if owned[n] else 0 for n in names], dtype=torch.int64,
                              device=self._device)  # where the process group's backend reduces
        for name, k in zip(names, backend.all_reduce_sum_(values).tolist()):
            self.layers[name].fan_in = int(k)

    def _reference(self, group: list[SparseParam], backend: SparseBackend, t: int, drop_fraction: float,
                   dead: dict[str, torch.Tensor], old_full: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole-tensor decision with the sort-based reference selection, from gathered weights and
        scores (for check_reference)."""
        saved = dict(self.scores.whole)
        fan_in = {sp.name: self.layers[sp.name].fan_in for sp in group}
        try:
            self.scores.whole = self.scores.joined([group], backend, self._param_size)
            with reference_selection():
                return self._decide_whole(group, backend, t, drop_fraction, dead, old_full)
        finally:
            self.scores.whole = saved
            for sp in group:  # the sharded rule sets it again
                self.layers[sp.name].fan_in = fan_in[sp.name]

    def _param_size(self, group: list[SparseParam]) -> tuple[int, tuple[int, ...]]:
        """The group's parameter's number of entries and (storage) shape, whole masks or partitioned."""
        if self.partitioned:
            f = self.fragments[param_name(group)]
            return f.numel, f.shape
        return group[0].full_mask.numel(), tuple(group[0].full_mask.shape)

    def _need(self, score: Optional[torch.Tensor], sp: SparseParam) -> torch.Tensor:
        if score is None:
            raise RuntimeError(f"no gradient score was captured for {sp.name} before the mask update; "
                               f"the weight received no gradient")
        return score

    # -- checks ---------------------------------------------------------------------------------------
    def check_ranks_agree(self, backend: SparseBackend, t: int, active: Optional[dict[str, int]] = None,
                          when: str = "after") -> None:
        """Stop if the ranks' masks disagree, naming the layers and the ranks that differ from rank 0. Masks
        joined from shards are the same bytes on every rank by construction (one all-reduce result): then what
        must agree is checked, every layer's active count (`active`, as the update counted it) and fan-in;
        otherwise masks are compared by checksum (count and position hash). `when`: 'before' checks the masks
        as they entered the update (a rank whose masks drifted since the last one), 'after' the new masks."""
        if backend.world_size == 1:
            return
        if active is not None:
            values = torch.tensor([[active[sp.name], self.layers[sp.name].fan_in or 0] for sp in self.params])
        else:
            values = mask_checksum(sp.mask for sp in self.params)
        gathered = backend.all_gather(values.to(self._device))
        differ = {sp.name: [r for r, g in enumerate(gathered) if not torch.equal(g[i], gathered[0][i])]
                  for i, sp in enumerate(self.params)}
        differ = {name: ranks for name, ranks in differ.items() if ranks}
        if differ:
            first, ranks = next(iter(differ.items()))
            more = f" and {len(differ) - 1} more layer(s)" if len(differ) > 1 else ""
            moment = f"entering the mask update of step {t}" if when == "before" else \
                f"after the mask update of step {t}"
            raise MaskMismatchError(f"the mask of {first}{more} differs across data-parallel ranks {moment} "
                                    f"(rank(s) {ranks} disagree with rank 0); training stopped (every rank must "
                                    f"hold the same masks: same scores, seeds and code)")

    @torch.no_grad()
    def verify(self, backend: SparseBackend) -> list[str]:
        """Invariant violations (empty list = all hold): W == W*M (fp32 master and module copy) and zero
        optimizer state off the mask. Each rank counts on what it holds; one all-reduce joins the counts, so
        every rank returns the same list and no weight is gathered."""
        problems = []
        counts = torch.stack([backend.violations(g[0].weight, self._local_mask(g)).to(torch.int64).cpu()
                              for g in self.groups])
        if backend.world_size > 1:
            counts = backend.all_reduce_sum_(counts.to(self._device)).cpu()
        what = ("non-zero weights", "non-zero module weights", "non-zero optimizer state")
        for group, row in zip(self.groups, counts.tolist()):
            problems += [f"{param_name(group)}: {what[i]} at pruned entries ({n})" for i, n in enumerate(row) if n]
        masks = self.counts()
        for sp in self.params:
            problems += self.method.check_invariants(self.layers[sp.name], masks[sp.name])
        return problems

    # -- reporting ------------------------------------------------------------------------------------
    def density(self) -> float:
        counts = self.counts().values()
        return sum(c.active for c in counts) / sum(c.numel for c in counts)

    def census(self, counts: Optional[dict[str, MaskCounts]] = None) -> dict:
        """Dead and orphan hidden units of the linked layers (dstlm/sparse/connectivity.py)."""
        return unit_census(counts or self.counts(), self.links)

    def spread(self, counts: Optional[dict[str, MaskCounts]] = None) -> dict:
        """Fan-in and fan-out spread of the masks (dstlm/sparse/connectivity.py `spread`)."""
        return spread(counts or self.counts())

    def census_stats(self, counts: Optional[dict[str, MaskCounts]] = None) -> dict[str, float]:
        counts = counts or self.counts()
        s = self.spread(counts)
        out = {"fan_in_cv": s["fan_in_cv"], "fan_out_cv": s["fan_out_cv"]}
        if not self.links:
            return out
        c = self.census(counts)
        return {**out, "dead_units": float(c["dead"]), "dead_unit_frac": c["dead_unit_frac"],
                "orphan_units": float(c["orphans"]), "wasted_weight_frac": c["wasted_weight_frac"]}

    def layer_densities(self) -> dict[str, float]:
        return {n: c.active / c.numel for n, c in self.counts().items()}

    def describe(self) -> str:
        densities = self.layer_densities()
        lines = [f"{self.cfg.method} at sparsity {self.cfg.sparsity:.3f} ({self.cfg.distribution}); "
                 f"{len(self.params)} sparse weights, density {self.density():.4f}"
                 + (" (masks partitioned across ranks)" if self.partitioned else "")]
        for sp in self.params:
            shape = str(self.layers[sp.name].shape)
            lines.append(f"  {sp.name:<40} {shape:>14}  density {densities[sp.name]:.4f}")
        return "\n".join(lines)

    @property
    def _device(self) -> torch.device:
        """Where the masks live (and the process group's reductions run)."""
        return self._local_mask(self.groups[0]).device

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Called on every rank. Inside a score window sharded scores are pending: with partitioned masks each rank
        saves its own in its fragment file (`fragment_state`); else they are joined whole here (a collective)."""
        scores = dict(self.scores.whole)
        if self.scores.fragments and not self.partitioned:
            scores.update(self.scores.joined(self.groups, self._backend, self._param_size))
        return {"tie_seed": self.tie_seed, "ever_active": dict(self.ever_active),
                "scores": scores, "scores_in_fragments": self.partitioned and bool(self.scores.fragments),
                "score_steps": self.scores.steps, "n_updates": self.n_updates,
                "fan_in": dict(self.fan_in), "method": self.cfg.method, "sparsity": self.cfg.sparsity,
                "last_stats": dict(self.last_stats), "partitioned": bool(self.cfg.partition_masks)}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.cfg.method or abs(state["sparsity"] - self.cfg.sparsity) > 1e-9:
            raise ValueError(f"checkpoint was trained with sparsity.method={state['method']!r} at sparsity "
                             f"{state['sparsity']}, this run has {self.cfg.method!r} at {self.cfg.sparsity}; "
                             f"resume with the same sparsity config")
        if bool(state.get("partitioned")) != bool(self.cfg.partition_masks):
            saved = bool(state.get("partitioned"))
            raise ValueError(f"checkpoint was written with sparsity.partition_masks={str(saved).lower()}, this run has "
                             f"{str(not saved).lower()}; resume with the same setting (its masks are "
                             f"{'in per-rank fragment files' if saved else 'module buffers'})")
        if "tie_seed" not in state:
            raise ValueError("this checkpoint's masks were decided by dstlm's earlier rules (a generator, not the "
                             "seeded hashes of dstlm/sparse/selection.py); resume it with the dstlm version that "
                             "wrote it, or start a new run")
        self.tie_seed = int(state["tie_seed"])
        device = {sp.name: self._device for sp in self.params}
        # bit-packed since 2026-12-01 (2ae1b62); a checkpoint from before holds bool masks
        self.ever_active = {k: (pack_mask(v) if v.dtype == torch.bool else v).to(device.get(k, v.device), copy=True)
                            for k, v in state["ever_active"].items()}
        self.scores = Scores()
        self.scores.whole = {k: v.to(device.get(k, v.device), copy=True) for k, v in state["scores"].items()}
        self.scores.in_files = bool(state.get("scores_in_fragments"))  # read by `partition` from the files
        self.scores.steps = state["score_steps"]
        self.n_updates = state["n_updates"]
        for name, k in state["fan_in"].items():
            self.layers[name].fan_in = k
        self.last_stats = dict(state["last_stats"])


def include_of(model: nn.Module, cfg: SparsityConfig) -> list[str]:
    """The include patterns in force: the config's, or the model's default when unset."""
    return cfg.include if cfg.include is not None else getattr(model, "default_sparse_include", ["blocks.*"])


def sparse_params_of(model: nn.Module, cfg: SparsityConfig) -> list[SparseParam]:
    """The sparse matrices of `model` under the config's include / exclude patterns (unset include: the
    model's default); a model may choose them itself (`sparse_params`, e.g. the Hugging Face adapter)."""
    include = include_of(model, cfg)
    choose = getattr(model, "sparse_params", None)
    return choose(include, cfg.exclude) if choose is not None else select_params(model, include, cfg.exclude)


__all__ = ["MaskMismatchError", "SparseEngine", "TorchBackend", "include_of", "sparse_params_of"]
