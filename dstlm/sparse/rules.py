"""Mask rules, each written once: pure functions of (weight, mask, score, counts, tie-breaks) -> new mask.

A rule receives this process's entries of one [R, C] matrix (the whole matrix, or a rank's fragment of it) and
the `Selector` that knows where the rest are (dstlm/sparse/selectors.py). It combines tensors entry by entry
and leaves every choice that spans entries to the selector: an exact top-k in one total order (|value| desc,
ties by a seeded hash of the entry's flat index in the matrix, `Ties`), so every rank, device and shard that
sees the same values takes the same decision. Each selection inside a rule draws its ties from its own
sub-scope. Rules only choose masks; zeroing weights and optimizer state is the engine's job.

The first masks that depend on the shape alone (`random_mask`, `constant_fan_in_mask`) are decided whole:
every rank draws the same one and keeps its part.
"""

from __future__ import annotations

from typing import Optional

import torch

from dstlm.sparse.selection import Ties
from dstlm.sparse.selectors import Selector, whole


def random_mask(shape: tuple[int, ...], n_active: int, ties: Ties, device=None) -> torch.Tensor:
    """Exactly n_active True entries at positions chosen by the hash alone (uniformly random to a user)."""
    flat = (shape[0], int(torch.Size(shape[1:]).numel())) if len(shape) > 1 else (1, shape[0])
    return whole(flat, device).top(None, n_active, ties.sub("random")).reshape(shape)


def constant_fan_in_mask(shape: tuple[int, int], fan_in: int, ties: Ties, device=None) -> torch.Tensor:
    """Every row gets exactly `fan_in` random active inputs (SRigL init), each row its own (the hash runs over
    the flat index, so rows do not share one column order: a shared order would give every row the same
    inputs and leave the other columns, i.e. the hidden units they read, with no weight at all)."""
    return whole(shape, device).row_top(None, fan_in, ties.sub("fan-in"))


def nm_mask(s: Selector, weight: torch.Tensor, n: int, m: int, ties: Ties) -> torch.Tensor:
    """N:M by magnitude: in every group of m consecutive inputs of a row keep the n largest |W|."""
    return s.grouped(m).row_top(weight, n, ties.sub("nm"))


def keep_largest(s: Selector, weight: torch.Tensor, mask: torch.Tensor, n_keep: int, ties: Ties,
                 nnz: Optional[int] = None) -> torch.Tensor:
    """The n_keep largest |W| among the active entries of `mask` (the rest of them dropped); `nnz`:
    s.count(mask) when known."""
    return s.top(weight, max(0, n_keep), ties.sub("keep"), inside=mask, total=nnz)


def drop_and_grow(s: Selector, weight: torch.Tensor, mask: torch.Tensor, score: Optional[torch.Tensor],
                  n_swap: int, ties: Ties) -> torch.Tensor:
    """RigL (`score` = |dL/dW|) and SET (`score` None: uniformly random growth): drop the n_swap smallest |W|
    among active, grow as many of the highest scores among the entries inactive after the drop (a
    just-dropped position may come back). The growth is written into the kept entries' buffer."""
    nnz = s.count(mask)
    n_keep = nnz - min(n_swap, nnz)
    kept = keep_largest(s, weight, mask, n_keep, ties, nnz)
    return s.top(score, nnz - n_keep, ties.sub("grow"), outside=kept, total=s.numel - n_keep, into=kept)


def gmp_prune(s: Selector, weight: torch.Tensor, mask: torch.Tensor, n_keep: int, ties: Ties) -> torch.Tensor:
    """GMP: keep the n_keep largest |W| among active entries (prune-only)."""
    nnz = s.count(mask)
    return keep_largest(s, weight, mask, min(n_keep, nnz), ties, nnz)


def nm_update(s: Selector, weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int, n: int,
              m: int, ties: Ties) -> torch.Tensor:
    """Dynamic N:M: drop the n_swap smallest |W| among active, then refill every group to exactly n
    active with the largest |grad| of its inactive entries."""
    nnz = s.count(mask)
    kept = keep_largest(s, weight, mask, nnz - min(n_swap, nnz), ties, nnz)
    groups = s.grouped(m)
    deficit = n - groups.row_counts(inside=kept)
    return groups.row_top(grad, deficit, ties.sub("nm-grow"), outside=kept, into=kept)


