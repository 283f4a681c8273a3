"""Multi-process runs on CPU (gloo) through launch/torchrun.sh."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, shared_result


def _recipe(tmp_path, files, name, batch_size) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nout_dir: {tmp_path}/runs\nseed: 7\n"
        f"model:\n  vocab_size: 512\n  block_size: 32\n  n_layer: 2\n  n_head: 2\n  n_embd: 32\n"
        f"data:\n  files: {json.dumps(files)}\n  vocab_size: 512\n  block_size: 32\n  batch_size: {batch_size}\n"
        f"  val_batches: 2\noptim:\n  lr: 0.003\n  warmup_steps: 2\n"
        f"trainer:\n  max_steps: 8\n  val_every_n_steps: 4\n  ckpt_every_n_steps: 4\n  progress_bar: false\n"
        f"  accelerator: cpu\n  log_every_n_steps: 1\n")
    return str(path)


def _weights(run_dir):
    from dstlm.checkpoint import read_checkpoint

    ckpt = read_checkpoint(run_dir)  # DeepSpeed: sharded checkpoint directory, consolidated to fp32
    return ckpt["state_dict"], ckpt


_ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}


@pytest.fixture
def single_process_run(small_corpus) -> Path:
    """`dstlm fit` of the test recipe in 1 process with batch 8: what 2 ranks with batch 4 must end at (run once)."""
    def make(tmp: Path) -> None:
        r = subprocess.run([sys.executable, "-m", "dstlm.cli", "fit", "--config",
                            _recipe(tmp, small_corpus, "single", 8)],
                           cwd=REPO, capture_output=True, text=True, timeout=600, env=_ENV)
        assert r.returncode == 0, r.stderr[-4000:]

    return shared_result(f"single-process run {small_corpus}", make) / "runs" / "single"


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_stage_1", marks=pytest.mark.slow),
                                      pytest.param("deepspeed_stage_2", marks=pytest.mark.slow), "deepspeed_stage_3"])
def test_two_ranks_match_single_process(tmp_path, small_corpus, strategy, single_process_run):
    """2 ranks x batch 4 (gloo, via launch/torchrun.sh) ends where 1 process x batch 8 ends: same global
    batches, gradients averaged across ranks (DDP) or reduce-scattered (ZeRO). Not bit-equal (the mean
    is summed in another order), so compare to a tight tolerance."""
    r = subprocess.run(["bash", "launch/torchrun.sh", "2", _recipe(tmp_path, small_corpus, "ddp", 4)], cwd=REPO,
                       capture_output=True, text=True, timeout=600,
                       env={**_ENV, "PYTHON": sys.executable, "STRATEGY": strategy})
    assert r.returncode == 0, r.stderr[-4000:]
    ddp, ddp_ckpt = _weights(tmp_path / "runs" / "ddp")
    single, single_ckpt = _weights(single_process_run)
    assert ddp_ckpt["global_step"] == single_ckpt["global_step"] == 8
    assert ddp_ckpt["LMDataModule"]["global_batch"] == 8 and ddp_ckpt["LMDataModule"]["batches_consumed"] == 8
    assert {k for k in single if not k.endswith("lm_head.weight")} <= set(ddp)
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    s_ddp = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    s_one = json.loads((single_process_run / "summary.json").read_text())
    assert abs(s_ddp["val_loss"] - s_one["val_loss"]) < 1e-4  # val split across ranks, reduced to the same mean


def _torchrun(args, nproc, timeout=600, extra_env=None):
    env = {**_ENV, **(extra_env or {})}
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(cmd + args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


class Dumps(list):
    """The per-rank dumps of a tests/helpers/dst_run.py job, and `dir`: the folder the job wrote (its run and
    checkpoints under dir/run/t). Tests read that folder and never change it (a test that would alters a copy)."""

    def __init__(self, out: Path, nproc: int) -> None:
        super().__init__(torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(nproc))
        self.dir = out


def _dst_job(method, batch, files, nproc, extra_env=None) -> Dumps:
    """Run tests/helpers/dst_run.py on nproc ranks; the per-rank dumps (masks after each update, weights).
    On more than one rank every mask update is also decided whole by the sort-based reference, and the run
    stops if a sharded decision differs (DSTLM_CHECK_REFERENCE).

    A job is deterministic in its arguments and environment, so it runs once per pytest run: a job that
    another test (in any pytest worker) already ran is read back from the folder that run wrote."""
    helper = str(REPO / "tests" / "helpers" / "dst_run.py")
    extra_env = {"DSTLM_CHECK_REFERENCE": "1", **(extra_env or {})}
    key = repr((method, int(batch), list(files), nproc, sorted(extra_env.items())))

    def run(out: Path) -> None:
        r = _torchrun([helper, str(out), method, str(batch), *files], nproc=nproc, extra_env=extra_env)
        assert r.returncode == 0, r.stderr[-4000:]

    return Dumps(shared_result(key, run), nproc)


@pytest.mark.dist
def test_ddp_condensed_training_equals_masked_training(tmp_path, small_corpus):
    """sparsity.condensed under DDP: the condensed layers' masked gradients are all-reduced like any other, so
    both ranks hold the same masks and weights, and they match the masked run's."""
    cond = _dst_job("srigl", 4, small_corpus, nproc=2, extra_env={"DSTLM_CONDENSED": "1"})
    masked = _dst_job("srigl", 4, small_corpus, nproc=2)
    assert len(cond[0]["masks"]) == len(masked[0]["masks"]) == 3
    for a, b, c in zip(cond[0]["masks"], cond[1]["masks"], masked[0]["masks"]):
        for name in a:
            assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name
    for k in cond[0]["weights"]:
        assert torch.equal(cond[0]["weights"][k], cond[1]["weights"][k]), k
        torch.testing.assert_close(cond[0]["weights"][k], masked[0]["weights"][k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.dist
@pytest.mark.parametrize("method", ["rigl", "srigl"])
def test_ddp_masks_identical_across_ranks_and_match_single_process(tmp_path, small_corpus, method):
    rank0, rank1 = _dst_job(method, 4, small_corpus, nproc=2)
    (single,) = _dst_job(method, 8, small_corpus, nproc=1)
    assert len(rank0["masks"]) == len(single["masks"]) == 3  # updates at steps 2, 4, 6
    for a, b in zip(rank0["masks"], rank1["masks"]):
        for name in a:
            assert torch.equal(a[name], b[name]), name  # identical on every rank
    for k in rank0["weights"]:
        assert torch.equal(rank0["weights"][k], rank1["weights"][k]), k
    # 1 process with the same global batch: the gradient mean is summed in another order, so a score that
    # ties to the last bits may rank differently; demand >= 99.9 % agreement of every mask
    for a, b in zip(rank0["masks"], single["masks"]):
        agree = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
        assert agree >= 0.999, agree


@pytest.mark.dist
def test_a_method_of_one_class_runs_on_one_process_ddp_and_zero3_partitioned(small_corpus):
    """A user's method (tests/helpers/custom_method.py: one registered class, no code about where the entries
    live), imported by the rank processes, trains in one process, on 2-rank DDP and on 2-rank ZeRO-3 with
    partitioned masks. On 2 ranks every update is decided on shards and checked against the whole-tensor
    decision from the gathered weights and scores (the run stops at any difference), and both ranks hold the
    same masks; across the three runs the gradients are summed in different orders, so masks agree to the
    same >= 99.9 % as RigL's (test_ddp_masks_identical_across_ranks_and_match_single_process)."""
    env = {"DSTLM_METHOD_MODULE": "helpers.custom_method"}
    ddp = _dst_job("test-saliency", 4, small_corpus, nproc=2, extra_env=env)
    zero3 = _dst_job("test-saliency", 4, small_corpus, nproc=2,
                     extra_env={**env, "DSTLM_STRATEGY": "deepspeed_stage_3"})
    (single,) = _dst_job("test-saliency", 8, small_corpus, nproc=1, extra_env=env)
    assert ddp[0]["sharded"] == zero3[0]["sharded"] == [1.0] * 3 and single["sharded"] == [0.0] * 3
    for a, b, c, d, e in zip(ddp[0]["masks"], ddp[1]["masks"], zero3[0]["masks"], zero3[1]["masks"],
                             single["masks"]):
        for name in a:
            assert torch.equal(a[name], b[name]) and torch.equal(c[name], d[name]), name
            for other in (c, e):
                assert float((a[name] == other[name]).float().mean()) >= 0.999, name
    assert any(not torch.equal(single["masks"][0][n], single["masks"][-1][n]) for n in single["masks"][0])


@pytest.mark.dist
@pytest.mark.parametrize("strategy,nproc,method", [
    ("deepspeed_stage_3", 4, "srigl"), ("deepspeed_stage_2", 2, "nm"),
    pytest.param("deepspeed_stage_2", 4, "rigl", marks=pytest.mark.slow),
    pytest.param("ddp", 4, "set", marks=pytest.mark.slow),
    pytest.param("deepspeed_stage_3", 2, "gmp", marks=pytest.mark.slow),
    pytest.param("deepspeed_stage_3", 4, "nm", marks=pytest.mark.slow),
])
def test_sharded_decisions_equal_the_whole_tensor_reference(tmp_path, small_corpus, strategy, nproc, method):
    """Each rank decides the masks of its own fragment of every weight (ZeRO: its partition; DDP: an even
    split), ranks joined by all-reduced counts; at every update the run also decides whole from gathered
    weights and scores with the sort-based selection and stops on any difference. ZeRO-3's and 4 ranks'
    partitions cut rows and N:M groups anywhere."""
    dumps = _dst_job(method, 2, small_corpus, nproc=nproc, extra_env={"DSTLM_STRATEGY": strategy})
    n = len(dumps[0]["masks"])
    assert n >= 3 and all(d["sharded"] == [1.0] * n for d in dumps)
    for d in dumps[1:]:
        for a, b in zip(dumps[0]["masks"], d["masks"]):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_deepspeed_bad_input_refused(tmp_path):
    from dstlm.training.config import TrainerConfig
    from dstlm.training.zero.strategies import DeepSpeedZeRO

    with pytest.raises(ValueError, match="ZeRO stage=5 must be 0, 1, 2 or 3"):
        DeepSpeedZeRO(stage=5, cpu=True)
    with pytest.raises(ValueError, match="'deepspeed_stage_5': the ZeRO stage must be 0, 1, 2 or 3"):
        TrainerConfig(strategy="deepspeed_stage_5")
    with pytest.raises(ValueError, match="offload_params=true needs ZeRO-3 but trainer.strategy='deepspeed_stage_2'"):
        TrainerConfig(strategy="deepspeed_stage_2", offload_params=True)
    with pytest.raises(ValueError,
                       match="offload_optimizer=true needs ZeRO stage 1, 2 or 3 but trainer.strategy='ddp'"):
        TrainerConfig(strategy="ddp", offload_optimizer=True)
    with pytest.raises(ValueError, match="offload_optimizer=true needs ZeRO stage 1, 2 or 3"):
        TrainerConfig(strategy="deepspeed_stage_0", offload_optimizer=True)
    with pytest.raises(ValueError, match="deepspeed_config='nope.json' does not exist"):
        TrainerConfig(strategy="deepspeed_stage_2", deepspeed_config="nope.json")
    (tmp_path / "ds.json").write_text("{}")
    with pytest.raises(ValueError, match="deepspeed_config is set but trainer.strategy='ddp'"):
        TrainerConfig(strategy="ddp", deepspeed_config=str(tmp_path / "ds.json"))


def _rigl_run(out, files, **trainer):
    from dstlm.sparse import SparsityConfig
    from dstlm.training.assembly.build import build

    from conftest import tiny_run

    cfg = tiny_run(out, files, data=dict(batch_size=4), trainer=dict(max_steps=8, val_every_n_steps=8, **trainer))
    cfg.sparsity = SparsityConfig(method="rigl", sparsity=0.8, delta_t=2, t_end=1.0, drop_fraction=0.3)
    trainer_, module, data = build(cfg, logger=False)
    trainer_.fit(module, datamodule=data)
    assert module.sparse_engine.n_updates == 3  # the callback verified the invariants at each of them
    return trainer_, module


@pytest.mark.parametrize("stage,offload_params", [(2, False), (3, True)])
def test_zero_offload_with_dst_matches_no_offload(tmp_path, small_corpus, stage, offload_params):
    """Optimizer (and ZeRO-3 parameter) offload keeps fp32 masters and AdamW moments in CPU memory; on the
    CPU that moves nothing, so the masks after 3 updates must equal the run without offload."""
    _, ref = _rigl_run(tmp_path / "ref", small_corpus, strategy=f"deepspeed_stage_{stage}")
    trainer, off = _rigl_run(tmp_path / "off", small_corpus, strategy=f"deepspeed_stage_{stage}",
                             offload_optimizer=True, offload_params=offload_params)
    zero = trainer.strategy.config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert ("offload_param" in zero) == offload_params
    a, b = ref.sparse_engine.whole_masks(), off.sparse_engine.whole_masks()  # ZeRO-3: joined partitions
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_raw_deepspeed_json_wins(tmp_path, small_corpus):
    """trainer.deepspeed_config: the JSON's keys are used as given (here ZeRO-1 although the strategy
    name says stage 2), dstlm fills in only what it leaves out (micro batch, clipping)."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5}))
    trainer, module = _rigl_run(tmp_path / "raw", small_corpus, strategy="deepspeed_stage_2",
                                deepspeed_config=str(ds))
    assert trainer.strategy.config["zero_optimization"]["stage"] == 1
    assert trainer.strategy.config["gradient_clipping"] == 0.5
    assert trainer.strategy.config["train_micro_batch_size_per_gpu"] == 4
    assert type(trainer.strategy.model.optimizer).__name__ == "DeepSpeedZeroOptimizer"


def test_zero_buckets_sized_to_the_model_unless_the_json_sets_them(tmp_path, small_corpus):
    """ZeRO-1/2 reallocate their reduction buckets every step: dstlm caps Lightning's 2e8-element default
    at the model's trainable parameter count (0.43x -> 0.90x of plain tokens/s on the CPU); a bucket size
    given in a raw DeepSpeed JSON is kept."""
    trainer, module = _rigl_run(tmp_path / "auto", small_corpus, strategy="deepspeed_stage_2")
    n = sum(p.numel() for p in module.parameters() if p.requires_grad)
    zero = trainer.strategy.config["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == n < 200_000_000
    assert trainer.strategy.model.optimizer.reduce_bucket_size == n  # what the engine actually uses
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345}}))
    trainer, _ = _rigl_run(tmp_path / "raw", small_corpus, strategy="deepspeed_stage_2", deepspeed_config=str(ds))
    zero = trainer.strategy.config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 12345 and zero["allgather_bucket_size"] == n


# One 2-rank ZeRO-3 RigL job (partitioned masks, ZeRO-3's default, and a checkpoint every 4 steps) serves three
# tests: ZeRO-3 against DDP here, partitioned against whole masks and the resume of its step-4 checkpoint on 1 rank
# (test_partitioned_masks.py)
Z3_PARTITIONED_CKPT4 = {"DSTLM_STRATEGY": "deepspeed_stage_3", "DSTLM_PARTITION_MASKS": "1", "DSTLM_CKPT_EVERY": "4"}


@pytest.mark.dist
@pytest.mark.parametrize("stage,method", [
    (2, "srigl"), (3, "rigl"),  # the fast tier: each stage and each rule once (the DDP and ZeRO-3 runs are shared)
    pytest.param(2, "rigl", marks=pytest.mark.slow), pytest.param(3, "srigl", marks=pytest.mark.slow),
    pytest.param(1, "rigl", marks=pytest.mark.slow), pytest.param(1, "srigl", marks=pytest.mark.slow)])
def test_zero_dst_masks_identical_and_equal_to_ddp(tmp_path, small_corpus, method, stage):
    """2 ranks under DeepSpeed ZeRO-1/2/3 on the CPU: after 3 mask updates the masks are identical on both
    ranks and equal to the DDP run with the same seed and data. The callback verifies at every update that
    pruned entries are exactly 0 in the module weights and in the fp32 master, and that AdamW's moments
    are 0 there (training stops otherwise)."""
    env = Z3_PARTITIONED_CKPT4 if stage == 3 else {"DSTLM_STRATEGY": f"deepspeed_stage_{stage}"}
    z0, z1 = _dst_job(method, 4, small_corpus, nproc=2, extra_env=env)
    ddp, _ = _dst_job(method, 4, small_corpus, nproc=2)
    assert len(z0["masks"]) == len(ddp["masks"]) == 3
    for a, b, c in zip(z0["masks"], z1["masks"], ddp["masks"]):
        for name in a:
            assert torch.equal(a[name], b[name]), name
            agree = float((a[name] == c[name]).float().mean())
            assert agree >= 0.999, (name, agree)
    for name, mask in z0["masks"][-1].items():
        w = z0["weights"][name.removesuffix("_mask") if name.endswith("_mask") else name]
        assert (w[~mask] == 0).all(), name


@pytest.mark.parametrize("method,stage", [("rigl", 2), pytest.param("srigl", 2, marks=pytest.mark.slow),
                                          ("rigl", 3), ("srigl", 3)])
def test_zero_dst_resume_after_second_update_is_exact(tmp_path, small_corpus, method, stage):
    """RigL/SRigL under ZeRO-2 and ZeRO-3 (1 process, CPU): stop right after the 2nd mask update, resume from the
    sharded checkpoint: same masks, losses and final weights as the uninterrupted run."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from test_dst_training import sparse_run
    from test_training import BatchRecorder, StopAt
    from dstlm.training.assembly.build import build

    over = dict(trainer=dict(max_steps=10, ckpt_every_n_steps=4, strategy=f"deepspeed_stage_{stage}"))
    full_b = BatchRecorder()
    trainer, ref, data = build(sparse_run(tmp_path / "a", small_corpus, method, **over), [full_b], logger=False)
    trainer.fit(ref, datamodule=data)
    cfg = sparse_run(tmp_path / "b", small_corpus, method, **over)
    first, second = BatchRecorder(), BatchRecorder()
    trainer, mod, data = build(cfg, [first, StopAt(4)], logger=False)  # updates at steps 2 and 4
    trainer.fit(mod, datamodule=data)
    assert mod.sparse_engine.n_updates == 2
    trainer, mod, data = build(cfg, [second], logger=False)
    trainer.fit(mod, datamodule=data, ckpt_path=str(tmp_path / "b" / "t" / "checkpoints" / "last.ckpt"))
    assert mod.sparse_engine.n_updates == ref.sparse_engine.n_updates == 4
    assert first.losses + second.losses == full_b.losses
    a, b = ref.sparse_engine.whole_masks(), mod.sparse_engine.whole_masks()  # ZeRO-3: joined partitions
    for name in a:
        assert torch.equal(a[name], b[name]), name
    wa = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "a" / "t" / "checkpoints" / "last.ckpt"))
    wb = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "b" / "t" / "checkpoints" / "last.ckpt"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.dist
