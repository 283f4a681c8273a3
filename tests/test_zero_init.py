"""trainer.zero_init: a ZeRO-3 model built partitioned (no rank holds it whole) equals the whole build.

Single-process tests check the partitioned build itself (every rank's slices of every parameter, after the
model's init and the sparse engine's first masks, against the whole build); the 2-rank tests run real
DeepSpeed ZeRO-3 training from both builds and compare weights, masks and losses bit for bit.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO, tiny_run
from dstlm.build import build_model, model_transforms
from dstlm.models.presets import load_preset
from dstlm.sparse import SparseEngine, SparsityConfig
from dstlm.training.zero.partitioned_build import PartitionedBuild, partition_range
from dstlm.transforms.ift import SparseIFTConfig
from test_dist import _dst_job as dist_job


def _whole_and_partitioned(cfg, world, ift=None, sparsity=None, seed=5):
    """The whole build (with its engine) and, per rank, the PartitionedBuild of the same model."""
    def make():
        torch.manual_seed(seed)
        model = build_model(cfg, model_transforms(cfg, ift))
        engine = None
        if sparsity is not None:
            sp = sparsity
            for t in model_transforms(cfg, ift):
                sp = t.sparsity_config(model, sp, cfg.block_size)
            engine = SparseEngine(model, sp, seed, 100)
        return model, engine

    whole, whole_engine = make()
    ranks = []
    for rank in range(world):
        build = PartitionedBuild(rank, world)
        with build.building():
            model, engine = make()
        ranks.append((build, model, engine))
    return whole, whole_engine, ranks


@pytest.mark.parametrize("preset,ift,method", [
    ("tiny", None, None), ("tiny", None, "srigl"), ("tiny", None, "rigl"), ("tiny", None, "gmp"),
    ("tiny-moe", None, None), ("tiny-moe", None, "srigl"), ("tiny-moe", None, "set"),
    ("tiny", "wide", "rigl"), ("tiny", "doped", "srigl"), ("tiny-moe", "wide", "srigl")])
def test_partitioned_build_equals_the_whole_build(preset, ift, method):
    """Every rank's slice of every parameter (init, Sparse-IFT re-init, first masks, SRigL's rescale) equals the
    same slice of the whole build; masks (whole on every rank) are identical; nothing is held whole."""
    cfg = load_preset(preset)
    ift_cfg = SparseIFTConfig(family=ift, sparsity=0.5) if ift else None
    extra = dict(sparsity=0.5, n=2, m=4) if method == "nm" else dict(sparsity=0.9)
    sparsity = SparsityConfig(method=method, **extra) if method else None
    whole, whole_engine, ranks = _whole_and_partitioned(cfg, 3, ift_cfg, sparsity)
    reference = dict(whole.named_parameters())
    for rank, (build, model, engine) in enumerate(ranks):
        held = build.parameters(model)
        assert {n for n, _, _ in held} == {n for n, _ in model.named_parameters()}  # every parameter partitioned
        assert all(p.is_meta for _, p, _ in held)
        for name, _, h in held:
            flat = reference[name].detach().reshape(-1)
            assert (h.start, h.length) == partition_range(flat.numel(), rank, 3)[1:]
            assert torch.equal(h.local(), flat[h.start:h.start + h.length]), (rank, name)
            assert not h.values[h.length:].any()  # padding
        if whole_engine is not None:
            for a, b in zip(whole_engine.params, engine.params):
                assert a.name == b.name and torch.equal(a.mask, b.mask) and not b.mask.is_meta
            assert engine.budgets == whole_engine.budgets
        biggest = max(p.numel() * p.element_size() for p in whole.parameters())
        assert build.peak_scratch == biggest  # one parameter whole at a time, never the model


def test_slices_cover_every_entry_once():
    for numel in (1, 7, 64, 1001):
        for world in (1, 2, 3, 4, 8):
            got = [partition_range(numel, r, world) for r in range(world)]
            assert sum(n for _, _, n in got) == numel
            assert all(s == -(-numel // world) for s, _, _ in got)
            covered = torch.zeros(numel, dtype=torch.int64)
            for _, start, n in got:
                covered[start:start + n] += 1
            assert bool((covered == 1).all())


def test_reads_of_a_placeholder_are_refused_by_name():
    build = PartitionedBuild(0, 2)
    with build.building():
        layer = nn.Linear(8, 4)
        with pytest.raises(NotImplementedError, match=r"trainer.zero_init: .*abs.* shape \(4, 8\)"):
            layer.weight.abs()
        with pytest.raises(NotImplementedError, match="trainer.zero_init: .*shape"):
            torch.ones(4, 8) * layer.weight
        with pytest.raises(NotImplementedError, match="writes to a view"):
            with torch.no_grad():
                layer.weight[0].zero_()
        with torch.no_grad():  # whole-parameter writes work on the slice alone
            layer.weight.fill_(2.0)
            layer.weight.mul_(torch.arange(32.0).reshape(4, 8))
    (name, _, held), = [e for e in build.parameters(layer) if e[0] == "weight"]
    assert torch.equal(held.local(), 2.0 * torch.arange(16.0))


@pytest.mark.parametrize("sparsity,match", [
    (dict(method="rigl", sparsity=0.9, mask_init="magnitude"), "mask_init='magnitude' ranks .* by its weights"),
    (dict(method="nm", sparsity=0.5, n=2, m=4), "method='nm' ranks .* by its weights"),
])
def test_masks_from_weights_need_the_whole_weights(sparsity, match):
    """Magnitude masks, and N:M's first mask (the largest |W| of each group), read whole weights: refused."""
    build = PartitionedBuild(0, 2)
    with build.building():
        model = build_model(load_preset("tiny"))
        with pytest.raises(ValueError, match=match + ".*trainer.zero_init"):
            SparseEngine(model, SparsityConfig(**sparsity), 0, 10)


