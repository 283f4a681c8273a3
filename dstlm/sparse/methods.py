"""DST methods: one class each, in one registry. The engine, the FLOP counter and the config validation ask
the method; none of them tests a method's name.

A method decides four things about one sparse [out, in] matrix at a time:
- `init_mask`: its first mask (and may fix the layer's exact budget, e.g. constant fan-in, N:M);
- `is_update_step`: after which optimizer steps masks change;
- `update`: the new mask from the weights, the old mask and (if `uses_dense_grad`) the dense-gradient score;
- `check_invariants`: what must hold of a mask between updates, judged on its per-row and per-column counts
  (`MaskCounts`: the same whether the mask is whole on a rank or partitioned across ranks).
and one thing about the run: `training_flops`, from the forward FLOPs with sparse and with dense weights.
The engine does everything shared: budgets and densities, the drop-fraction schedule, score capture,
zeroing weights and optimizer state, cross-rank checks, state for checkpoints.

Adding a method: subclass `DSTMethod` below (or in your own module imported before the config is built),
decorate it with `@register`, and give it a test file (tests/test_sparse_rules.py shows the pattern).
docs/architecture.md walks through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from dstlm.sparse import rules
from dstlm.sparse.connectivity import MaskCounts
from dstlm.sparse.density import Layer
from dstlm.sparse.schedule import UpdateSchedule, gmp_sparsity
from dstlm.sparse.selection import Ties, count, row_counts
from dstlm.sparse.selectors import Selector, whole

# `cfg` below is a dstlm.sparse.config.SparsityConfig; config imports this registry, so this module does not
# import config (not even for annotations): the dependency runs one way
SparsityConfig = Any


@dataclass
class Shard:
    """What a rule sees of one sparse [out, in] matrix: this process's entries of it (the whole matrix, or a
    rank's fragment: 1-D) and the selector that chooses among all of them (dstlm/sparse/selectors.py)."""

    weight: torch.Tensor
    """Weight values (fp32 master where one exists)."""
    mask: torch.Tensor
    """bool: the current mask at these entries."""
    score: Optional[torch.Tensor]
    """|dense gradient| accumulated over the score window (None for methods that read no gradient)."""
    select: Selector


