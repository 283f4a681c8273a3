"""Masks partitioned like the weights (sparsity.partition_masks, ZeRO-3): each rank holds the mask of its own
fragment of every sparse parameter and nothing else of it.

A fragment is a contiguous run [start, start + length) of the parameter's flat (storage) index, the same run
the rank's ZeRO-3 partition of the weight covers (`backend.fragment`). Per parameter a rank keeps the bool mask
of its run and the bit-packed ever-active record of it (ITOP): (1 + 1/8) bytes per sparse weight / world,
instead of the whole mask on every rank.

What needs more than a fragment is answered from counts: per matrix, the active entries of each row (fan-in)
and of each column (fan-out), summed over the ranks by one all-reduce (`partial_counts`). They give the
density, budgets, SRigL's fan-in check, ablated rows, the dead-unit census and the spread.

Checkpoints: each rank saves its fragments, bit-packed, with their ranges (`fragment_state`), and the fp32
gradient scores of its fragments when the checkpoint falls inside a score window (the last grad_accumulation
steps before an update); rank 0 writes a marker with the world size (`write_marker`), so a checkpoint missing
any rank's file is known to be incomplete. A resume at any world size reads, from every saved file, the parts
that overlap the runs it now holds (`read_fragments`), and tools that want whole masks (eval, export, report)
join all of them (`whole_masks_from`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from dstlm.sparse.bits import pack_mask, unpack_bits
from dstlm.sparse.radix import blocks

FILE_PATTERN = "dstlm_masks_rank_*.pt"
MARKER = "dstlm_masks.json"


def fragment_file(rank: int) -> str:
    return f"dstlm_masks_rank_{rank:05d}.pt"


@dataclass
class Fragment:
    """One rank's part of one sparse parameter's mask (flat storage order)."""

    start: int
    mask: torch.Tensor
    """bool [length]: the mask at flat positions start .. start + length."""
    ever: torch.Tensor
    """uint8 [ceil(length / 8)]: bit-packed, every entry that was ever active (ITOP)."""
    shape: tuple[int, ...]
    """The whole parameter's (storage) shape."""

    @property
    def length(self) -> int:
        return self.mask.numel()

    @property
    def numel(self) -> int:
        """The whole parameter's number of entries."""
        return math.prod(self.shape)


def partial_counts(rows: int, cols: int, storage_index, fragment_mask: torch.Tensor,
                   first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row, per-column) counts of the active entries of one [rows, cols] matrix that this rank's fragment
    holds: `fragment_mask` covers the matrix's storage positions first .. first + len; `storage_index` maps
    storage positions to [out, in] flat indices (SparseParam.storage_index). Only active entries are indexed, a
    block of the fragment at a time (no index tensor of the whole fragment)."""
    row_n = torch.zeros(rows, dtype=torch.int64, device=fragment_mask.device)
    col_n = torch.zeros(cols, dtype=torch.int64, device=fragment_mask.device)
    for a, b in blocks([(0, fragment_mask.numel())], fragment_mask.device):
        idx = storage_index(fragment_mask[a:b].nonzero().squeeze(1) + (first + a))
        row_n += torch.bincount(idx // cols, minlength=rows)
        col_n += torch.bincount(idx % cols, minlength=cols)
    return row_n, col_n


def fragment_state(fragments: dict[str, Fragment], rank: int, world: int,
                   scores: dict[str, torch.Tensor] | None = None) -> dict:
    """What one rank saves: every fragment bit-packed, with its range and its parameter's shape, and the fp32
    gradient score of the fragment (`scores`, per parameter key) when a score window is open."""
    params = {}
    for key, f in fragments.items():
        params[key] = {"start": f.start, "length": f.length, "numel": f.numel, "shape": list(f.shape),
                       "mask": pack_mask(f.mask).cpu(), "ever": f.ever.cpu()}
        if scores and key in scores:
            params[key]["score"] = scores[key].detach().float().cpu()
    return {"format": 1, "rank": rank, "world": world, "params": params}


def saved_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob(FILE_PATTERN))


def write_marker(folder: str | Path, world: int) -> None:
    """Rank 0's note of how many fragment files the checkpoint in `folder` holds (one per rank)."""
    (Path(folder) / MARKER).write_text(json.dumps({"format": 1, "world": world}))


