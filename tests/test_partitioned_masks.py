"""Masks partitioned like the weights (sparsity.partition_masks, ZeRO-3): real multi-process runs against the
whole-mask runs, checkpoints of per-rank fragments resumed at the same and at another world size, the tools
that read checkpoints, and the refusals. Every rule at 1-4 ranks (threads) is in tests/test_sharded_engine.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_run
from dstlm.sparse.fragments import Fragment, fragment_file, fragment_state, read_fragments, whole_masks_from
from dstlm.sparse.bits import pack_mask
from dstlm.sparse.distributed import even_fragment
from test_dist import Z3_PARTITIONED_CKPT4, _assert_resumed_like, _dst_job, _torchrun

Z3 = {"DSTLM_STRATEGY": "deepspeed_stage_3", "DSTLM_PARTITION_MASKS": "0"}  # whole masks, the reference
PARTITIONED = {**Z3, "DSTLM_PARTITION_MASKS": "1"}


def _save_as_ranks(folder, masks: dict[str, torch.Tensor], world: int, scores=None) -> None:
    """The fragment files `world` ranks with ZeRO-3's even cuts would write for these whole masks (and scores)."""
    for rank in range(world):
        frags, parts = {}, {}
        for key, m in masks.items():
            start, n = even_fragment(m.numel(), rank, world)
            part = m.reshape(-1)[start:start + n]
            frags[key] = Fragment(start, part.clone(), pack_mask(part), tuple(m.shape))
            if scores is not None and key in scores:
                parts[key] = scores[key].reshape(-1)[start:start + n]
        torch.save(fragment_state(frags, rank, world, parts), folder / fragment_file(rank))


def test_fragment_files_join_at_any_world_size(tmp_path):
    """Saved by 3 ranks (cuts at odd bit offsets), read back by 2 and 5 ranks and whole: the same bits."""
    gen = torch.Generator().manual_seed(0)
    masks = {"a.weight": torch.rand(37, 11, generator=gen) < 0.3, "b.experts": torch.rand(3, 5, 7, generator=gen) < 0.5}
    _save_as_ranks(tmp_path, masks, 3)
    files = sorted(tmp_path.glob("dstlm_masks_rank_*.pt"))
    for world in (2, 5):
        for rank in range(world):
            runs = {k: even_fragment(m.numel(), rank, world) for k, m in masks.items()}
            got = read_fragments(files, runs)
            for key, (start, n) in runs.items():
                want = masks[key].reshape(-1)[start:start + n]
                assert torch.equal(got[key][0], want) and torch.equal(got[key][1], want), (world, rank, key)
    whole = whole_masks_from(tmp_path)
    assert all(torch.equal(whole[k], m) for k, m in masks.items())
    files[1].unlink()
    with pytest.raises(ValueError, match="cover"):
        whole_masks_from(tmp_path)
    for f in files:
        f.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="partition_masks=false"):
        read_fragments([], {"a.weight": (0, 10)})


def test_pending_scores_are_saved_per_rank_and_read_at_any_world_size(tmp_path):
    """A checkpoint inside a score window: each rank saves the fp32 score of its own fragment (nothing joined
    whole); ranks of another world size read the exact values of the runs they hold. A parameter no gradient
    reached has no score (None); files of which only some hold a parameter's score are refused, not read as zeros."""
    gen = torch.Generator().manual_seed(1)
    masks = {"a.weight": torch.rand(37, 11, generator=gen) < 0.3, "b.experts": torch.rand(3, 5, 7, generator=gen) < 0.5}
    scores = {k: torch.rand(m.shape, generator=gen) for k, m in masks.items()}
    _save_as_ranks(tmp_path, masks, 3, scores)
    files = sorted(tmp_path.glob("dstlm_masks_rank_*.pt"))
    for world in (1, 2, 5):
        for rank in range(world):
            runs = {k: even_fragment(m.numel(), rank, world) for k, m in masks.items()}
            got = read_fragments(files, runs, scores=True)
            for key, (start, n) in runs.items():
                assert torch.equal(got[key][2], scores[key].reshape(-1)[start:start + n]), (world, rank, key)
                assert torch.equal(got[key][0], masks[key].reshape(-1)[start:start + n])
    assert read_fragments(files, {"a.weight": (0, 5), "b.experts": (0, 5)})["a.weight"][2] is None
    whole = {"a.weight": (0, 407), "b.experts": (0, 105)}
    # a parameter no gradient reached has no score: read as None, the others exactly
    _save_as_ranks(tmp_path, masks, 3, {"a.weight": scores["a.weight"]})
    got = read_fragments(files, whole, scores=True)
    assert torch.equal(got["a.weight"][2], scores["a.weight"].reshape(-1)) and got["b.experts"][2] is None
    # files of different checkpoints (rank 0's with scores, the others without) are refused, not read as zeros
    _save_as_ranks(tmp_path, masks, 3)
    other = tmp_path / "other"
    other.mkdir()
    _save_as_ranks(other, masks, 3, scores)
    (other / files[0].name).replace(files[0])
    with pytest.raises(ValueError, match="gradient scores for 136 of the 407 entries of a.weight"):
        read_fragments(files, whole, scores=True)