class DSTMethod:
    """Base class: a static random mask of the layer's budget (subclasses override what differs)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    dynamic: ClassVar[bool] = True
    """Masks change during training."""
    uses_dense_grad: ClassVar[bool] = False
    """Updates need |dL/dW| over every entry (pruned ones included), captured before the update."""
    default_sparse_init: ClassVar[str] = "rescale"
    """sparsity.sparse_init when the config leaves it unset: the sparse-aware rescale for every method (the
    learning-quality study: without it val loss rose by 0.10-0.17 for SET, RigL and SRigL at 90 %; docs/results.md)."""
    fixed_sparsity: ClassVar[bool] = False
    """The method's structure fixes the sparsity (see `implied_sparsity`)."""
    can_reclaim: ClassVar[bool] = True
    """Supports sparsity.reclaim_dead_units (a dynamic method whose budget may move between rows)."""
    init_reads_weights: ClassVar[bool] = False
    """`init_mask` ranks the (randomly initialised) weights, rather than deciding from the shape alone."""
    constant_fan_in: ClassVar[bool] = False
    """Every active output unit keeps the same number of weights (condensed layers: sparsity.condensed)."""

    def __init__(self, cfg: "SparsityConfig") -> None:
        self.cfg = cfg

    # -- config -----------------------------------------------------------------------------------------
    @classmethod
    def implied_sparsity(cls, cfg: "SparsityConfig") -> Optional[float]:
        """The sparsity this method's structure fixes (None: the config chooses)."""
        return None

    @classmethod
    def check_config(cls, cfg: "SparsityConfig") -> None:
        """Refuse settings this method cannot honour (one line naming the field and the fix)."""
        if cfg.reclaim_dead_units and not (cls.dynamic and cls.can_reclaim):
            raise ValueError(f"sparsity.reclaim_dead_units=true needs a method that moves weights between rows; "
                             f"sparsity.method={cls.name} does not: use set, rigl or srigl, or drop the option")

    # -- masks ------------------------------------------------------------------------------------------
    def init_mask(self, layer: Layer, weight: torch.Tensor, ties: Ties) -> torch.Tensor:
        return rules.random_mask(layer.shape, layer.budget, ties, device=weight.device)

    def adopt_mask(self, layer: Layer, mask: torch.Tensor) -> None:
        """A mask that came with the model (kept, not re-pruned) fixes the layer's budget as it is."""
        layer.budget = count(mask)

    def init_mask_scored(self, layer: Layer, score: torch.Tensor, select: Selector, ties: Ties,
                         per_row: bool) -> torch.Tensor:
        """The first mask of a pretrained weight from an importance score >= 0 (this process's entries of it;
        |W| for magnitude, |W| * ||X_j|| for Wanda): the layer's budget of highest scores, per layer, or, with
        `per_row`, the same share in every output row (Wanda's comparison group). Methods with a row structure
        override it."""
        rows, cols = layer.shape
        if per_row:
            k = max(1, min(cols, int(round(layer.budget / rows))))
            layer.budget = rows * k
            return select.row_top(score, k, ties.sub("init-scored"))
        return select.top(score, layer.budget, ties.sub("init-scored"), total=select.numel)

    def is_update_step(self, t: int, schedule: UpdateSchedule) -> bool:
        return self.dynamic and schedule.is_update_step(t)

    def update(self, layer: Layer, shard: Shard, n_swap: int, t: int, schedule: UpdateSchedule,
               ties: Ties) -> torch.Tensor:
        """The new bool mask at the shard's entries (like `shard.mask`), decided with `shard.select`: the same
        mask wherever the entries live. `n_swap`: entries to drop (and regrow) at this step."""
        raise NotImplementedError(f"{self.name} does not update masks")

    def update_layer(self, layer: Layer, shard: Shard, n_swap: int, t: int, schedule: UpdateSchedule,
                     ties: Ties) -> torch.Tensor:
        """What the engine calls: `update`, and, when the engine marked `layer.dead_rows`, the dead rows' active
        weights dropped first and the same number regrown outside them (by |score| when the method reads
        the dense gradient, else at random). Methods that reclaim in their own way override this."""
        dead = layer.dead_rows
        if dead is None or count(dead) == 0:
            return self.update(layer, shard, n_swap, t, schedule, ties)
        s = shard.select
        in_dead = s.in_rows(dead)
        live = Shard(shard.weight, shard.mask & ~in_dead, shard.score, s)
        new = self.update(layer, live, n_swap, t, schedule, ties) & ~in_dead  # what the rule grew there moves too
        reclaimed = s.count(shard.mask) - s.count(new)
        return rules.reclaim(s, new, shard.score, dead, reclaimed, ties.sub("reclaim"))

    def check_invariants(self, layer: Layer, counts: MaskCounts) -> list[str]:
        nnz = counts.active
        return [] if nnz == layer.budget else [f"{layer.name}: {nnz} active != budget {layer.budget}"]

    # -- what an exported model states ------------------------------------------------------------------
    @classmethod
    def pattern(cls, sparsity: dict) -> str:
        """The masks' structure in words, for a model card (`sparsity`: the run's sparsity config as saved)."""
        return "unstructured"

    @classmethod
    def groups(cls, sparsity: dict) -> Optional[tuple[int, int]]:
        """(n, m) when every group of m consecutive inputs of a row holds at most n active weights (an export
        checks it on the reloaded weights), else None."""
        return None

    # -- cost -------------------------------------------------------------------------------------------
    def training_flops(self, f_sparse: float, f_dense: float, delta_t: int) -> float:
        """Training FLOPs per token (forward + backward) from the forward FLOPs with sparse weights
        (`f_sparse`) and with every sparse weight dense (`f_dense`): 3 f_s, plus, for methods that read the
        dense gradient, its extra cost once every delta_t steps: (3 f_s delta_t + 2 f_s + f_D) / (delta_t + 1)."""
        if self.uses_dense_grad and self.dynamic:
            return (3 * f_sparse * delta_t + 2 * f_sparse + f_dense) / (delta_t + 1)
        return 3.0 * f_sparse


METHODS: dict[str, type[DSTMethod]] = {}