@pytest.mark.parametrize("over,match", [
    (dict(trainer=dict(zero_init=True, strategy="deepspeed_stage_2")), "zero_init=true needs ZeRO-3"),
    (dict(trainer=dict(zero_init=True, strategy="ddp")), "zero_init=true needs ZeRO-3"),
])
def test_zero_init_config_errors(tmp_path, over, match):
    with pytest.raises(ValueError, match=match):
        tiny_run(tmp_path, ["x.txt"], **over)


@pytest.mark.parametrize("sparsity,match", [
    (dict(method="rigl", sparsity=0.9, mask_init="wanda"), "mask_init='wanda' calibrates on the whole model"),
    (dict(method="nm", sparsity=0.5, n=2, m=4), "method='nm' picks its first mask by the whole weights"),
])
def test_zero_init_refuses_whole_weight_masks(tmp_path, sparsity, match):
    cfg = tiny_run(tmp_path, ["x.txt"], trainer=dict(zero_init=True, strategy="deepspeed_stage_3"))
    cfg.sparsity = SparsityConfig(**sparsity)
    with pytest.raises(ValueError, match=match):
        cfg.__post_init__()


def test_zero_init_refuses_a_hub_name(tmp_path):
    from dstlm.hf.source import HFModelConfig

    cfg = tiny_run(tmp_path, ["x.txt"], trainer=dict(zero_init=True, strategy="deepspeed_stage_3"))
    cfg.model = HFModelConfig(hf="someone/some-model")
    with pytest.raises(ValueError, match="'someone/some-model' with trainer.zero_init=true: .* local folder"):
        cfg.__post_init__()


# -- Hugging Face sources: weights read slice by slice, magnitude masks decided on the slices ----------------

@pytest.mark.parametrize("kind,method,shards", [("gpt2", "srigl", False), ("llama", "rigl", True),
                                                ("llama", "gmp", False), ("gpt2", "static", True),
                                                ("gpt2", "rigl", "bare")])