@pytest.mark.slow  # fast tier: test_slurm.py's rank SIGKILLed mid-save (resumes bit-equal from the previous
# checkpoint) and test_preemption.py's dead rank (SIGKILL: the survivor stops at once, naming the last checkpoint)
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_kill_one_rank_then_resume_loses_at_most_one_interval(tmp_path, small_corpus, strategy):
    """2-rank RigL run (DDP or ZeRO), checkpoints every 4 steps; SIGKILL one rank once last.ckpt links the
    step-8 checkpoint; resume from last.ckpt: the final masks and weights equal an uninterrupted run's."""
    import os
    import signal
    import time

    helper = str(REPO / "tests" / "helpers" / "dst_run.py")
    from dstlm.checkpoint import read_checkpoint

    env = {"DSTLM_STEPS": "16", "DSTLM_CKPT_EVERY": "4", "DSTLM_STRATEGY": strategy}
    ref = _torchrun([helper, str(tmp_path / "ref"), "rigl", "4", *small_corpus], nproc=2, extra_env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run_env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_OFFLINE": "1", **env, "DSTLM_STEP_SLEEP": "0.5"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           helper, str(tmp_path / "run"), "rigl", "4", *small_corpus]
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "run" / "run" / "t" / "checkpoints"
    def last_is_step_8_or_later() -> bool:  # last.ckpt links the newest complete checkpoint
        return (ckpts / "last.ckpt").is_symlink() and os.readlink(ckpts / "last.ckpt") >= "step0000008.ckpt"

    deadline = time.time() + 300
    while not last_is_step_8_or_later() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert last_is_step_8_or_later(), "the run never reached its step-8 checkpoint"
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "dst_run.py"], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert pids, "no worker processes found"
    os.kill(pids[-1], signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    last = read_checkpoint(ckpts / "last.ckpt")
    assert 8 <= last["global_step"] < 16  # at most one interval (4 steps) lost
    resumed = _torchrun([helper, str(tmp_path / "run"), "rigl", "4", *small_corpus], nproc=2,
                        extra_env={**env, "DSTLM_RESUME": str(ckpts / "last.ckpt")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "ref" / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "rank0.pt", weights_only=True)
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for k in a["final_masks"]:
        assert torch.equal(a["final_masks"][k], b["final_masks"][k]), k


@pytest.mark.dist
@pytest.mark.parametrize("stage,saved_ranks,resume_ranks,zero_init",
                         [(2, 2, 1, False), pytest.param(3, 2, 1, False, marks=pytest.mark.slow),
                          pytest.param(2, 1, 2, False, marks=pytest.mark.slow),
                          pytest.param(3, 2, 1, True, marks=pytest.mark.slow)])
def test_zero_resume_on_another_world_size(tmp_path, small_corpus, stage, saved_ranks, resume_ranks, zero_init):
    """A ZeRO checkpoint written by N ranks resumes on M ranks (same global batch) through DeepSpeed's
    universal checkpoint: the masks after the restore equal the saved ones exactly, and the run ends with
    the masks and (to float rounding) the weights of the uninterrupted run. zero_init: both runs build the
    model partitioned (trainer.zero_init)."""
    env = {"DSTLM_STRATEGY": f"deepspeed_stage_{stage}", "DSTLM_CKPT_EVERY": "4",
           **({"DSTLM_ZERO_INIT": "1"} if zero_init else {})}
    refs = _dst_job("rigl", 8 // saved_ranks, small_corpus, nproc=saved_ranks, extra_env=env)
    ref, ckpt = refs[0], refs.dir / "run" / "t" / "checkpoints" / "step0000004.ckpt"
    new = _dst_job("rigl", 8 // resume_ranks, small_corpus, nproc=resume_ranks,
                   extra_env={**env, "DSTLM_RESUME": str(ckpt)})
    assert (ckpt.parent / "step0000004.ckpt-universal" / "latest_universal").is_file()
    _assert_resumed_like(ref, new, rtol=1e-4, atol=1e-5)


def _assert_resumed_like(ref: dict, new: list[dict], rtol: float, atol: float) -> None:
    """Each resumed rank restored the masks saved after the 2nd update (step 4) exactly, and ended on the
    uninterrupted run's masks and weights. Another layout sums the gradient mean in another order: a score
    tied to the last bits may rank differently, so >= 99.9 % of all mask entries must agree, and weights are
    compared where the masks agree."""
    for rank in new:
        for name, mask in ref["masks"][1].items():
            assert torch.equal(rank["start_masks"][name], mask), name
        same = {n: rank["final_masks"][n] == m for n, m in ref["final_masks"].items()}
        assert sum(int(v.sum()) for v in same.values()) / sum(v.numel() for v in same.values()) >= 0.999
        for k, w in ref["weights"].items():
            agree = same.get(k, torch.ones_like(w, dtype=torch.bool))
            torch.testing.assert_close(rank["weights"][k].float()[agree], w.float()[agree], rtol=rtol, atol=atol,
                                       msg=k)


def test_cli_on_a_zero3_checkpoint_validate_load_export(tmp_path, small_corpus):
    """`dstlm fit` under ZeRO-3 writes a sharded checkpoint directory; `dstlm validate`, load_checkpoint (what
    `dstlm eval` uses) and `dstlm export` consolidate it to fp32 on the fly and see the trained weights."""
    import sys

    from dstlm.checkpoint import load_checkpoint, read_checkpoint

    recipe = _recipe(tmp_path, small_corpus, "z3", 8)
    over = ["--trainer.strategy", "deepspeed_stage_3", "--trainer.devices", "1", "--sparsity",
            str(REPO / "configs" / "sparsity" / "rigl.yaml"), "--sparsity.delta_t", "2"]

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "dstlm.cli", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    cli("fit", "--config", recipe, *over)
    run = tmp_path / "runs" / "z3"
    assert (run / "checkpoints" / "last.ckpt" / "checkpoint").is_dir()  # sharded, not a file
    summary = json.loads((run / "summary.json").read_text())
    out = cli("validate", "--config", recipe, *over, "--ckpt_path", "last")
    # `dstlm validate` prints 4 decimals: equal up to half of the last printed digit
    assert abs(float(out.split("val/loss")[1].split()[0]) - summary["val_loss"]) <= 5e-5
    ckpt = read_checkpoint(run)
    loaded = load_checkpoint(run)
    assert loaded.step == 8 and loaded.sparsity["method"] == "rigl"
    for name, w in loaded.model.state_dict().items():
        if not name.endswith("_mask"):
            assert torch.equal(w, ckpt["state_dict"]["model." + name]), name
    for name, mask in ((k, v) for k, v in ckpt["state_dict"].items() if k.endswith("_mask")):
        weight = ckpt["state_dict"][name.removesuffix("_mask")]
        assert (weight[~mask] == 0).all() and 0.05 < float(mask.float().mean()) < 0.5, name
    cli("export", "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.dist
def test_in_training_eval_under_zero3_on_two_ranks(tmp_path, small_corpus):
    """lm-eval inside a 2-rank ZeRO-3 run: rank 0 scores a gathered copy of the partitioned model (a
    forward on rank 0 alone would hang); the scores equal `dstlm eval` on the final checkpoint."""
    from dstlm.eval.harness import run_eval, scores

    recipe = tmp_path / "r.yaml"
    recipe.write_text(open(_recipe(tmp_path, small_corpus, "z3eval", 4)).read()
                      + "eval:\n  tasks: [lambada_openai, copa]\n  limit: 4\n  every_n_steps: 4\n  batch_size: 4\n")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "PYTHON": sys.executable, "STRATEGY": "deepspeed_stage_3"}
    r = subprocess.run(["bash", "launch/torchrun.sh", "2", str(recipe)], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "z3eval" / "summary.json").read_text())
    again = scores(run_eval(str(tmp_path / "runs" / "z3eval"), ["lambada_openai", "copa"], limit=4, batch_size=4))
    for task, metrics in again.items():
        for m, v in metrics.items():
            assert abs(summary["eval"][task][m] - v) < 1e-6, (task, m)


@pytest.mark.dist
@pytest.mark.parametrize("family", ["wide", pytest.param("factorized", marks=pytest.mark.slow)])
def test_sparse_ift_model_trains_under_ddp_with_identical_masks(tmp_path, small_corpus, family):
    """A Sparse-IFT model (s = 0.5) trained by RigL on 2 DDP ranks: after 3 mask updates the masks of the
    transformed weights are identical on both ranks and agree with one process on the same global batch."""
    env = {"DSTLM_IFT": family}
    rank0, rank1 = _dst_job("rigl", 4, small_corpus, nproc=2, extra_env=env)
    (single,) = _dst_job("rigl", 8, small_corpus, nproc=1, extra_env=env)
    assert len(rank0["masks"]) == 3 and rank0["masks"][0]
    for a, b in zip(rank0["masks"], rank1["masks"]):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    for a, b in zip(rank0["masks"], single["masks"]):
        agree = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
        assert agree >= 0.999, agree


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_dst_with_gradient_accumulation_matches_plain_accumulation(tmp_path, small_corpus, stage):
    """DeepSpeed owns the accumulation boundary (Lightning calls the pre-step hook after every micro-batch);
    the DST callback acts only at the boundary, so RigL with 2 micro-batches per step under ZeRO gives the
    masks and validation loss of plain torch accumulation."""
    from dstlm.sparse import SparsityConfig
    from dstlm.training.assembly.build import build

    from conftest import tiny_run

    runs = {}
    for strategy in ("auto", f"deepspeed_stage_{stage}"):
        cfg = tiny_run(tmp_path / strategy, small_corpus, data=dict(batch_size=4),
                       trainer=dict(max_steps=7, val_every_n_steps=7, strategy=strategy, accumulate_grad_batches=2))
        cfg.sparsity = SparsityConfig(method="rigl", sparsity=0.8, delta_t=2, t_end=1.0, drop_fraction=0.3)
        trainer, module, data = build(cfg, logger=False)
        trainer.fit(module, datamodule=data)
        assert trainer.global_step == 7 and module.sparse_engine.n_updates == 3
        runs[strategy] = ({k: m.clone() for k, m in module.sparse_engine.whole_masks().items()},
                          float(trainer.callback_metrics["val/loss"]))
    (a, la), (b, lb) = runs.values()
    assert sum(int((a[n] == b[n]).sum()) for n in a) / sum(v.numel() for v in a.values()) >= 0.999
    assert abs(la - lb) < 1e-4


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_stage_2", marks=pytest.mark.slow)])
# fast tier for ZeRO-2: test_expert_parallel_checkpoint_resumes_without_expert_parallelism's MoE ZeRO-2 run, whose
# expert masks are checked identical on both ranks there
def test_moe_expert_masks_identical_across_ranks(tmp_path, small_corpus, strategy):
    """RigL on a MoE GPT (4 experts, top-2) over 2 ranks, DDP and ZeRO-2: after 3 updates every expert's mask
    is identical on both ranks (the callback also verified zero weights/moments off the masks at each update).
    Unlike a dense model, 2 ranks are not the same computation as 1 process with the same global batch:
    expert capacity and the balancing loss are computed over each rank's own tokens."""
    env = {"DSTLM_MOE": "1", "DSTLM_STRATEGY": strategy}
    rank0, rank1 = _dst_job("rigl", 4, small_corpus, nproc=2, extra_env=env)
    assert len(rank0["masks"]) == 3 and "blocks.1.mlp.w_out.3" in rank0["masks"][-1]
    for a, b in zip(rank0["masks"], rank1["masks"]):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    for k in rank0["weights"]:
        assert torch.equal(rank0["weights"][k], rank1["weights"][k]), k


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_stage_2", marks=pytest.mark.slow),
                                      pytest.param("deepspeed_stage_3", marks=pytest.mark.slow)])