def reclaim(s: Selector, new: torch.Tensor, score: Optional[torch.Tensor], dead_rows: torch.Tensor, k: int,
            ties: Ties) -> torch.Tensor:
    """`new` plus the k entries outside it with the highest |score| (equal when None), entries of `dead_rows`
    (bool [R]) only after every other: where the weights dropped from dead units go."""
    return s.top(score, k, ties.sub("grow"), outside=new, last_rows=dead_rows, into=new)


def srigl_update(s: Selector, weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int,
                 budget: int, gamma_sal: float, allow_ablation: bool, ties: Ties,
                 force_ablate: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """SRigL (Lasby et al. 2024): RigL with a constant fan-in k per active row and neuron ablation.

    1. Salient weights: the top n_keep = nnz − n_swap active by |W| and the top n_swap inactive by |grad|.
    2. Rows with fewer than m = max(1, int(γ_sal · k0)) salient weights are ablated (k0 = fan-in before),
       m lowered so at least budget // in_features rows survive; never when allow_ablation is False.
       Rows in `force_ablate` (bool [rows], e.g. dead units) are ablated too, as long as budget // in_features
       rows survive.
    3. k = budget // surviving rows (capped at in_features): ablation hands the freed budget to survivors.
    4. Keep the layer-wide top (k·rows − n_swap) active |W| in surviving rows, trimmed to ≤ k per row;
       refill each row to exactly k with its largest-|grad| inactive entries.
    Returns (new mask, k). The kept and grown entries go into one new buffer.
    """
    row_nnz = s.row_counts(inside=mask)
    active_rows = row_nnz > 0
    nnz = int(row_nnz.sum())
    n_swap = min(n_swap, nnz)
    kept = counts = None
    if allow_ablation and bool(active_rows.any()):
        # the salient weights are step 4's keep when no row is ablated: one selection (and tie scope) for both
        kept = s.top(weight, nnz - n_swap, ties.sub("keep"), inside=mask, total=nnz)
        salient_g = s.top_row_counts(grad, n_swap, ties.sub("salient-g"), outside=mask, total=s.numel - nnz)
        counts = s.row_counts(inside=kept) + salient_g  # disjoint: inside and outside the mask
    survivors, k = srigl_survivors(active_rows, counts, budget, s.shape[1], gamma_sal, force_ablate)
    keep_total = max(0, k * int(survivors.sum()) - n_swap)
    if counts is None or keep_total != nnz - n_swap or not torch.equal(survivors, active_rows):
        kept = s.top(weight, keep_total, ties.sub("keep"), inside=mask, rows=survivors,
                     total=int(row_nnz[survivors].sum()))
    kept_rows = s.row_counts(inside=kept)
    over = kept_rows > k  # rows holding more than k after the layer-wide keep: trim them to k
    if bool(over.any()):  # alike on every rank (counts over all of them): the trim runs on all or none
        s.row_top(weight, torch.where(over, k, 0), ties.sub("trim"), inside=kept, rows=over, into=kept, assign=True)
        kept_rows = torch.where(over, k, kept_rows)
    deficit = (k - kept_rows) * survivors
    return s.row_top(grad, deficit, ties.sub("grow"), outside=kept, into=kept), k


def srigl_survivors(active_rows: torch.Tensor, salient_counts: Optional[torch.Tensor], budget: int, cols: int,
                    gamma_sal: float, force_ablate: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """SRigL steps 2-3 on row-level counts: the rows that survive ablation (salient_counts None: no ablation)
    and the fan-in k they then get."""
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
        candidate = survivors & ~force_ablate.to(survivors.device)
        if int(candidate.sum()) >= min(int(survivors.sum()), max(1, budget // cols)):
            survivors = candidate
    return survivors, min(cols, budget // max(1, int(survivors.sum())))