def test_partition_masks_needs_zero3(tmp_path, small_corpus):
    from dstlm.sparse import SparsityConfig

    with pytest.raises(ValueError, match=r"partition_masks=true .* trainer.strategy='ddp'.* deepspeed_stage_3"):
        tiny_run(tmp_path, small_corpus, trainer=dict(strategy="ddp"),
                 sparsity=SparsityConfig(method="rigl", sparsity=0.8, partition_masks=True))


def test_resume_with_another_partition_setting_is_refused():
    import torch.nn as nn

    from dstlm.sparse import SparsityConfig
    from dstlm.sparse.engine import SparseEngine

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    saved = SparseEngine(model, SparsityConfig(method="rigl", sparsity=0.5, include=["*"]), 0, 10).state_dict()
    engine = SparseEngine(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
                          SparsityConfig(method="rigl", sparsity=0.5, include=["*"], partition_masks=True), 0, 10)
    with pytest.raises(ValueError, match="written with sparsity.partition_masks=false, this run has true"):
        engine.load_state_dict(saved)


@pytest.mark.dist
@pytest.mark.parametrize("method,nproc", [
    ("rigl", 2),  # 4 ranks cutting SRigL's rows anywhere, checked against the whole reference: test_dist.py
    pytest.param("srigl", 4, marks=pytest.mark.slow), pytest.param("nm", 2, marks=pytest.mark.slow),
    pytest.param("set", 4, marks=pytest.mark.slow)])
def test_zero3_partitioned_masks_equal_whole_masks(tmp_path, small_corpus, method, nproc):
    """ZeRO-3 on 2 and 4 gloo ranks: with partitioned masks every update is also decided whole from gathered
    weights and scores by the sort-based reference (the run stops on any difference), and the run has the
    whole-mask run's masks after every update, losses and final weights, bit for bit (gradients masked after
    the reduction instead of before it: the same numbers)."""
    _assert_same_runs(tmp_path, method, nproc, small_corpus, {"DSTLM_CKPT_EVERY": "4"})  # [rigl-2]: a shared run


@pytest.mark.slow  # fast tier: test_hf.py checks the same partitioned GPT-2 run against the whole-tensor reference
@pytest.mark.dist
def test_zero3_partitioned_masks_on_a_hugging_face_model(tmp_path, small_corpus, hf_dirs):
    """GPT-2 from a Hugging Face folder stores its projections transposed ([in, out] Conv1D): the fragments cut
    the storage order, and the rules' per-row counts follow the [out, in] view. Same result as whole masks."""
    _assert_same_runs(tmp_path, "srigl", 2, small_corpus, {"DSTLM_HF": str(hf_dirs["gpt2"])})


def _assert_same_runs(tmp_path, method: str, nproc: int, corpus, env: dict) -> None:
    batch = 8 // nproc
    part = _dst_job(method, batch, corpus, nproc=nproc, extra_env={**PARTITIONED, **env})
    whole = _dst_job(method, batch, corpus, nproc=nproc, extra_env={**Z3, **env})
    assert len(part[0]["masks"]) >= 3
    for p, w in zip(part, whole):
        assert p["sharded"] == [1.0] * len(w["masks"]) and p["losses"] == w["losses"]
        for a, b in zip(p["masks"], w["masks"]):
            assert all(torch.equal(a[k], b[k]) for k in b)
        assert {k for k in w["weights"] if not k.endswith("_mask")} == set(p["weights"])  # no mask in the module
        for k in p["weights"]:
            assert torch.equal(p["weights"][k], w["weights"][k]), k
    changed = any(not torch.equal(part[0]["masks"][0][k], part[0]["masks"][-1][k]) for k in part[0]["masks"][0])
    assert changed or method == "nm"


@pytest.mark.dist
@pytest.mark.parametrize("saved_ranks,resume_ranks", [pytest.param(2, 2, marks=pytest.mark.slow), (2, 1),
                                                      pytest.param(1, 2, marks=pytest.mark.slow)])
