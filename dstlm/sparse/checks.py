"""What must hold between mask updates, checked where the masks live: the ranks agree on their masks, pruned
entries are exactly zero in weights and optimizer state, and each method's own invariants."""

from __future__ import annotations

from typing import Optional

import torch

from dstlm.sparse.connectivity import MaskCounts
from dstlm.sparse.density import Layer
from dstlm.sparse.masks import SparseParam, mask_checksum, param_name


class MaskMismatchError(ValueError):
    """Masks that must agree do not (across ranks, or a sharded decision against its whole-tensor reference);
    a ValueError, so the command line prints it as one line."""


def check_ranks_agree(params: list[SparseParam], layers: dict[str, Layer], backend, t: int, device,
                      active: Optional[dict[str, int]] = None, when: str = "after") -> None:
    """Stop if the ranks' masks disagree, naming the layers and the ranks that differ from rank 0. Masks joined
    from shards are the same bytes on every rank by construction (one all-reduce result): then what must agree
    is checked, every layer's active count (`active`, as the update counted it) and fan-in; otherwise masks
    are compared by checksum (count and position hash). `when`: 'before' checks the masks as they entered the
    update (a rank whose masks drifted since the last one), 'after' the new masks."""
    if backend.world_size == 1:
        return
    if active is not None:
        values = torch.tensor([[active[sp.name], layers[sp.name].fan_in or 0] for sp in params])
    else:
        values = mask_checksum(sp.mask for sp in params)
    gathered = backend.all_gather(values.to(device))
    differ = {}
    for i, sp in enumerate(params):
        ranks = [r for r, g in enumerate(gathered) if not torch.equal(g[i], gathered[0][i])]
        if ranks:
            differ[sp.name] = ranks
    if differ:
        raise MaskMismatchError(_disagreement(differ, t, when))


def _disagreement(differ: dict[str, list[int]], t: int, when: str) -> str:
    first, ranks = next(iter(differ.items()))
    more = f" and {len(differ) - 1} more layer(s)" if len(differ) > 1 else ""
    moment = f"entering the mask update of step {t}" if when == "before" else f"after the mask update of step {t}"
    return (f"the mask of {first}{more} differs across data-parallel ranks {moment} (rank(s) {ranks} disagree with "
            f"rank 0); training stopped (every rank must hold the same masks: same scores, seeds and code)")


@torch.no_grad()
def violations(groups: list[list[SparseParam]], local_mask, backend, device) -> list[str]:
    """W == W*M (fp32 master and module copy) and zero optimizer state off the mask: each rank counts on what it
    holds (`local_mask(group)`), one all-reduce joins the counts, so every rank returns the same list."""
    counts = torch.stack([backend.violations(g[0].weight, local_mask(g)).to(torch.int64).cpu() for g in groups])
    if backend.world_size > 1:
        counts = backend.all_reduce_sum_(counts.to(device)).cpu()
    what = ("non-zero weights", "non-zero module weights", "non-zero optimizer state")
    return [f"{param_name(g)}: {what[i]} at pruned entries ({n})" for g, row in zip(groups, counts.tolist())
            for i, n in enumerate(row) if n]


def method_invariants(method, layers: dict[str, Layer], counts: dict[str, MaskCounts]) -> list[str]:
    return [p for name, c in counts.items() for p in method.check_invariants(layers[name], c)]


def check_resumable(state: dict, cfg) -> None:
    """Refuse engine state (a checkpoint's) that this sparsity config cannot continue, in one line with the fix."""
    if state["method"] != cfg.method or abs(state["sparsity"] - cfg.sparsity) > 1e-9:
        raise ValueError(f"checkpoint was trained with sparsity.method={state['method']!r} at sparsity "
                         f"{state['sparsity']}, this run has {cfg.method!r} at {cfg.sparsity}; "
                         f"resume with the same sparsity config")
    if bool(state.get("partitioned")) != bool(cfg.partition_masks):
        saved = bool(state.get("partitioned"))
        raise ValueError(f"checkpoint was written with sparsity.partition_masks={str(saved).lower()}, this run has "
                         f"{str(not saved).lower()}; resume with the same setting (its masks are "
                         f"{'in per-rank fragment files' if saved else 'module buffers'})")
    if "tie_seed" not in state:
        raise ValueError("this checkpoint's masks were decided by dstlm's earlier rules (a generator, not the "
                         "seeded hashes of dstlm/sparse/selection.py); resume it with the dstlm version that "
                         "wrote it, or start a new run")