def test_hf_partitioned_build_reads_slices_and_decides_magnitude_masks_on_them(tmp_path, hf_dirs, kind, method,
                                                                                 shards):
    """Each of 3 simulated ranks builds the HF model partitioned: its slices of every parameter equal the
    pretrained weights (Conv1D's transposed storage, fused experts, tied embeddings; one safetensors file or an
    index of shards), and the magnitude masks the 3 ranks decide together on their slices (threads joined by a
    sum all-reduce) equal the whole build's, on every rank. "bare": GPT-2 stored as the hub's original files are,
    without the `transformer.` prefix (the base model's names), which from_pretrained maps back."""
    from types import SimpleNamespace

    from test_selectors import ThreadRanks
    from transformers import AutoModelForCausalLM

    from dstlm.hf.model import load_hf_model
    from dstlm.hf.source import HFModelConfig

    folder = hf_dirs[kind]
    if shards == "bare":  # the same folder with every tensor stored under its base-model name
        from safetensors.torch import load_file, save_file

        folder = tmp_path / "bare"
        shutil.copytree(hf_dirs[kind], folder)
        stored = load_file(str(folder / "model.safetensors"))
        save_file({k.removeprefix("transformer."): v for k, v in stored.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        assert not any(k.startswith("transformer.") for k in load_file(str(folder / "model.safetensors")))
    elif shards:  # the same weights as an index of several safetensors files
        folder = tmp_path / "sharded"
        AutoModelForCausalLM.from_pretrained(str(hf_dirs[kind])).save_pretrained(str(folder), max_shard_size="20KB")
        assert len(list(folder.glob("*.safetensors"))) > 1
    source = HFModelConfig(hf=str(folder))
    cfg = SparsityConfig(method=method, sparsity=0.8)
    whole = load_hf_model(source)
    reference = {n: p.detach().clone() for n, p in whole.named_parameters()}  # before the engine zeroes them
    whole_masks = {sp.name: sp.mask for sp in SparseEngine(whole, cfg, 3, 100).params}
    builds, models = [], []
    for rank in range(3):
        build = PartitionedBuild(rank, 3)
        with build.building():
            models.append(load_hf_model(source, partitioned=build))
        builds.append(build)
        for name, _, held in build.parameters(models[-1]):
            flat = reference[name].reshape(-1)
            assert torch.equal(held.local(), flat[held.start:held.start + held.length]), (rank, name)

    def engine_on(rank, all_reduce):
        part = SimpleNamespace(local_values=builds[rank].local_values, all_reduce=all_reduce)
        return {sp.name: sp.mask for sp in SparseEngine(models[rank], cfg, 3, 100, partitioned=part).params}

    for masks in ThreadRanks(3).run(engine_on):
        assert masks.keys() == whole_masks.keys()
        for name in masks:
            assert torch.equal(masks[name], whole_masks[name]), name


def test_hf_partitioned_build_refuses_weights_stored_under_other_names(hf_dirs):
    """Mixtral's files hold per-expert matrices that transformers fuses while loading (a layout conversion the
    partitioned build does not replay): the first parameter without stored values is named, nothing is guessed."""
    from dstlm.hf.model import load_hf_model
    from dstlm.hf.source import HFModelConfig

    build = PartitionedBuild(0, 2)
    with pytest.raises(ValueError, match=r"holds no weights for model.layers.0.*trainer.zero_init=false"):
        with build.building():
            load_hf_model(HFModelConfig(hf=str(hf_dirs["mixtral"])), partitioned=build)


def _dst_job(files, method, zero_init, extra_env=None):
    """2 ranks, ZeRO-3, batch 2 per rank (tests/test_dist.py's job: a run another test already made is reused)."""
    env = {"DSTLM_STRATEGY": "deepspeed_stage_3", **(extra_env or {})}
    if zero_init:
        env["DSTLM_ZERO_INIT"] = "1"
    return dist_job(method, 2, files, nproc=2, extra_env=env)


def _assert_same_training(whole: list[dict], part: list[dict]) -> None:
    """Per rank: the same losses, first masks, masks after each of the 3 updates and final weights, bit for bit."""
    for a, b in zip(whole, part):
        assert a["losses"] == b["losses"]
        assert len(a["masks"]) == len(b["masks"]) == 3
        for ma, mb in zip([a["start_masks"], *a["masks"]], [b["start_masks"], *b["masks"]]):
            assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
        assert a["weights"].keys() == b["weights"].keys()
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), k


@pytest.mark.dist
@pytest.mark.parametrize("method,extra", [
    ("srigl", {}),
    pytest.param("rigl", {"DSTLM_MOE": "1"}, marks=pytest.mark.slow),
    pytest.param("rigl", {"DSTLM_IFT": "wide"}, marks=pytest.mark.slow),
])
def test_zero3_run_built_partitioned_equals_the_whole_build(tmp_path, small_corpus, method, extra):
    """2 ranks, ZeRO-3, 8 steps with 3 mask updates (sharded decisions checked against the whole-tensor reference):
    the zero_init run's initial masks, masks after every update, losses and final weights equal the whole build's."""
    whole = _dst_job(small_corpus, method, False, extra)
    part = _dst_job(small_corpus, method, True, extra)
    _assert_same_training(whole, part)
    # the FLOP report at fit start reads the engine's counts: no whole mask is left on a partitioned build
    flops = [json.loads((job.dir / "run" / "t" / "flops.json").read_text()) for job in (whole, part)]
    assert flops[0] == flops[1]
    if "DSTLM_IFT" in extra:  # Sparse-IFT widens the layers so the sparse model costs the dense FLOPs
        assert flops[0]["block_projection_ratio"] == pytest.approx(1.0, abs=0.05)
    else:
        assert flops[0]["block_projection_ratio"] < 0.5


def test_first_constant_fan_in_mask_in_blocks_equals_one_call():
    """SRigL's first mask is decided a block of entries at a time (bounded temporaries at start-up); the result
    is the mask of one pass over the whole layer, for blocks that split rows unevenly too."""
    from dstlm.sparse import rules
    from dstlm.sparse.radix import block_size
    from dstlm.sparse.selection import Ties

    for shape, k in [((300, 512), 51), ((512, 300), 30), ((97, 1), 1)]:
        ties = Ties(3, "init", "x")
        with block_size(1 << 40):
            whole = rules.constant_fan_in_mask(shape, k, ties)
        assert bool((whole.sum(dim=1) == k).all())
        for block in (4096, 777, 1):
            with block_size(block):
                assert torch.equal(rules.constant_fan_in_mask(shape, k, ties), whole), (shape, block)


@pytest.mark.dist
@pytest.mark.parametrize("kind,method", [("gpt2", "srigl"), pytest.param("llama", "rigl", marks=pytest.mark.slow)])
def test_zero3_hf_run_built_partitioned_equals_the_whole_build(tmp_path, small_corpus, hf_dirs, kind, method):
    """2 ranks, ZeRO-3, a pretrained Hugging Face model (magnitude first masks, the default for pretrained
    weights): built partitioned (weights read slice by slice, masks decided on the slices) it trains exactly as
    built whole: first masks, masks after every update, losses and final weights."""
    env = {"DSTLM_HF": str(hf_dirs[kind])}
    whole = _dst_job(small_corpus, method, False, env)
    part = _dst_job(small_corpus, method, True, env)
    _assert_same_training(whole, part)


@pytest.mark.parametrize("preset,method", [("tiny", "srigl"), ("tiny", "rigl"), ("tiny-moe", "set")])
def test_partitioned_build_keeps_only_each_ranks_fragment_of_the_first_masks(preset, method):
    """With partitioned masks (ZeRO-3's default) a partitioned build keeps only the rank's fragment of each first
    mask: decided whole one parameter at a time, cut, the whole mask freed. The fragments are the whole build's
    masks cut at ZeRO-3's partitions; counts and the FLOPs read from them equal the whole build's."""
    from dstlm.models.gpt import linear_layer_names
    from dstlm.sparse.flops import count_flops

    cfg = load_preset(preset)
    sparsity = SparsityConfig(method=method, sparsity=0.9, partition_masks=True)
    whole, whole_engine, _ = _whole_and_partitioned(cfg, 0, sparsity=sparsity)
    want_flops = count_flops(whole, linear_layer_names(cfg), 64)
    want_counts = whole_engine.counts()
    world = 3
    for rank in range(world):
        build = PartitionedBuild(rank, world)
        with build.building():
            torch.manual_seed(5)
            model = build_model(cfg, model_transforms(cfg, None))
            engine = SparseEngine(model, sparsity, 5, 100, partitioned=build)
        assert engine.partitioned and not engine.ever_active
        for group, whole_group in zip(engine.groups, whole_engine.groups):
            f = engine.fragments[group[0].name.rsplit(".", 1)[0] if group[0].index is not None else group[0].name]
            flat = whole_group[0].full_mask.reshape(-1)
            assert (f.start, f.length) == partition_range(flat.numel(), rank, world)[1:]
            assert torch.equal(f.mask, flat[f.start:f.start + f.length]), (rank, group[0].name)
            assert f.shape == tuple(whole_group[0].full_mask.shape)
            assert group[0].full_mask.numel() == 0  # no whole mask left on the module, and none saved
            assert f"{group[0].attr}_mask" in group[0].module._non_persistent_buffers_set
        got = engine.counts()
        assert all(torch.equal(got[n].rows, c.rows) and torch.equal(got[n].cols, c.cols)
                   for n, c in want_counts.items())
        assert engine.density() == whole_engine.density()
        flops = count_flops(model, linear_layer_names(cfg), 64, engine.active_entries())
        assert flops.layers == want_flops.layers and flops.density == want_flops.density
        with pytest.raises(ValueError, match="partitioned across ranks.*active_entries"):
            count_flops(model, linear_layer_names(cfg), 64)


@pytest.mark.slow
@pytest.mark.dist
def test_zero3_start_up_under_a_per_rank_memory_cap():
    """GPT-2 124M shape on 4 ZeRO-3 ranks, each rank's build capped at 0.95x the model's fp32 weights: by the OS
    where memory cgroups can be made (the rank is OOM-killed past the cap), else by measurement. The whole build
    cannot start; the partitioned build (trainer.zero_init) starts and trains a step
    (benchmarks/zero_init_memory.py)."""
    import re

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "zero_init_memory.py"), "--preset", "gpt2-124m",
                        "--n-layer", "12", "--worlds", "4", "--budget-fraction", "0.95"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^\| 4 \| whole \| .*\| no", r.stdout, re.M), r.stdout
    assert re.search(r"^\| 4 \| partitioned \| [0-9.]+ \| [-0-9.]+ \| yes \|", r.stdout, re.M), r.stdout