def register(cls: type[DSTMethod]) -> type[DSTMethod]:
    """Class decorator: make a method available as `sparsity.method: <cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a `name` to be registered")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"a DST method named {cls.name!r} is already registered ({METHODS[cls.name].__qualname__})")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[DSTMethod]:
    if name not in METHODS:
        raise ValueError(f"sparsity.method={name!r} is unknown; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


# -- the built-in methods ---------------------------------------------------------------------------------
@register
class Static(DSTMethod):
    name = "static"
    summary = "a random mask at the layer's density, fixed for the whole run"
    dynamic = False


@register
class SET(DSTMethod):
    name = "set"
    summary = "drop the smallest |W|, regrow at random (Mocanu et al. 2018)"

    def update(self, layer, shard, n_swap, t, schedule, ties):
        return rules.drop_and_grow(shard.select, shard.weight, shard.mask, None, n_swap, ties)


@register
class RigL(DSTMethod):
    name = "rigl"
    summary = "drop the smallest |W|, regrow the largest |dense gradient| (Evci et al. 2020)"
    uses_dense_grad = True

    def update(self, layer, shard, n_swap, t, schedule, ties):
        return rules.drop_and_grow(shard.select, shard.weight, shard.mask, shard.score, n_swap, ties)


@register
class SRigL(DSTMethod):
    name = "srigl"
    constant_fan_in = True
    summary = "RigL with a constant fan-in per active row and neuron ablation (Lasby et al. 2024)"
    uses_dense_grad = True

    def init_mask(self, layer, weight, ties):
        layer.fan_in = max(1, layer.budget // layer.shape[0])
        mask = rules.constant_fan_in_mask(layer.shape, layer.fan_in, ties, device=weight.device)
        layer.budget = count(mask)  # rows x fan-in: the exact count constant fan-in allows
        return mask

    def adopt_mask(self, layer, mask):
        layer.budget = count(mask)
        layer.fan_in = int(row_counts(mask).max()) if mask.numel() else 0

    def init_mask_scored(self, layer, score, select, ties, per_row):  # the fan-in highest of every row
        layer.fan_in = max(1, layer.budget // layer.shape[0])
        layer.budget = layer.shape[0] * layer.fan_in
        return select.row_top(score, layer.fan_in, ties.sub("init-scored"))

    @classmethod
    def pattern(cls, sparsity):
        return "constant fan-in per output row (ablated rows all zero)"

    def update(self, layer, shard, n_swap, t, schedule, ties):
        allow = self.cfg.ablation and not layer.protected
        new, layer.fan_in = rules.srigl_update(shard.select, shard.weight, shard.mask, shard.score, n_swap,
                                               layer.budget, self.cfg.gamma_sal, allow, ties,
                                               force_ablate=layer.dead_rows)
        return new

    def update_layer(self, layer, shard, n_swap, t, schedule, ties):
        return self.update(layer, shard, n_swap, t, schedule, ties)  # dead rows: ablated

    def check_invariants(self, layer, counts):
        problems, rows, nnz = [], counts.rows, counts.active
        if not bool(((rows == 0) | (rows == layer.fan_in)).all()):
            problems.append(f"{layer.name}: active rows do not all have fan-in {layer.fan_in}")
        if nnz > layer.budget:
            problems.append(f"{layer.name}: {nnz} active > budget {layer.budget}")
        return problems


@register
class GMP(DSTMethod):
    name = "gmp"
    can_reclaim = False
    summary = "gradual magnitude pruning from dense (or gmp_initial_sparsity) on a cubic ramp (Zhu & Gupta 2017)"

    def init_mask(self, layer, weight, ties):
        return torch.ones(layer.shape, dtype=torch.bool, device=weight.device)  # dense start, pruned by the schedule

    def init_mask_scored(self, layer, score, select, ties, per_row):
        return ~select.zeros()  # gradual: the schedule prunes (by magnitude) to the target

    def is_update_step(self, t, schedule):  # prunes at t_end itself too (the ramp ends there)
        return t >= 1 and schedule.t_start <= t <= schedule.t_end and t % schedule.delta_t == 0

    def _n_keep(self, layer, t, schedule) -> int:
        cfg = self.cfg
        s_t = gmp_sparsity(t, cfg.gmp_initial_sparsity, cfg.sparsity, schedule.t_start, schedule.t_end)
        density = 1.0 - (1.0 - layer.density) * (s_t / cfg.sparsity if cfg.sparsity else 0)
        return int(round(density * math.prod(layer.shape)))

    def update(self, layer, shard, n_swap, t, schedule, ties):
        return rules.gmp_prune(shard.select, shard.weight, shard.mask, self._n_keep(layer, t, schedule), ties)

    def check_invariants(self, layer, counts):
        return []  # the count follows the ramp


@register
class NM(DSTMethod):
    name = "nm"
    constant_fan_in = True
    summary = "N:M: n active in every m consecutive inputs of a row, regrown by |dense gradient| within groups"
    uses_dense_grad = True
    fixed_sparsity = True
    can_reclaim = False  # every group of every row must keep n active
    init_reads_weights = True  # the n largest |W| of every group

    @classmethod
    def implied_sparsity(cls, cfg):
        return 1.0 - cfg.n / cfg.m

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        if not (isinstance(cfg.n, int) and isinstance(cfg.m, int) and 0 < cfg.n < cfg.m):
            raise ValueError(f"sparsity.n={cfg.n}, sparsity.m={cfg.m}: need integers 0 < n < m (e.g. 2:4)")

    @classmethod
    def pattern(cls, sparsity):
        return f"{sparsity['n']}:{sparsity['m']} along the input dimension"

    @classmethod
    def groups(cls, sparsity):
        return sparsity["n"], sparsity["m"]

    def init_mask(self, layer, weight, ties):
        return self.init_mask_scored(layer, weight.detach(), whole(layer.shape, weight.device), ties, False)

    def init_mask_scored(self, layer, score, select, ties, per_row):  # the n highest scores of every group
        cols, m = layer.shape[1], self.cfg.m
        if cols % m:
            raise ValueError(f"{layer.name}: N:M needs its input dimension ({cols}) divisible by m={m}; keep it dense "
                             f"(sparsity.exclude: ['{layer.name}']) or choose an m that divides {cols}")
        mask = rules.nm_mask(select, score, self.cfg.n, m, ties)
        layer.budget = select.count(mask)
        return mask

    def update(self, layer, shard, n_swap, t, schedule, ties):
        return rules.nm_update(shard.select, shard.weight, shard.mask, shard.score, n_swap, self.cfg.n, self.cfg.m,
                               ties)
