"""Bad numbers: a non-finite loss (injected on one rank) or gradient stops the run on every rank together,
with the step, the rank or parameter and the last good checkpoint named, before the weights change; that
checkpoint resumes to the weights of a run that never saw the fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, shared_result
from test_preemption import ENV, recipe, weights

pytestmark = pytest.mark.faults  # `make faults` runs every fault test (docs/faults.md)


def torchrun(path: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/torchrun.sh", "2", path, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**ENV, "PYTHON": sys.executable, "STRATEGY": "ddp", **env})


@pytest.fixture
def ddp_reference(small_corpus):
    """The final weights of an undisturbed 2-rank DDP run of 20 steps (what every faulted run, resumed, must end at),
    run once per pytest run."""
    def make(tmp) -> None:
        ref = torchrun(recipe(tmp, small_corpus, "ref", steps=20))
        assert ref.returncode == 0, ref.stderr[-3000:]

    return weights(shared_result(f"faults: 2-rank DDP reference {small_corpus}", make) / "runs" / "ref")


def resumes_to(reference: dict, path: str, run, *args: str) -> None:
    again = torchrun(path, "--ckpt_path", "last", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    b = weights(run)
    assert all(torch.equal(reference[k], b[k]) for k in reference)


@pytest.mark.dist
def test_nan_loss_on_one_rank_stops_every_rank_and_the_last_checkpoint_resumes(tmp_path, small_corpus, ddp_reference):
    path = recipe(tmp_path, small_corpus, "nan", steps=20)
    run = tmp_path / "runs" / "nan"
    bad = torchrun(path, DSTLM_FAULT="nan:rank=1:point=loss:step=12")
    assert bad.returncode != 0
    ckpts = run / "checkpoints"
    msg = (f"non-finite loss at step 12 (micro-batch 12) on rank(s) [1]; stopped before the weights changed "
           f"(the last good checkpoint is {ckpts / 'step0000010.ckpt'}, which `--ckpt_path last` resumes)")
    assert bad.stderr.count(msg) == 2, bad.stderr[-3000:]  # both ranks, the same one line
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step0000010.ckpt"]
    assert all(torch.isfinite(v).all() for v in weights(run).values() if v.is_floating_point())
    resumes_to(ddp_reference, path, run)


@pytest.mark.dist
def test_mask_divergence_on_one_rank_is_caught_at_the_next_update(tmp_path, small_corpus, ddp_reference):
    """Rank 1's mask drifts after step 7 (one entry flipped): the mask update of step 10 compares the ranks'
    masks before deciding and stops every rank with the layer and the rank named, before the step-10 checkpoint
    is written; the step-5 checkpoint resumes to the undisturbed run's weights."""
    path = recipe(tmp_path, small_corpus, "flip", steps=20)
    run = tmp_path / "runs" / "flip"
    every5 = ("--trainer.ckpt_every_n_steps", "5")  # saving more often changes no weight
    bad = torchrun(path, *every5, DSTLM_FAULT="flip:rank=1:point=mask:step=7")
    assert bad.returncode != 0
    msg = ("dstlm: error: the mask of blocks.0.attn.q_proj.weight differs across data-parallel ranks entering the "
           "mask update of step 10 (rank(s) [1] disagree with rank 0); training stopped")
    assert bad.stderr.count(msg) == 2, bad.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step0000005.ckpt"]
    resumes_to(ddp_reference, path, run, *every5)


def test_non_finite_gradient_names_the_parameter():
    from dstlm.models.gpt import GPTConfig
    from dstlm.training.config import OptimConfig
    from dstlm.training.loop.module import LMModule
    from dstlm.training.resilience.nonfinite import check_gradients, last_good

    module = LMModule(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8), OptimConfig(), 10)
    module.configure_model()
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    module.model.blocks[0].mlp.fc_in.weight.grad[3, 2] = float("inf")
    found = []
    check_gradients(module, found.append)
    assert found == ["non-finite gradient of model.blocks.0.mlp.fc_in.weight at step 0"]
    assert last_good(None).startswith("; stopped before the weights changed, at the first step: the initial weights "
                                      "or the data")
    module.model.blocks[0].mlp.fc_in.weight.grad[3, 2] = 0.0
    check_gradients(module, found.append)  # finite: nothing found
    assert len(found) == 1 and os.environ.get("DSTLM_FAULT") is None