def expected_files(folder: str | Path) -> int | None:
    """The number of fragment files rank 0 recorded for this checkpoint folder (None: no marker)."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    return int(json.loads(marker.read_text())["world"])


def _load(path: Path) -> dict:
    from dstlm.safe_load import load_states

    state = load_states(path)
    if state.get("format") != 1:
        raise ValueError(f"{path} is not a dstlm mask fragment file this version reads (format "
                         f"{state.get('format')!r}); resume it with the dstlm version that wrote it")
    return state


def _check_complete(files: list[Path], folder) -> None:
    if not files:
        raise FileNotFoundError(f"{folder} holds no mask fragments ({FILE_PATTERN}): the checkpoint was written "
                                f"with sparsity.partition_masks=false; resume it with the same setting")


def read_fragments(files: Iterable[Path], wanted: dict[str, tuple[int, int]], device=None,
                   scores: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per parameter key, (mask, ever-active, score) of the flat positions start .. start + length that `wanted`
    names, joined from the saved fragments that overlap them (any world size wrote them); each file is read once
    and only the overlapping parts are unpacked. Ever-active comes back bool; the fp32 score only when `scores`
    (a checkpoint inside a score window), else None."""
    files = list(files)
    _check_complete(files, "the checkpoint")
    out = {k: (torch.zeros(n, dtype=torch.bool, device=device), torch.zeros(n, dtype=torch.bool, device=device))
           for k, (_, n) in wanted.items()}
    score = {k: torch.zeros(n, dtype=torch.float32, device=device) for k, (_, n) in wanted.items()} if scores else {}
    scored = dict.fromkeys(wanted, 0)  # entries read with a score (a parameter no gradient reached has none)
    covered = dict.fromkeys(wanted, 0)
    for path in files:
        params = _load(path)["params"]
        for key, run in wanted.items():
            if key not in params:
                raise KeyError(f"{path} holds no mask for {key}: the checkpoint is of another model")
            n, with_score = _copy_overlap(params[key], run, out[key], score.get(key))
            covered[key] += n
            scored[key] += n if with_score else 0
    for key, (_, length) in wanted.items():
        _check_covered(key, length, covered[key], scored[key])
    return {k: (m, e, score[k] if scored[k] else None) for k, (m, e) in out.items()}


def _copy_overlap(saved: dict, run: tuple[int, int], dst: tuple[torch.Tensor, torch.Tensor],
                  score: Optional[torch.Tensor]) -> tuple[int, bool]:
    """Copy the part of one saved fragment that overlaps the wanted run (start, length) into the run's mask and
    ever-active (and score, when asked and saved); (entries copied, whether a score was)."""
    start, length = run
    s0, n0 = saved["start"], saved["length"]
    lo, hi = max(start, s0), min(start + length, s0 + n0)
    if hi <= lo:
        return 0, False
    a, b = (lo - s0) // 8, -(-(hi - s0) // 8)  # the packed bytes that hold lo .. hi
    for t, packed in zip(dst, (saved["mask"], saved["ever"])):
        t[lo - start:hi - start] = unpack_bits(packed[a:b], (b - a) * 8)[lo - s0 - 8 * a:hi - s0 - 8 * a].to(t.device)
    if score is None or "score" not in saved:
        return hi - lo, False
    score[lo - start:hi - start] = saved["score"][lo - s0:hi - s0].to(score.device)
    return hi - lo, True


def _check_covered(key: str, length: int, covered: int, scored: int) -> None:
    if covered != length:
        raise ValueError(f"the saved mask fragments of {key} cover {covered} of the {length} entries this "
                         f"rank needs (a file is missing from the checkpoint)")
    if scored not in (0, length):
        raise ValueError(f"the saved fragments hold gradient scores for {scored} of the {length} entries of "
                         f"{key} this rank needs (files of different checkpoints?)")


def whole_masks_from(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every sparse parameter's whole mask (its storage shape), joined from a checkpoint's fragment files (an
    offline tool's read, like zero_to_fp32 for the weights). Keys are the parameters' names."""
    files = saved_files(folder)
    _check_complete(files, folder)
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        for key, saved in _load(path)["params"].items():
            if key not in out:
                out[key], seen[key] = torch.zeros(saved["numel"], dtype=torch.bool), 0
                shapes[key] = tuple(saved["shape"])
            s0, n0 = saved["start"], saved["length"]
            out[key][s0:s0 + n0] = unpack_bits(saved["mask"], n0)
            seen[key] += n0
    for key, n in seen.items():
        if n != out[key].numel():
            raise ValueError(f"the mask fragments in {folder} cover {n} of the {out[key].numel()} entries of {key} "
                             f"(a rank's file is missing)")
    return {k: v.reshape(shapes[k]) for k, v in out.items()}
