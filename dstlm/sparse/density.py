"""Per-layer densities and budgets: uniform, ER and ERK (with the dense-layer re-solve), plus fixed overrides;
`plan_layers` turns a sparsity config into what the engine and the methods know of each sparse matrix."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch


@dataclass
class Layer:
    """What the engine knows of one sparse matrix; methods read it and may update budget and fan_in."""

    name: str
    shape: tuple[int, int]
    density: float
    """Target (final) density from the distribution and overrides."""
    budget: int
    """Active weights the layer holds between updates."""
    protected: bool = False
    """Never ablate whole rows (SRigL): the last sparse layer and `no_ablate` patterns."""
    fan_in: Optional[int] = None
    """Active inputs per active row, for constant fan-in methods."""
    dead_rows: Optional[torch.Tensor] = None
    """Set by the engine for one update when sparsity.reclaim_dead_units is on: bool [rows], the rows whose
    unit no consumer reads (dstlm/sparse/connectivity.py). Their weights get no gradient: reclaim them."""


def plan_layers(shapes: Mapping[str, tuple[int, int]], cfg: Any) -> dict[str, Layer]:
    """Every sparse matrix's `Layer`, in the order of `shapes`, from a SparsityConfig (`cfg`): densities by the
    distribution with the overrides fixed, integer budgets summing to the global target, and the matrices never
    ablated (the last one, and `no_ablate` patterns)."""
    fixed = {n: 1.0 - s for pat, s in cfg.overrides.items() for n in shapes if fnmatch.fnmatchcase(n, pat)}
    density = 1.0 - cfg.sparsity
    densities = erk_densities(shapes, density, cfg.erk_power, fixed, cfg.distribution)
    budgets = active_counts(shapes, densities, density)
    names = list(shapes)
    protected = set(names[-1:]) | {n for n in names for pat in cfg.no_ablate if fnmatch.fnmatchcase(n, pat)}
    return {n: Layer(n, tuple(shapes[n]), densities[n], budgets[n], n in protected) for n in names}


def raw_score(shape: Sequence[int], power: float = 1.0) -> float:
    """ERK raw score (sum of dims / product of dims)^power; for a linear layer it equals ER."""
    return (sum(shape) / math.prod(shape)) ** power


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float, power: float = 1.0,
                  fixed: Mapping[str, float] | None = None, method: str = "erk") -> dict[str, float]:
    """Densities d_l with sum_l d_l N_l = density * sum_l N_l.

    `fixed` layers keep their given density; the others get eps * p_l. A layer whose eps * p_l exceeds 1
    becomes dense and eps is solved again, until none does. method="uniform" gives every free layer the
    same density (re-solved around the fixed ones); "er" and "erk" use raw_score (equal for 2-D weights).
    """
    fixed = dict(fixed or {})
    numel = {n: math.prod(s) for n, s in shapes.items()}
    score = {n: (1.0 if method == "uniform" else raw_score(s, power)) for n, s in shapes.items()}
    eps, dense = _solve(numel, score, fixed, density)
    return {n: fixed[n] if n in fixed else 1.0 if n in dense else eps * score[n] for n in shapes}


def _solve(numel: Mapping[str, int], score: Mapping[str, float], fixed: Mapping[str, float],
           density: float) -> tuple[float, set[str]]:
    """(eps, the layers made dense): the free layers' densities eps * score meet the global budget."""
    total = sum(numel.values())
    taken = sum(fixed[n] * numel[n] for n in fixed)  # the overrides' share of the budget
    dense: set[str] = set()
    eps = 0.0
    while True:
        free = [n for n in numel if n not in fixed.keys() | dense]
        if not free:
            return eps, dense
        eps = (density * total - taken - sum(numel[n] for n in dense)) / sum(score[n] * numel[n] for n in free)
        if eps < 0:
            raise ValueError(f"the overrides already use more than the global density {density:.4f}; "
                             f"lower sparsity.overrides or raise sparsity.sparsity")
        over = [n for n in free if eps * score[n] > 1.0]
        if not over:
            return eps, dense
        dense.update(over)


def active_counts(shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float],
                  density: float) -> dict[str, int]:
    """Integer non-zero budgets per layer whose sum equals round(density * total) exactly
    (largest-remainder rounding), so the global density is the target to one weight."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    exact = {n: densities[n] * numel[n] for n in shapes}
    counts = {n: min(numel[n], int(math.floor(exact[n]))) for n in shapes}
    target = min(sum(numel.values()), int(round(density * sum(numel.values()))))
    short = target - sum(counts.values())
    by_remainder = sorted(shapes, key=lambda n: (exact[n] - counts[n]), reverse=True)
    i = 0
    while short > 0 and i < 10 * len(by_remainder) + 10:
        n = by_remainder[i % len(by_remainder)]
        if counts[n] < numel[n] and densities[n] < 1.0:
            counts[n] += 1
            short -= 1
        i += 1
    return counts
