"""Typed configuration of dynamic sparse training (one YAML fragment in configs/sparsity/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from dstlm.config_types import check_field_types
from dstlm.sparse.methods import DSTMethod, method_class

DISTRIBUTIONS = ("uniform", "er", "erk")
SCHEDULES = ("cosine", "constant", "linear")


@dataclass
class SparsityConfig:
    """How weights are masked and how masks evolve. Field docstrings are the CLI help."""

    method: str = "rigl"
    """A registered DST method (dstlm.sparse.methods.METHODS): static | set | rigl | srigl | gmp | nm (N:M,
    regrown within groups); see docs/sparse-training.md."""
    sparsity: Optional[float] = None
    """Target fraction of zero weights over all sparsified layers (final sparsity for gmp). Unset: 0.9, or
    what the method's structure fixes (nm: 1 - n/m)."""
    distribution: Optional[str] = None
    """Per-layer densities: uniform | er | erk. Unset: erk (uniform for nm, whose groups fix every layer)."""
    erk_power: float = 1.0
    """Exponent of the ERK raw score."""
    include: Optional[list[str]] = None
    """fnmatch patterns of parameter names to sparsify (only >= 2-D weights are taken). Unset: the model's
    default, ["blocks.*"] for dstlm's GPT, every sparsifiable weight of a Hugging Face model (its manifest)."""
    exclude: list[str] = field(default_factory=list)
    """Patterns to keep dense (embeddings, LM head, norms and biases are never sparsified)."""
    overrides: dict[str, float] = field(default_factory=dict)
    """Per-layer sparsity by pattern, e.g. {"blocks.0.*": 0.5}; the rest is re-solved to keep the target."""
    delta_t: int = 100
    """Optimizer steps between mask updates."""
    t_start: int = 0
    """First step at which masks may update."""
    t_end: Union[int, float] = 0.75
    """Last update step: an int step, or a float in (0, 1] = fraction of trainer.max_steps."""
    drop_fraction: float = 0.3
    """alpha: fraction of active weights swapped at the first update (decays per drop_schedule)."""
    drop_schedule: str = "cosine"
    """cosine | constant | linear decay of the drop fraction up to t_end."""
    gamma_sal: float = 0.3
    """SRigL: a row survives if it holds at least gamma_sal * fan-in salient weights."""
    ablation: bool = True
    """SRigL: allow neuron (row) ablation."""
    no_ablate: list[str] = field(default_factory=list)
    """SRigL: patterns of layers never ablated (the last sparsified layer is always protected)."""
    mask_init: Optional[Literal["random", "magnitude", "wanda"]] = None
    """First masks: 'random' (hashed, the default for models trained from scratch), 'magnitude' (the largest
    |W| of each layer, or of each row / group where the method's structure says so; the default for
    pretrained models) or 'wanda' (|W| * ||X_j||, input-activation norms from calibration batches of the
    training data, compared per output row). An existing mask (a checkpoint, an exported sparse model) is
    always kept instead."""
    wanda_batches: int = 8
    """mask_init=wanda: training micro-batches whose activations give the input norms."""
    sparse_init: Optional[Literal["rescale", "none"]] = None
    """'rescale': scale each row's initial weights by sqrt(fan_in / active_fan_in) so the output variance
    matches the dense init (SRigL's sparse-aware init); 'none': keep the dense init. Unset: the method's
    default (rescale for every built-in method; only random first masks of freshly initialised weights are
    rescaled, never pretrained or kept weights)."""
    gmp_initial_sparsity: float = 0.0
    """GMP: sparsity at t_start."""
    n: int = 2
    """N:M: active weights per group."""
    m: int = 4
    """N:M: group size (consecutive input weights of a row)."""
    reclaim_dead_units: bool = False
    """At each update, give back the active weights of producer rows whose hidden unit no consumer weight reads
    any more (dead units: docs/sparse-training.md); they get no gradient. SET/RigL drop them and regrow as many
    where gradients flow; SRigL ablates those rows (their budget goes to the surviving rows). set, rigl, srigl."""
    grad_accumulation: int = 1
    """Average the dense-gradient score over the last this-many optimizer steps before an update."""
    verify_every: int = 0
    """Check W == W*M and zero optimizer state every N steps (0 = only at mask updates)."""
    seed: Optional[int] = None
    """Seed of mask init and tie-breaks (default: the run seed)."""
    condensed: bool = False
    """Compute the sparse linear layers condensed in training (active weights only, dstlm's CPU kernel; fp32
    on the CPU; methods with constant fan-in: srigl, nm). Same parameters, masks and checkpoints as masked
    training; docs/condensed.md."""
    partition_masks: Optional[bool] = None
    """ZeRO-3 only: each rank holds only the masks of its own partition of the weights ((1 + 1/8) bytes per sparse
    weight / world instead of 1.125 bytes on every rank), decides them there and saves them beside its
    optimizer partition; the same masks, weights and losses as whole masks. Unset: true under ZeRO-3
    (deepspeed_stage_3), false under every other strategy. docs/distributed.md."""

    def __post_init__(self) -> None:
        check_field_types(self, "sparsity")
        self._take_method_values()
        self._check_ranges()
        self._check_schedule()

    def _take_method_values(self) -> None:
        """Unset fields take the method's values; a set field that contradicts the method is refused."""
        cls = method_class(self.method)
        cls.check_config(self)
        if self.condensed and not cls.constant_fan_in:
            raise ValueError(f"sparsity.condensed=true needs constant fan-in, which sparsity.method={self.method} does "
                             f"not keep; use method srigl or nm, or condensed=false")
        implied = cls.implied_sparsity(self)
        if self.sparsity is None:
            self.sparsity = 0.9 if implied is None else implied
        elif implied is not None and abs(self.sparsity - implied) > 1e-9:
            raise ValueError(f"sparsity.sparsity={self.sparsity} contradicts sparsity.method={self.method} "
                             f"(here n={self.n}, m={self.m}), which fixes it at {implied:g}; drop sparsity.sparsity "
                             f"or set {implied:g}")
        if self.distribution is None:
            self.distribution = "uniform" if cls.fixed_sparsity else "erk"
        elif cls.fixed_sparsity and self.distribution != "uniform":
            raise ValueError(f"sparsity.distribution={self.distribution!r} contradicts sparsity.method={self.method}, "
                             f"which gives every layer the same density; drop sparsity.distribution or set uniform")
        if self.sparse_init is None:
            self.sparse_init = cls.default_sparse_init

    def _check_ranges(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity.sparsity={self.sparsity} must be in [0, 1)")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"sparsity.distribution={self.distribution!r} is unknown; choose one of: "
                             f"{', '.join(DISTRIBUTIONS)}")
        if not 0.0 < self.gamma_sal <= 1.0:
            raise ValueError(f"sparsity.gamma_sal={self.gamma_sal} must be in (0, 1]")
        if not 0.0 <= self.gmp_initial_sparsity <= self.sparsity:
            raise ValueError(f"sparsity.gmp_initial_sparsity={self.gmp_initial_sparsity} must be in "
                             f"[0, sparsity={self.sparsity}]")
        for pattern, s in self.overrides.items():
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity.overrides[{pattern!r}]={s} must be in [0, 1)")
        if self.wanda_batches < 1:
            raise ValueError(f"sparsity.wanda_batches={self.wanda_batches} must be >= 1")

    def _check_schedule(self) -> None:
        if self.drop_schedule not in SCHEDULES:
            raise ValueError(f"sparsity.drop_schedule={self.drop_schedule!r} is unknown; choose one of: "
                             f"{', '.join(SCHEDULES)}")
        if not isinstance(self.delta_t, int) or self.delta_t <= 0:
            raise ValueError(f"sparsity.delta_t={self.delta_t!r} must be a positive integer (steps between updates)")
        if self.t_start < 0:
            raise ValueError(f"sparsity.t_start={self.t_start} must be >= 0")
        if isinstance(self.t_end, float) and not 0.0 < self.t_end <= 1.0:
            raise ValueError(f"sparsity.t_end={self.t_end} as a fraction must be in (0, 1]; or give an int step")
        if isinstance(self.t_end, int) and self.t_end <= self.t_start:
            raise ValueError(f"sparsity.t_end={self.t_end} is not after sparsity.t_start={self.t_start}")
        if not 0.0 < self.drop_fraction <= 1.0:
            raise ValueError(f"sparsity.drop_fraction={self.drop_fraction} must be in (0, 1]")
        if not 1 <= self.grad_accumulation <= self.delta_t:
            raise ValueError(f"sparsity.grad_accumulation={self.grad_accumulation} must be in [1, sparsity.delta_t="
                             f"{self.delta_t}] (the steps before each update whose gradients are averaged)")

    @property
    def method_class(self) -> type[DSTMethod]:
        return method_class(self.method)

    @property
    def dynamic(self) -> bool:
        return self.method_class.dynamic

    def resolve_t_end(self, max_steps: int) -> int:
        if isinstance(self.t_end, float):
            return max(self.t_start + 1, int(self.t_end * max_steps))
        return self.t_end
