"""What the engine reports about the masks: densities, the unit census and spread (telemetry after each
update), and the description printed at the start of a run."""

from __future__ import annotations

from dstlm.sparse.connectivity import MaskCounts, UnitLink, spread, unit_census


def density(counts: dict[str, MaskCounts]) -> float:
    return sum(c.active for c in counts.values()) / sum(c.numel for c in counts.values())


def census_stats(counts: dict[str, MaskCounts], links: list[UnitLink]) -> dict[str, float]:
    """Fan-in / fan-out spread, and with linked layers the dead and orphan units and the budget they waste."""
    s = spread(counts)
    out = {"fan_in_cv": s["fan_in_cv"], "fan_out_cv": s["fan_out_cv"]}
    if not links:
        return out
    c = unit_census(counts, links)
    return {**out, "dead_units": float(c["dead"]), "dead_unit_frac": c["dead_unit_frac"],
            "orphan_units": float(c["orphans"]), "wasted_weight_frac": c["wasted_weight_frac"]}


def describe(cfg, shapes: dict[str, tuple[int, int]], counts: dict[str, MaskCounts], partitioned: bool) -> str:
    """One line for the run's sparsity, and one per sparse matrix: its shape and density."""
    lines = [f"{cfg.method} at sparsity {cfg.sparsity:.3f} ({cfg.distribution}); {len(shapes)} sparse weights, "
             f"density {density(counts):.4f}" + (" (masks partitioned across ranks)" if partitioned else "")]
    for name, shape in shapes.items():
        c = counts[name]
        lines.append(f"  {name:<40} {str(shape):>14}  density {c.active / c.numel:.4f}")
    return "\n".join(lines)


def update_stats(after: dict[str, MaskCounts], kept: dict[str, int], ever: int, links: list[UnitLink],
                 drop_fraction: float, seconds: float, sharded: bool, reclaimed_rows=None) -> dict[str, float]:
    """A mask update's telemetry from the counts after it (over all ranks), the entries each matrix kept, and
    the ever-active count: density, churn (grown / active), ITOP rate, ablated rows, census and per-layer
    densities."""
    active = {n: c.active for n, c in after.items()}
    numel, total = sum(c.numel for c in after.values()), sum(active.values())
    ablated = sum(int((c.rows == 0).sum()) for c in after.values())
    stats = {"density": total / max(1, numel), "churn": (total - sum(kept.values())) / max(1, total),
             "itop": ever / max(1, numel), "ablated_neurons": float(ablated), "drop_fraction": drop_fraction,
             "update_ms": seconds * 1e3, "sharded": float(sharded)}
    if reclaimed_rows is not None:
        stats["reclaimed_rows"] = float(reclaimed_rows)
    stats.update(census_stats(after, links))
    stats.update({f"layer/{n}": active[n] / after[n].numel for n in active})
    return stats
