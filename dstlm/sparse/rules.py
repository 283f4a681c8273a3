"""Mask rules: pure functions of (weight, mask, score, counts, generator) -> new mask.

All tensors are one layer's [out, in] view. Ties are broken by a random permutation drawn from the
generator, so every rank that holds the same generator state takes the same decision. Rules only
choose masks; zeroing weights and optimizer state is the engine's job.
"""

from __future__ import annotations

import torch


def _ranked(score: torch.Tensor, gen: torch.Generator, descending: bool) -> torch.Tensor:
    """Indices of a 1-D score sorted by value, ties in random (seeded) order."""
    perm = torch.randperm(score.numel(), generator=gen, device="cpu").to(score.device)
    order = torch.argsort(score[perm], descending=descending, stable=True)
    return perm[order]


def _row_ranks(score: torch.Tensor, gen: torch.Generator, descending: bool) -> torch.Tensor:
    """rank[i, j] = position of entry j in row i sorted by score (0 = first), ties in random order drawn
    independently for every row. (One column permutation shared by all rows, as before, broke every tie the
    same way in every row: constant_fan_in_mask gave all rows the same inputs, leaving the other columns,
    i.e. the hidden units they read, with no weight at all.)"""
    rows, cols = score.shape
    perm = torch.rand(rows, cols, generator=gen, device="cpu").argsort(dim=1).to(score.device)  # [rows, cols]
    order = torch.argsort(torch.gather(score, 1, perm), dim=1, descending=descending, stable=True)
    columns = torch.gather(perm, 1, order)  # column ids of row i in rank order
    ranks = torch.empty_like(columns)
    ranks.scatter_(1, columns, torch.arange(cols, device=score.device).expand(rows, cols).contiguous())
    return ranks


def random_mask(shape: tuple[int, ...], n_active: int, gen: torch.Generator) -> torch.Tensor:
    """Exactly n_active True entries at uniformly random positions."""
    numel = int(torch.Size(shape).numel())
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=gen, device="cpu")[:n_active]] = True
    return mask.view(shape)