def test_partitioned_checkpoint_resumes_at_any_world_size(tmp_path, small_corpus, saved_ranks, resume_ranks):
    """Each rank saves its mask fragments beside its optimizer partition; a resume reads the runs it now holds
    from the saved files (universal checkpoint for the weights when the world size changes): the masks after
    the restore equal the saved ones exactly, and the run ends like the uninterrupted one (bit for bit at the
    same world size). The tools that read checkpoints see the joined whole masks."""
    from dstlm.checkpoint import checkpoint_problem, read_checkpoint

    env = {**PARTITIONED, "DSTLM_CKPT_EVERY": "4"}
    assert env == Z3_PARTITIONED_CKPT4  # the 2-rank run is test_dist.py's and the whole-mask comparison's
    ref = _dst_job("rigl", 8 // saved_ranks, small_corpus, nproc=saved_ranks, extra_env=env)
    ckpt = ref.dir / "run" / "t" / "checkpoints" / "step0000004.ckpt"
    assert len(list((ckpt / "checkpoint").glob("dstlm_masks_rank_*.pt"))) == saved_ranks
    new = _dst_job("rigl", 8 // resume_ranks, small_corpus, nproc=resume_ranks,
                   extra_env={**env, "DSTLM_RESUME": str(ckpt)})
    # the other setting is refused in one line before anything is loaded (the masks are elsewhere)
    helper = str(REPO / "tests" / "helpers" / "dst_run.py")
    r = _torchrun([helper, str(tmp_path / "other"), "rigl", str(8 // resume_ranks), *small_corpus],
                  nproc=resume_ranks, extra_env={**env, "DSTLM_PARTITION_MASKS": "0", "DSTLM_RESUME": str(ckpt)})
    assert r.returncode != 0 and "resume it with --sparsity.partition_masks true" in r.stderr, r.stderr[-2000:]
    if saved_ranks == resume_ranks:
        for a, b in zip(ref, new):
            assert all(torch.equal(b["start_masks"][k], m) for k, m in ref[0]["masks"][1].items())
            assert all(torch.equal(a["final_masks"][k], b["final_masks"][k]) for k in a["final_masks"])
            assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    else:
        _assert_resumed_like(ref[0], new, rtol=1e-4, atol=1e-5)
    last = ref.dir / "run" / "t" / "checkpoints" / "last.ckpt"
    state = read_checkpoint(last)["state_dict"]
    for name, mask in ref[0]["final_masks"].items():
        assert torch.equal(state[f"model.{name}_mask"], mask), name
        assert (state[f"model.{name}"][~mask] == 0).all(), name
    last = Path(shutil.copytree(last.resolve(), tmp_path / "broken.ckpt"))  # the reference run is shared: break a copy
    next((last / "checkpoint").glob("dstlm_masks_rank_*.pt")).unlink()
    assert "mask fragments of rank(s) [0]" in (checkpoint_problem(last) or "")  # at any world size (marker file)


@pytest.mark.dist
@pytest.mark.parametrize("resume_ranks", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_checkpoint_inside_a_score_window_keeps_scores_per_rank(tmp_path, small_corpus, resume_ranks):
    """Scores over 2 steps (sparsity.grad_accumulation=2) and a checkpoint at step 3, between the two gradients
    that feed the update at step 4: each rank saves its fragment of the pending score in its fragment file (the
    trainer state holds none), and the resumed run has the uninterrupted run's masks after every later update
    and its final weights, bit for bit at the same world size (at 1 rank: read whole from both files)."""
    from dstlm.checkpoint import checkpoint_problem, read_checkpoint
    from dstlm.safe_load import load_states

    env = {**PARTITIONED, "DSTLM_CKPT_EVERY": "3", "DSTLM_SCORE_STEPS": "2"}
    ref = _dst_job("rigl", 4, small_corpus, nproc=2, extra_env=env)
    ckpt = ref.dir / "run" / "t" / "checkpoints" / "step0000003.ckpt"
    assert checkpoint_problem(ckpt) is None
    files = sorted((ckpt / "checkpoint").glob("dstlm_masks_rank_*.pt"))
    assert len(files) == 2 and all("score" in p for f in files for p in load_states(f)["params"].values())
    dst = next(v for k, v in read_checkpoint(ckpt)["callbacks"].items() if "DSTCallback" in k)
    assert dst["scores_in_fragments"] and not dst["scores"] and dst["score_steps"] == 1
    new = _dst_job("rigl", 8 // resume_ranks, small_corpus, nproc=resume_ranks,
                   extra_env={**env, "DSTLM_RESUME": str(ckpt)})
    assert len(ref[0]["masks"]) == 3  # updates at 2, 4, 6
    # the resumed dump starts counting at the restored n_updates: its first and last snapshots are steps 4 and 6
    pairs = [(ref[0]["masks"][1], new[0]["masks"][0]), (ref[0]["masks"][2], new[0]["masks"][-1]),
             (ref[0]["final_masks"], new[0]["final_masks"])]
    if resume_ranks == 2:
        for a, b in zip(ref, new):
            for before, after in [(a["masks"][1], b["masks"][0]), (a["masks"][2], b["masks"][-1]),
                                  (a["final_masks"], b["final_masks"])]:
                assert all(torch.equal(before[k], after[k]) for k in before)
            assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    else:  # another summation order of the gradient mean: see _assert_resumed_like
        for before, after in pairs:
            agree = sum(int((before[k] == after[k]).sum()) for k in before)
            assert agree >= 0.999 * sum(m.numel() for m in before.values())
