"""When masks update and by how much: ΔT, t_start, T_end, drop-fraction decay, GMP's cubic ramp."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class UpdateSchedule:
    delta_t: int
    t_start: int
    t_end: int
    alpha: float
    kind: str = "cosine"

    def is_update_step(self, t: int) -> bool:
        """Masks change after optimizer step t when t_start <= t < t_end and t % ΔT == 0 (t >= 1)."""
        return t >= 1 and self.t_start <= t < self.t_end and t % self.delta_t == 0

    def drop_fraction(self, t: int) -> float:
        """cosine: α/2 (1 + cos(π t / T_end)); linear: α (1 − t / T_end); constant: α."""
        if self.kind == "constant":
            return self.alpha
        frac = min(1.0, t / self.t_end)
        if self.kind == "linear":
            return self.alpha * (1.0 - frac)
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * frac))


def gmp_sparsity(t: int, s_initial: float, s_final: float, t_start: int, t_end: int) -> float:
    """Zhu & Gupta: s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t_end − t0))^3, clamped to [t0, t_end]."""
    if t <= t_start:
        return s_initial
    if t >= t_end:
        return s_final
    return s_final + (s_initial - s_final) * (1.0 - (t - t_start) / (t_end - t_start)) ** 3