def test_truncated_checkpoint_is_passed_over_and_named(tmp_path, small_corpus):
    """A checkpoint cut short (a copy that ran out of disk): `--ckpt_path last` says which file is unreadable
    and why, resumes from the newest readable one, and ends where an undisturbed run ends; naming the broken file
    explicitly is a one-line error."""
    from test_preemption import fit

    path = recipe(tmp_path, small_corpus, "t", steps=30)
    assert fit(path).returncode == 0
    run = tmp_path / "runs" / "t"
    a = weights(run)
    broken = run / "checkpoints" / "step0000030.ckpt"
    os.truncate(broken, broken.stat().st_size // 2)
    r = fit(path, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step0000030.ckpt is truncated or corrupt" in r.stdout
    assert f"resuming from the newest readable checkpoint instead: {run / 'checkpoints' / 'step0000020.ckpt'}" \
        in r.stdout
    b = weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 21-30 again, to the same weights
    os.truncate(run / "checkpoints" / "step0000020.ckpt", 100)
    r = fit(path, "--ckpt_path", str(run / "checkpoints" / "step0000020.ckpt"))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "step0000020.ckpt is unreadable: step0000020.ckpt is truncated or corrupt" in r.stderr


def test_deepspeed_checkpoint_missing_a_ranks_optimizer_states(tmp_path):
    from dstlm.checkpoint import checkpoint_problem

    tag = tmp_path / "last.ckpt" / "checkpoint"
    tag.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_2_mp_rank_00_optim_states.pt"):
        torch.save({"x": torch.zeros(2)}, tag / name)
    assert checkpoint_problem(tmp_path / "last.ckpt") == "the optimizer states of rank(s) [1] are missing"
    torch.save({"x": torch.zeros(2)}, tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert checkpoint_problem(tmp_path / "last.ckpt") is None
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert checkpoint_problem(tmp_path / "last.ckpt") == "zero_pp_rank_1_mp_rank_00_optim_states.pt is empty"


def _mount_small_filesystem(path, size: int) -> bool:
    """A tmpfs of `size` bytes at `path` (root with CAP_SYS_ADMIN, as on the CI machines); False where not allowed."""
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


# CI runs the real small filesystem (as root; the injected failure where it cannot mount one)
@pytest.mark.parametrize("how", ["filesystem", pytest.param("injected", marks=pytest.mark.slow)])
def test_full_disk_during_save_keeps_the_last_checkpoint(tmp_path, small_corpus, how):
    """The checkpoint folder fills up while step 20 is written (a real small filesystem where this machine lets
    the test mount one, as root on CI; and the same failure injected into the write): one line names the step,
    the cause and the last good checkpoint; what the failed write left is gone; the step-10 checkpoint is intact
    and, once there is room, resumes to the weights of a run that never met a full disk."""
    from test_preemption import fit

    ref = fit(recipe(tmp_path, small_corpus, "ref", steps=20))
    assert ref.returncode == 0, ref.stderr[-3000:]
    size = (tmp_path / "runs" / "ref" / "checkpoints" / "step0000010.ckpt").stat().st_size
    path = recipe(tmp_path, small_corpus, "full", steps=20)
    ckpts = tmp_path / "runs" / "full" / "checkpoints"
    ckpts.mkdir(parents=True)
    mounted = how == "filesystem" and _mount_small_filesystem(ckpts, size + size // 2)  # room for one, not two
    try:
        env = {} if mounted else {"DSTLM_FAULT": "enospc:rank=0:point=save:step=20"}
        bad = subprocess.run([sys.executable, "-m", "dstlm.cli", "fit", "--config", path], cwd=REPO,
                             capture_output=True, text=True, timeout=600, env={**ENV, **env})
        assert bad.returncode == 2, bad.stderr[-3000:]
        line = [x for x in bad.stderr.splitlines() if x.startswith("dstlm: error:")]
        assert line == [f"dstlm: error: saving the checkpoint of step 20 to {ckpts / 'step0000020.ckpt.tmp'} failed "
                        f"(No space left on device); nothing was replaced: the last good checkpoint is "
                        f"{ckpts / 'step0000010.ckpt'}, which `--ckpt_path last` resumes; free space under {ckpts} "
                        f"(or lower trainer.keep_last_k) and resume"], bad.stderr[-3000:]
        assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == \
            ["last.ckpt", "save_seconds.txt", "step0000010.ckpt"]
        if mounted:  # room again
            subprocess.run(["mount", "-o", "remount,size=256m", str(ckpts)], check=True)
        again = subprocess.run([sys.executable, "-m", "dstlm.cli", "fit", "--config", path, "--ckpt_path", "last"],
                               cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
        assert again.returncode == 0, again.stderr[-3000:]
        a, b = weights(tmp_path / "runs" / "ref"), weights(tmp_path / "runs" / "full")
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ckpts)], capture_output=True)


@pytest.mark.dist
@pytest.mark.slow
def test_mask_divergence_is_caught_under_zero2(tmp_path, small_corpus):
    """The same drift under DeepSpeed ZeRO-2, whose masks are decided on shards and joined: the comparison
    entering the update catches it there too (the sharded decision alone would join the shards into agreeing
    masks and hide it)."""
    path = recipe(tmp_path, small_corpus, "flipz", steps=20)
    bad = torchrun(path, "--trainer.ckpt_every_n_steps", "5", STRATEGY="deepspeed_stage_2",
                   DSTLM_FAULT="flip:rank=1:point=mask:step=7")
    assert bad.returncode != 0
    msg = ("dstlm: error: the mask of blocks.0.attn.q_proj.weight differs across data-parallel ranks entering the "
           "mask update of step 10 (rank(s) [1] disagree with rank 0); training stopped")
    assert bad.stderr.count(msg) == 2, bad.stderr[-3000:]


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hook_points_run_what_plug_ins_register(tmp_path, monkeypatch):
    """The fault tests fill hook points that production code exposes: handlers run in order and may replace
    the value; a plug-in named in DSTLM_PLUGINS is imported once, when a point is first reached; a misnamed point
    or plug-in is refused in one line; and dstlm's own code holds no fault injection of its own."""
    from dstlm.training.resilience import hooks

    with pytest.raises(ValueError, match="no point 'lose'; the points are loss, checkpoint_written, masks_updated"):
        hooks.register("lose", print)
    seen = []
    undo = [hooks.register("loss", lambda value, **ctx: value + 1),
            hooks.register("loss", lambda value, step, **ctx: seen.append((value, step)))]
    (tmp_path / "drill.py").write_text(
        "from dstlm.training.resilience import hooks\nCALLS = []\n"
        "UNDO = hooks.register('masks_updated', lambda value, **ctx: CALLS.append(ctx))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(hooks.ENV, "drill")
    try:
        assert hooks.fire("loss", 1.0, rank=0, step=3, model=None) == 2.0 and seen == [(2.0, 3)]
        hooks.fire("masks_updated", engine=None, rank=1, step=5)
        hooks.fire("masks_updated", engine=None, rank=1, step=6)
        import drill
        assert [c["step"] for c in drill.CALLS] == [5, 6]  # imported once, registered once
        monkeypatch.setenv(hooks.ENV, "drill, no_such_plugin")
        with pytest.raises(RuntimeError, match="DSTLM_PLUGINS names 'no_such_plugin', which cannot be imported"):
            hooks.fire("loss", 1.0, rank=0, step=0, model=None)
    finally:
        monkeypatch.delenv(hooks.ENV)
        for u in undo:
            u()
        if "drill" in sys.modules:
            sys.modules.pop("drill").UNDO()
        hooks._imported.discard("drill")
    assert hooks.fire("loss", 1.0, rank=0, step=3, model=None) == 1.0
    assert not [p for p in (REPO / "dstlm").rglob("*.py") if "DSTLM_FAULT" in p.read_text()]


def test_every_torch_load_in_dstlm_is_weights_only():
    """An audit of the source: each torch.load call restricts unpickling to tensors and plain data."""
    import re

    calls = []
    for path in sorted((REPO / "dstlm").rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            if text[:m.start()].rsplit("\n", 1)[-1].lstrip().startswith("#"):
                continue
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((path.name, text[m.start():i]))
    assert calls and all("weights_only=True" in call for _, call in calls), calls


def test_a_checkpoint_that_would_run_code_is_refused_unopened(tmp_path, small_corpus):
    """A .ckpt that needs a global beyond torch's weights-only set (here os.system) is named as unreadable by
    `--ckpt_path`, `dstlm eval` and the checkpoint reader, and nothing in it runs."""
    from conftest import error_line, run_cli

    from dstlm.checkpoint import checkpoint_problem, read_checkpoint

    marker = tmp_path / "ran"
    bad = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(marker)}, bad)
    problem = checkpoint_problem(bad)
    assert problem.startswith("hostile.ckpt needs posix.system to unpickle, which dstlm does not load"), problem
    with pytest.raises(ValueError, match="needs posix.system"):
        read_checkpoint(bad)
    code, stderr = run_cli(["eval", "--checkpoint", str(bad), "--tasks", "hellaswag"])
    assert code == 2 and "needs posix.system to unpickle" in error_line(stderr)
    code, stderr = run_cli(["fit", "--config", recipe(tmp_path, small_corpus, "h", steps=2), "--ckpt_path", str(bad)])
    assert code == 2 and "hostile.ckpt is unreadable: hostile.ckpt needs posix.system" in error_line(stderr)
    assert not marker.exists()


def _skip_recipe(tmp_path, small_corpus, name: str, max_skipped: int) -> str:
    cfg = yaml.safe_load(open(recipe(tmp_path, small_corpus, name, steps=17)))
    cfg["sparsity"]["t_end"] = 1.0  # mask updates at 5, 10 and 15
    cfg["trainer"].update(ckpt_every_n_steps=1, keep_last_k=30, on_nonfinite="skip", max_skipped_steps=max_skipped)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_skip_policy_drops_the_step_and_keeps_weights_optimizer_and_masks(tmp_path, small_corpus, monkeypatch):
    """trainer.on_nonfinite=skip: the steps with index 12 and 14 meet a NaN loss and are dropped; the checkpoint
    after step 12 equals the one before it in weights, masks and AdamW state (moments and step counts), the
    mask update due after step 14 (t=15) does not happen, and the run ends with 15 optimizer updates."""
    from conftest import run_cli

    monkeypatch.setenv("DSTLM_FAULT", "nan:rank=0:point=loss:step=12,14")
    code, stderr = run_cli(["fit", "--config", _skip_recipe(tmp_path, small_corpus, "skip", 2)])
    assert code == 0, stderr[-3000:]
    ckpts = tmp_path / "runs" / "skip" / "checkpoints"

    def load(step):
        return torch.load(ckpts / f"step{step:07d}.ckpt", weights_only=True)

    before, after, next_ = load(12), load(13), load(14)
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert not all(torch.equal(after["state_dict"][k], next_["state_dict"][k]) for k in after["state_dict"])
    sa, sb = before["optimizer_states"][0]["state"], after["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    last = load(17)
    assert {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()} == {15.0}
    assert last["callbacks"]["NonFiniteGuard"] == {"skipped": [12, 14]}
    summary = json.loads((tmp_path / "runs" / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] == [12, 14] and summary["mask_updates"] == 2 and summary["steps"] == 17


def test_skip_policy_is_bounded_across_a_resume(tmp_path, small_corpus, monkeypatch):
    """With max_skipped_steps=2 the third non-finite step stops the run, naming the skipped ones; a run resumed
    after the first skip counts it (the count is checkpointed) and stops at the same step."""
    from conftest import error_line, run_cli

    monkeypatch.setenv("DSTLM_FAULT", "nan:rank=0:point=loss:step=12,14,16")
    path = _skip_recipe(tmp_path, small_corpus, "bound", 2)
    code, stderr = run_cli(["fit", "--config", path])
    ckpts = tmp_path / "runs" / "bound" / "checkpoints"
    expected = (f"dstlm: error: non-finite loss at step 16 (micro-batch 16) on rank(s) [0]; trainer.max_skipped_steps=2"
                f" steps were skipped already ([12, 14]); stopped before the weights changed (the last good checkpoint "
                f"is {ckpts / 'step0000016.ckpt'}")
    assert code == 2 and error_line(stderr).startswith(expected), stderr[-3000:]
    code, stderr = run_cli(["fit", "--config", path, "--ckpt_path", str(ckpts / "step0000013.ckpt")])
    assert code == 2 and error_line(stderr).startswith(expected), stderr[-3000:]


@pytest.mark.dist
def test_skip_policy_under_ddp(tmp_path, small_corpus):
    """A NaN loss on rank 1 only: both ranks drop the step together and train on."""
    path = _skip_recipe(tmp_path, small_corpus, "ddpskip", 1)
    r = torchrun(path, DSTLM_FAULT="nan:rank=1:point=loss:step=12")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "ddpskip" / "summary.json").read_text())
    assert summary["skipped_steps"] == [12] and summary["steps"] == 17
    assert "dstlm: non-finite loss at step 12 (micro-batch 12) on rank(s) [1]; skipping this step" in r.stdout


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", pytest.param("deepspeed_stage_3", marks=pytest.mark.slow)])
def test_non_finite_gradient_under_deepspeed_stops_every_rank(tmp_path, small_corpus, strategy):
    """Under ZeRO the gradients live in DeepSpeed's buffers: a NaN gradient on one rank (finite loss) makes ZeRO's
    global gradient norm non-finite and DeepSpeed drops the step itself; dstlm notices the dropped step and stops
    every rank before the DST update and the checkpoint of that step, naming the last good checkpoint."""
    path = recipe(tmp_path, small_corpus, "dsnan", steps=20)
    run = tmp_path / "runs" / "dsnan"
    bad = torchrun(path, STRATEGY=strategy, DSTLM_FAULT="nan:rank=1:point=grad:step=12")
    assert bad.returncode != 0
    msg = (f"dstlm: error: non-finite gradient at step 12 (DeepSpeed found the gradient norm non-finite and dropped "
           f"the step); stopped before the weights changed (the last good checkpoint is "
           f"{run / 'checkpoints' / 'step0000010.ckpt'}, which `--ckpt_path last` resumes); lower optim.lr, raise "
           f"optim.warmup_steps or set trainer.gradient_clip_val, then resume\n")
    # on failure show every rank's dstlm and error lines (a CI run once saw this message from one rank only)
    said = "\n".join(x for x in bad.stderr.splitlines() if "dstlm" in x or "Error" in x or "exitcode" in x)
    assert bad.stderr.count(msg) == 2, said[-6000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step0000010.ckpt"]


def test_non_finite_gradient_from_a_finite_loss_stops_the_run(tmp_path, small_corpus):
    from test_preemption import fit

    path = recipe(tmp_path, small_corpus, "gradnan", steps=20)
    bad = subprocess.run([sys.executable, "-m", "dstlm.cli", "fit", "--config", path], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**ENV, "DSTLM_FAULT": "nan:rank=0:point=grad:step=12"})
    ckpts = tmp_path / "runs" / "gradnan" / "checkpoints"
    assert bad.returncode == 2
    assert (f"dstlm: error: non-finite gradient of model.wte.weight at step 12; stopped before the weights changed "
            f"(the last good checkpoint is {ckpts / 'step0000010.ckpt'}") in bad.stderr
    assert fit(path, "--ckpt_path", "last").returncode == 0  # resumes (the fault is not set again)