def test_expert_parallel_matches_replicated_experts(tmp_path, small_corpus, strategy):
    """Expert parallelism 2 over 2 ranks (each rank computes 2 of the 4 experts for the tokens of both, via
    all-to-all) is the same computation as every rank computing every expert: losses, RigL expert masks
    after 3 updates and final weights agree with the expert_parallel_size=1 run, and both ranks hold
    identical masks and weights (the callback checked zero weights/moments off the masks at each update)."""
    base = {"DSTLM_MOE": "1", "DSTLM_STRATEGY": strategy}
    ep0, ep1 = _dst_job("rigl", 4, small_corpus, nproc=2, extra_env={**base, "DSTLM_EP": "2"})
    rep0, _ = _dst_job("rigl", 4, small_corpus, nproc=2, extra_env=base)
    assert len(ep0["masks"]) == len(rep0["masks"]) == 3 and "blocks.1.mlp.w_in.3" in ep0["masks"][-1]
    for a, b in zip(ep0["masks"], ep1["masks"]):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    for k in ep0["weights"]:
        assert torch.equal(ep0["weights"][k], ep1["weights"][k]), k
    # expert matmuls see other batch shapes (the tokens of both ranks at once), so the last bits may differ
    assert ep0["losses"].keys() == rep0["losses"].keys()
    for step, loss in ep0["losses"].items():
        assert abs(loss - rep0["losses"][step]) < 1e-4, (step, loss, rep0["losses"][step])
    for a, b in zip(ep0["masks"], rep0["masks"]):
        agree = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
        assert agree >= 0.999, agree
    for k in ep0["weights"]:
        torch.testing.assert_close(ep0["weights"][k], rep0["weights"][k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.dist
def test_expert_parallel_cli_run_evaluates_and_exports_on_one_process(tmp_path, small_corpus):
    """`launch/torchrun.sh 2` on a MoE recipe with expert_parallel_size 2 and in-training lm-eval: rank 0
    scores alone (its experts detached from the all-to-all, or it would hang), the scores equal `dstlm eval`
    of the final checkpoint in one process, and the checkpoint loads without expert parallelism."""
    from dstlm.checkpoint import load_checkpoint
    from dstlm.eval.harness import run_eval, scores

    recipe = tmp_path / "r.yaml"
    recipe.write_text(open(_recipe(tmp_path, small_corpus, "ep", 4)).read().replace(
        "  n_embd: 32\n", "  n_embd: 32\n  moe: {num_experts: 4, top_k: 2, every: 1, expert_parallel_size: 2}\n")
        + "eval:\n  tasks: [copa]\n  limit: 4\n  every_n_steps: 4\n  batch_size: 4\n")
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "PYTHON": sys.executable}
    r = subprocess.run(["bash", "launch/torchrun.sh", "2", str(recipe)], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / "runs" / "ep"
    summary = json.loads((run / "summary.json").read_text())
    again = scores(run_eval(str(run), ["copa"], limit=4, batch_size=4))
    for m, v in again["copa"].items():
        assert abs(summary["eval"]["copa"][m] - v) < 1e-6, m
    loaded = load_checkpoint(run)
    assert loaded.config.moe.expert_parallel_size == 2 and loaded.model.blocks[0].mlp.ep is None


@pytest.mark.dist
def test_expert_parallel_checkpoint_resumes_without_expert_parallelism(tmp_path, small_corpus):
    """A ZeRO-2 checkpoint written with expert_parallel_size 2 resumes with expert_parallel_size 1 (same 2
    ranks): who computes which expert is not part of the saved state. The masks after the restore equal the
    saved ones exactly and the run ends with the masks and (to float rounding) the weights of the
    uninterrupted expert-parallel run."""
    env = {"DSTLM_STRATEGY": "deepspeed_stage_2", "DSTLM_CKPT_EVERY": "4", "DSTLM_MOE": "1"}
    refs = _dst_job("rigl", 4, small_corpus, nproc=2, extra_env={**env, "DSTLM_EP": "2"})
    ref, ckpt = refs[0], refs.dir / "run" / "t" / "checkpoints" / "step0000004.ckpt"
    assert len(ref["masks"]) == 3 and "blocks.1.mlp.w_out.3" in ref["masks"][-1]
    for a, b in zip(refs[0]["masks"], refs[1]["masks"]):  # every expert's mask identical on both ranks
        assert all(torch.equal(a[k], b[k]) for k in a)
    new = _dst_job("rigl", 4, small_corpus, nproc=2, extra_env={**env, "DSTLM_RESUME": str(ckpt)})
    _assert_resumed_like(ref, new, rtol=1e-3, atol=1e-4)