def constant_fan_in_mask(shape: tuple[int, int], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    """Every row gets exactly `fan_in` random active inputs (SRigL init)."""
    rows, cols = shape
    ranks = _row_ranks(torch.zeros(rows, cols), gen, descending=True)
    return ranks < fan_in


def nm_mask(weight: torch.Tensor, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """N:M by magnitude: in every group of m consecutive inputs of a row keep the n largest |W|."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"N:M needs in_features divisible by m={m}; got a layer with in_features={cols}")
    groups = weight.abs().reshape(rows * cols // m, m)
    return (_row_ranks(groups, gen, descending=True) < n).reshape(rows, cols)


def _drop_smallest(weight: torch.Tensor, mask: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    flat = mask.flatten().clone()
    active = flat.nonzero().squeeze(1)
    k = min(k, active.numel())
    if k > 0:
        order = _ranked(weight.flatten().abs()[active], gen, descending=False)
        flat[active[order[:k]]] = False
    return flat


def grow_top(flat: torch.Tensor, score: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Activate the k highest-scoring inactive entries of a flat bool mask (in place; ties in seeded random order)."""
    inactive = (~flat).nonzero().squeeze(1)
    k = min(k, inactive.numel())
    if k > 0:
        flat[inactive[_ranked(score.flatten()[inactive], gen, descending=True)[:k]]] = True
    return flat


def set_update(weight: torch.Tensor, mask: torch.Tensor, n_swap: int, gen: torch.Generator) -> torch.Tensor:
    """SET: drop the n_swap smallest |W| among active, grow n_swap uniformly random inactive positions
    (a just-dropped position may come back)."""
    flat = _drop_smallest(weight, mask, n_swap, gen)
    n_drop = int(mask.sum()) - int(flat.sum())
    return grow_top(flat, torch.zeros(flat.numel(), device=flat.device), n_drop, gen).view_as(mask)


def rigl_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int,
                gen: torch.Generator) -> torch.Tensor:
    """RigL: drop the n_swap smallest |W| among active, grow the n_swap largest |dL/dW| among the
    positions inactive after the drop."""
    flat = _drop_smallest(weight, mask, n_swap, gen)
    n_drop = int(mask.sum()) - int(flat.sum())
    return grow_top(flat, grad.abs(), n_drop, gen).view_as(mask)


def gmp_prune(weight: torch.Tensor, mask: torch.Tensor, n_keep: int, gen: torch.Generator) -> torch.Tensor:
    """GMP: keep the n_keep largest |W| among active entries (prune-only)."""
    n_active = int(mask.sum())
    return _drop_smallest(weight, mask, max(0, n_active - n_keep), gen).view_as(mask)


def nm_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int, n: int, m: int,
              gen: torch.Generator) -> torch.Tensor:
    """Dynamic N:M: drop the n_swap smallest |W| among active, then refill every group to exactly n
    active with the largest |grad| of its inactive entries."""
    rows, cols = mask.shape
    flat = _drop_smallest(weight, mask, n_swap, gen).view(rows * cols // m, m)
    deficit = n - flat.sum(dim=1, keepdim=True)  # (groups, 1)
    score = torch.where(flat, torch.full_like(grad, -1.0).view_as(flat), grad.abs().reshape(flat.shape))
    ranks = _row_ranks(score, gen, descending=True)
    grow = (~flat) & (ranks < deficit)  # inactive entries rank first because active ones score -1
    return (flat | grow).reshape(rows, cols)


def srigl_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, n_swap: int, budget: int,
                 gamma_sal: float, allow_ablation: bool, gen: torch.Generator,
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
    active_rows = mask.any(dim=1)
    n_rows = int(active_rows.sum())
    nnz = int(mask.sum())
    k0 = max(1, budget // max(1, n_rows))
    n_swap = min(n_swap, nnz)
    w_abs, g_abs = weight.abs(), grad.abs()

    # 1-2: saliency and ablation
    survivors = active_rows.clone()
    if allow_ablation and n_rows > 0:
        salient = torch.zeros(rows * cols, dtype=torch.bool, device=mask.device)
        flat_mask = mask.flatten()
        active = flat_mask.nonzero().squeeze(1)
        salient[active[_ranked(w_abs.flatten()[active], gen, descending=True)[: nnz - n_swap]]] = True
        inactive = (~flat_mask).nonzero().squeeze(1)
        salient[inactive[_ranked(g_abs.flatten()[inactive], gen, descending=True)[:n_swap]]] = True
        counts = salient.view(rows, cols).sum(dim=1)
        m = max(1, int(gamma_sal * k0))
        min_rows = min(n_rows, max(1, budget // cols))
        while m > 1 and int(((counts >= m) & active_rows).sum()) < min_rows:
            m -= 1
        candidate = active_rows & (counts >= m)
        if int(candidate.sum()) >= min_rows:
            survivors = candidate
    if force_ablate is not None and n_rows > 0:
        candidate = survivors & ~force_ablate
        if int(candidate.sum()) >= min(int(survivors.sum()), max(1, budget // cols)):
            survivors = candidate
    n_surv = int(survivors.sum())
    k = min(cols, budget // max(1, n_surv))

    # 4: drop (layer-wide magnitude, then trim rows to k), grow per row by gradient
    keep_total = max(0, k * n_surv - n_swap)
    live = mask & survivors[:, None]
    flat = torch.zeros(rows * cols, dtype=torch.bool, device=mask.device)
    live_idx = live.flatten().nonzero().squeeze(1)
    flat[live_idx[_ranked(w_abs.flatten()[live_idx], gen, descending=True)[:keep_total]]] = True
    kept = flat.view(rows, cols)
    rank_w = _row_ranks(torch.where(kept, w_abs, torch.full_like(w_abs, -1.0)), gen, descending=True)
    kept = kept & (rank_w < k)
    deficit = (k - kept.sum(dim=1, keepdim=True)) * survivors[:, None]
    rank_g = _row_ranks(torch.where(kept, torch.full_like(g_abs, -1.0), g_abs), gen, descending=True)
    grow = (~kept) & (rank_g < deficit)
    return kept | grow, k
