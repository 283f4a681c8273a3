"""Mask rules: pure functions of (weight, mask, score, counts, tie-breaks) -> new mask.

All tensors are one layer's [out, in] view, on whatever device holds them. Every choice is an exact top-k in
the total order of `dstlm.sparse.selection` (by value, ties by a seeded hash of the entry's index in the
layer, `Ties`), so every rank, device and (later) shard that sees the same values takes the same decision.
Each selection inside a rule draws its ties from its own sub-scope. Rules only choose masks; zeroing weights
and optimizer state is the engine's job.
"""

from __future__ import annotations

from typing import Optional

import torch

from dstlm.sparse.selection import Ties, count, row_counts, row_top_k, top_k


def random_mask(shape: tuple[int, ...], n_active: int, ties: Ties, device=None) -> torch.Tensor:
    """Exactly n_active True entries at positions chosen by the hash alone (uniformly random to a user)."""
    return top_k(torch.zeros(shape, device=device), n_active, ties.sub("random"))


_INIT_BLOCK = 1 << 20  # entries per block of a first constant-fan-in mask


def constant_fan_in_mask(shape: tuple[int, int], fan_in: int, ties: Ties, device=None) -> torch.Tensor:
    """Every row gets exactly `fan_in` random active inputs (SRigL init), each row its own (the hash runs over
    the flat index, so rows do not share one column order: a shared order would give every row the same
    inputs and leave the other columns, i.e. the hidden units they read, with no weight at all)."""
    rows, cols = shape
    ties = ties.sub("fan-in")
    # blocks of rows, each tie-broken by the entries' indices in the whole layer (row_ids): the same mask as one
    # call, with the selection's temporaries (~130 bytes per entry) bounded by a block instead of the layer
    step = max(1, _INIT_BLOCK // max(1, cols))
    if step >= rows:
        return row_top_k(torch.zeros(shape, device=device), fan_in, ties)
    out = torch.empty(shape, dtype=torch.bool, device=device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        ids = torch.arange(r0, r1, device=device)
        out[r0:r1] = row_top_k(torch.zeros(r1 - r0, cols, device=device), fan_in, ties, row_ids=ids)
    return out


def nm_mask(weight: torch.Tensor, n: int, m: int, ties: Ties) -> torch.Tensor:
    """N:M by magnitude: in every group of m consecutive inputs of a row keep the n largest |W|."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"N:M needs in_features divisible by m={m}; got a layer with in_features={cols}")
    groups = weight.abs().reshape(rows * cols // m, m)
    return row_top_k(groups, n, ties.sub("nm")).reshape(rows, cols)


def keep_largest(weight: torch.Tensor, mask: torch.Tensor, n_keep: int, ties: Ties,
                 nnz: Optional[int] = None) -> torch.Tensor:
    """The n_keep largest |W| among the active entries of `mask` (the rest of them dropped); `nnz`:
    count(mask) when known."""
    return top_k(weight.abs(), max(0, n_keep), ties.sub("keep"), eligible=mask, n_eligible=nnz)


def grow_top(mask: torch.Tensor, score: torch.Tensor, k: int, ties: Ties, nnz: Optional[int] = None) -> torch.Tensor:
    """`mask` plus the k highest-scoring entries outside it (a new tensor); `nnz`: count(mask) when known."""
    outside = None if nnz is None else mask.numel() - nnz
    return mask | top_k(score, k, ties.sub("grow"), eligible=~mask, n_eligible=outside)


def set_update(weight: torch.Tensor, mask: torch.Tensor, n_swap: int, ties: Ties) -> torch.Tensor:
    """SET: drop the n_swap smallest |W| among active, grow as many at uniformly random inactive positions
    (a just-dropped position may come back)."""
    nnz = count(mask)
    n_drop = min(n_swap, nnz)
    kept = keep_largest(weight, mask, nnz - n_drop, ties, nnz)
    return grow_top(kept, torch.zeros_like(weight, dtype=torch.float32), n_drop, ties, nnz - n_drop)


def rigl_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int,
                ties: Ties) -> torch.Tensor:
    """RigL: drop the n_swap smallest |W| among active, grow the n_swap largest |dL/dW| among the
    positions inactive after the drop."""
    nnz = count(mask)
    n_drop = min(n_swap, nnz)
    kept = keep_largest(weight, mask, nnz - n_drop, ties, nnz)  # exactly nnz - n_drop entries
    return grow_top(kept, grad.abs(), n_drop, ties, nnz - n_drop)


def gmp_prune(weight: torch.Tensor, mask: torch.Tensor, n_keep: int, ties: Ties) -> torch.Tensor:
    """GMP: keep the n_keep largest |W| among active entries (prune-only)."""
    nnz = count(mask)
    return keep_largest(weight, mask, min(n_keep, nnz), ties, nnz)


def nm_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int, n: int, m: int,
              ties: Ties) -> torch.Tensor:
    """Dynamic N:M: drop the n_swap smallest |W| among active, then refill every group to exactly n
    active with the largest |grad| of its inactive entries."""
    rows, cols = mask.shape
    nnz = count(mask)
    kept = keep_largest(weight, mask, nnz - min(n_swap, nnz), ties, nnz).view(rows * cols // m, m)
    deficit = n - row_counts(kept)
    grow = row_top_k(grad.abs().reshape(kept.shape), deficit, ties.sub("nm-grow"), eligible=~kept)
    return (kept | grow).reshape(rows, cols)


def srigl_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int, budget: int,
                 gamma_sal: float, allow_ablation: bool, ties: Ties,
                 force_ablate: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """SRigL (Lasby et al. 2024): RigL with a constant fan-in k per active row and neuron ablation.

    1. Salient weights: the top n_keep = nnz − n_swap active by |W| and the top n_swap inactive by |grad|.
    2. Rows with fewer than m = max(1, int(γ_sal · k0)) salient weights are ablated (k0 = fan-in before),
       m lowered so at least budget // in_features rows survive; never when allow_ablation is False.
       Rows in `force_ablate` (bool [rows], e.g. dead units) are ablated too, as long as budget // in_features
       rows survive.
    3. k = budget // surviving rows (capped at in_features): ablation hands the freed budget to survivors.
    4. Keep the layer-wide top (k·rows − n_swap) active |W| in surviving rows, trimmed to ≤ k per row;
       refill each row to exactly k with its largest-|grad| inactive entries.
    Returns (new mask, k).
    """
    rows, cols = mask.shape
    mask_rows = row_counts(mask)
    active_rows = mask_rows > 0
    n_rows = int(active_rows.sum())
    nnz = int(mask_rows.sum())
    n_swap = min(n_swap, nnz)
    w_abs, g_abs = weight.abs(), grad.abs()

    # 1-2: saliency and ablation
    counts = salient_w = None
    if allow_ablation and n_rows > 0:
        # the salient weights are step 4's keep when no row is ablated: one selection (and tie scope) for both
        salient_w = top_k(w_abs, nnz - n_swap, ties.sub("keep"), eligible=mask, n_eligible=nnz)
        salient = salient_w | top_k(g_abs, n_swap, ties.sub("salient-g"), eligible=~mask, n_eligible=mask.numel() - nnz)
        counts = row_counts(salient)
    survivors, k = srigl_survivors(active_rows, counts, budget, cols, gamma_sal, force_ablate)
    n_surv = int(survivors.sum())

    # 4: drop (layer-wide magnitude, then trim rows to k), grow per row by gradient
    keep_total = max(0, k * n_surv - n_swap)
    if salient_w is not None and srigl_keep_is_salient(keep_total, nnz, n_swap, survivors, active_rows):
        kept = salient_w
    else:
        kept = top_k(w_abs, keep_total, ties.sub("keep"), eligible=mask & survivors[:, None],
                     n_eligible=int(mask_rows[survivors].sum()))
    kept_rows = row_counts(kept)
    over = kept_rows > k  # rows holding more than k after the layer-wide keep: trim them to k
    if bool(over.any()):
        rows_over = over.nonzero().squeeze(1)
        kept[rows_over] = row_top_k(w_abs[rows_over], k, ties.sub("trim"), eligible=kept[rows_over], row_ids=rows_over)
        kept_rows[rows_over] = k
    deficit = (k - kept_rows) * survivors
    grow = row_top_k(g_abs, deficit, ties.sub("grow"), eligible=~kept)
    return kept | grow, k


def srigl_keep_is_salient(keep_total: int, nnz: int, n_swap: int, survivors: torch.Tensor,
                          active_rows: torch.Tensor) -> bool:
    """Whether SRigL's step-4 keep is the step-1 selection of salient weights by |W| (no row ablated and the
    same count): both then select the same values among the same entries in the same tie scope ("keep"), so
    the whole-layer and the sharded rule reuse it instead of selecting again."""
    return keep_total == nnz - n_swap and torch.equal(survivors, active_rows)


def srigl_survivors(active_rows: torch.Tensor, salient_counts: torch.Tensor | None, budget: int, cols: int,
                    gamma_sal: float, force_ablate: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """SRigL steps 2-3 on row-level counts (shared by the whole-layer and the sharded rule): the rows that
    survive ablation (salient_counts None: no ablation) and the fan-in k they then get."""
    n_rows = int(active_rows.sum())
    survivors = active_rows.clone()
    if salient_counts is not None and n_rows > 0:
        k0 = max(1, budget // n_rows)
        m = max(1, int(gamma_sal * k0))
        min_rows = min(n_rows, max(1, budget // cols))
        while m > 1 and int(((salient_counts >= m) & active_rows).sum()) < min_rows:
            m -= 1
        candidate = active_rows & (salient_counts >= m)
        if int(candidate.sum()) >= min_rows:
            survivors = candidate
    if force_ablate is not None and n_rows > 0:
        candidate = survivors & ~force_ablate
        if int(candidate.sum()) >= min(int(survivors.sum()), max(1, budget // cols)):
            survivors = candidate
    return survivors, min(cols, budget // max(1, int(survivors.sum())))
