"""Connectivity across sparse layers: a hidden unit is useful only if the layer that produces it and the
layer that consumes it both keep weights for it.

A `UnitLink(producer, consumer)` pairs two sparse [out, in] matrices: row i of the producer computes unit i,
column i of the consumer reads it (an MLP's fc_in / fc_out, attention's v_proj / out_proj, an expert's
w_in.e / w_out.e). Two ways a unit wastes budget:
- dead: the consumer's column i is empty. Nothing downstream reads the unit, so the producer's row i gets
  exactly zero gradient for ever: its active weights are budget that cannot learn (and weights grown there
  stay 0).
- orphan: the producer's row i is empty. The unit outputs a constant (0 without bias), so the consumer's
  column i gets no useful gradient.
Per-row rules (SRigL's constant fan-in, its ablation) judge each row alone and cannot see either case.

`spread` measures the milder form of the same thing: how unevenly a matrix's active weights sit on its rows
(fan-in) and columns (fan-out). Gradient-driven growth (RigL) adds weights where gradients are large, which is
the same rows and columns update after update; random growth (SET) keeps the spread of a random mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence, Union

import torch

from dstlm.sparse.selection import column_counts, count, row_counts


class MaskCounts(NamedTuple):
    """Active entries per row (fan-in, int64 [out]) and per column (fan-out, int64 [in]) of one [out, in]
    mask: all that the census, the spread, densities and the per-row invariants read. Masks partitioned
    across ranks sum their fragments' partial counts (one all-reduce) instead of joining the masks."""

    rows: torch.Tensor
    cols: torch.Tensor

    @classmethod
    def of(cls, mask: torch.Tensor) -> "MaskCounts":
        return cls(row_counts(mask), column_counts(mask))

    @property
    def active(self) -> int:
        return int(self.rows.sum())

    @property
    def numel(self) -> int:
        return self.rows.numel() * self.cols.numel()


MaskOrCounts = Union[torch.Tensor, MaskCounts]


def counts_of(m: MaskOrCounts) -> MaskCounts:
    return m if isinstance(m, MaskCounts) else MaskCounts.of(m)


@dataclass(frozen=True)
class UnitLink:
    producer: str
    """Sparse matrix whose row i computes unit i."""
    consumer: str
    """Sparse matrix whose column i reads unit i."""


def links_between(pairs: Sequence[tuple[str, str]], shapes: Mapping[str, tuple[int, int]]) -> list[UnitLink]:
    """The (producer, consumer) pairs whose two matrices are both sparse here and agree on the unit count;
    others (a dense side, a Sparse-IFT layer that no longer has that name) are left out."""
    out = []
    for p, c in pairs:
        if p in shapes and c in shapes and shapes[p][0] == shapes[c][1]:
            out.append(UnitLink(p, c))
    return out


@torch.no_grad()
def dead_units(producer: torch.Tensor, consumer: torch.Tensor) -> torch.Tensor:
    """Bool [units]: units whose consumer column is empty (producer [units, in], consumer [out, units])."""
    return column_counts(consumer) == 0


@torch.no_grad()
def unit_census(masks: Mapping[str, MaskOrCounts], links: Sequence[UnitLink]) -> dict:
    """Per link and in total: units, dead units and the producer weights they hold, orphan units and the
    consumer weights they hold. Fractions are of the units, and of the active weights of the linked layers.
    The producer's row counts and the consumer's column counts say it all (`masks`: masks or their counts)."""
    per_link, units = {}, 0
    dead = orphans = dead_w = orphan_w = active = 0
    for link in links:
        rows, cols = counts_of(masks[link.producer]).rows, counts_of(masks[link.consumer]).cols
        d, o = cols == 0, rows == 0
        row = {"units": int(d.numel()), "dead": count(d), "dead_weights": int(rows[d].sum()),
               "orphans": count(o), "orphan_weights": int(cols[o].sum()),
               "active": int(rows.sum()) + int(cols.sum())}
        per_link[f"{link.producer}->{link.consumer}"] = row
        units += row["units"]
        dead += row["dead"]
        dead_w += row["dead_weights"]
        orphans += row["orphans"]
        orphan_w += row["orphan_weights"]
        active += row["active"]
    return {"links": per_link, "units": units, "dead": dead, "orphans": orphans,
            "dead_unit_frac": dead / max(1, units), "orphan_unit_frac": orphans / max(1, units),
            "wasted_weight_frac": (dead_w + orphan_w) / max(1, active)}


@torch.no_grad()
def spread(masks: Mapping[str, MaskOrCounts]) -> dict:
    """How unevenly each [out, in] mask's active weights are spread: the coefficient of variation (std / mean)
    of its per-row counts (fan-in) and per-column counts (fan-out), per matrix and averaged over matrices. A
    uniformly random mask of density d has a fan-in CV of about sqrt((1 - d) / (in * d)) (0.11 for 90 % sparse
    and 768 inputs); constant fan-in (SRigL) has 0 over its active rows, more when rows are ablated."""
    per = {}
    for name, m in masks.items():
        c = counts_of(m)
        rows, cols = c.rows.double(), c.cols.double()
        mean_r, mean_c = rows.mean(), cols.mean()
        per[name] = {"fan_in_cv": float(rows.std(unbiased=False) / mean_r) if mean_r > 0 else 0.0,
                     "fan_out_cv": float(cols.std(unbiased=False) / mean_c) if mean_c > 0 else 0.0}
    n = max(1, len(per))
    return {"matrices": per, "fan_in_cv": sum(v["fan_in_cv"] for v in per.values()) / n,
            "fan_out_cv": sum(v["fan_out_cv"] for v in per.values()) / n}
