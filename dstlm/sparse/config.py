"""Typed configuration of dynamic sparse training (one YAML fragment in configs/sparsity/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

METHODS = ("static", "set", "rigl", "srigl", "gmp", "nm")
DISTRIBUTIONS = ("uniform", "er", "erk")
SCHEDULES = ("cosine", "constant", "linear")


@dataclass
class SparsityConfig:
    """How weights are masked and how masks evolve. Field docstrings are the CLI help."""

    method: str = "rigl"
    """static | set | rigl | srigl | gmp | nm (N:M; dynamic when delta_t > 0 and nm_dynamic)."""
    sparsity: float = 0.9
    """Target fraction of zero weights over all sparsified layers (final sparsity for gmp)."""
    distribution: str = "erk"
    """Per-layer densities: uniform | er | erk."""
    erk_power: float = 1.0
    """Exponent of the ERK raw score."""
    include: list[str] = field(default_factory=lambda: ["blocks.*"])
    """fnmatch patterns of parameter names to sparsify (only >= 2-D weights are taken)."""
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
    sparse_init: Optional[Literal["rescale"]] = None
    """'rescale': scale each row's initial weights by sqrt(fan_in / active_fan_in) so the output variance
    matches the dense init (SRigL's sparse-aware init); default for srigl."""
    gmp_initial_sparsity: float = 0.0
    """GMP: sparsity at t_start."""
    n: int = 2
    """N:M: active weights per group."""
    m: int = 4
    """N:M: group size (consecutive input weights of a row)."""
    grad_accumulation: int = 1
    """Average the dense-gradient score over the last this-many optimizer steps before an update."""
    verify_every: int = 0
    """Check W == W*M and zero optimizer state every N steps (0 = only at mask updates)."""
    seed: Optional[int] = None
    """Seed of mask init and tie-breaks (default: the run seed)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"sparsity.method={self.method!r} is unknown; choose one of: {', '.join(METHODS)}")
        if self.method == "nm":
            if not (0 < self.n < self.m):
                raise ValueError(f"sparsity.n={self.n}, sparsity.m={self.m}: need 0 < n < m (e.g. 2:4)")
            self.sparsity = 1.0 - self.n / self.m
            self.distribution = "uniform"
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity.sparsity={self.sparsity} must be in [0, 1)")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"sparsity.distribution={self.distribution!r} is unknown; choose one of: "
                             f"{', '.join(DISTRIBUTIONS)}")
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
        if not 0.0 < self.gamma_sal <= 1.0:
            raise ValueError(f"sparsity.gamma_sal={self.gamma_sal} must be in (0, 1]")
        if not 0.0 <= self.gmp_initial_sparsity <= self.sparsity:
            raise ValueError(f"sparsity.gmp_initial_sparsity={self.gmp_initial_sparsity} must be in "
                             f"[0, sparsity={self.sparsity}]")
        for pattern, s in self.overrides.items():
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity.overrides[{pattern!r}]={s} must be in [0, 1)")
        if self.grad_accumulation < 1:
            raise ValueError(f"sparsity.grad_accumulation={self.grad_accumulation} must be >= 1")
        if self.sparse_init is None and self.method == "srigl":
            self.sparse_init = "rescale"

    @property
    def dynamic(self) -> bool:
        return self.method in ("set", "rigl", "srigl", "gmp", "nm")

    def resolve_t_end(self, max_steps: int) -> int:
        if isinstance(self.t_end, float):
            return max(self.t_start + 1, int(self.t_end * max_steps))
        return self.t_end
