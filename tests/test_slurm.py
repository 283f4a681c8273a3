"""`slurm/` on a real single-node SLURM (munged + slurmctld + slurmd from Debian's packages, started here and
stopped by PID): a job rendered by `dstlm slurm` gets the preemption signal mid-run, requeues itself, resumes
from the checkpoint of the step it stopped at and ends with the weights and masks of an uninterrupted run,
bit for bit; a job that keeps crashing stops after its retry bound with the reason. Needs root; installs the
packages when missing (apt-get)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, shared_result
from helpers.faults import PLUGIN_ENV
from test_preemption import ENV, recipe, weights

sys.path.insert(0, str(REPO / "slurm"))
import local_cluster  # noqa: E402

pytestmark = pytest.mark.dist  # one SLURM at a time (fixed ports): tests/conftest.py keeps this file on one worker


def running_cluster(tmp_path_factory, nodes: int, cpus: int):
    """A real SLURM for a test module (a generator for a fixture): the client environment, then stopped."""
    if os.geteuid() != 0:
        pytest.skip("a real SLURM needs root to start its daemons (and network namespaces)")
    if not local_cluster.installed():
        local_cluster.install()  # CI's .ci/run installs them first; a failure here is a real failure
    root = tmp_path_factory.mktemp(f"slurm{nodes}")
    env = local_cluster.start(root, cpus=cpus, nodes=nodes)
    try:
        yield {**ENV, **env, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin:/usr/sbin"}, root
    finally:
        local_cluster.stop(root)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory, nodes=1, cpus=2)


@pytest.fixture
def uninterrupted(small_corpus):
    """strategy -> the final weights and masks of the test recipe run without interruption on 2 ranks (made once:
    the preempted and the killed jobs must both end there)."""
    def weights_of(strategy: str) -> dict:
        def make(tmp: Path) -> None:
            r = subprocess.run(["bash", "launch/torchrun.sh", "2", recipe(tmp, small_corpus, "ref", strategy=strategy)],
                               cwd=REPO, capture_output=True, text=True, timeout=600,
                               env={**ENV, "PYTHON": sys.executable, "STRATEGY": strategy})
            assert r.returncode == 0, r.stderr[-3000:]

        return weights(shared_result(f"slurm: uninterrupted {strategy} run {small_corpus}", make) / "runs" / "ref")

    return weights_of


def sh(args, env, check=True) -> str:
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    if check:
        assert r.returncode == 0, f"{args}: {r.stderr}"
    return r.stdout


def job_field(job: str, field: str, env) -> str:
    m = re.search(rf"\b{field}=(\S+)", sh(["scontrol", "show", "job", job], env))
    return m.group(1) if m else ""


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def job_report(job: str, env) -> str:
    """`scontrol show job` and the tail of the job's own log: what a failed wait needs to be diagnosed."""
    show = sh(["scontrol", "show", "job", job], env, check=False)
    m = re.search(r"\bStdOut=(\S+)", show)
    log = Path(m.group(1)) if m else None
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else "(no job log)"
    return f"{show}\n--- job log ({log}) ---\n{tail}"


def wait_for(cond, timeout, what, env, job):
    """Poll `cond` until true; fail with the job's state and log after `timeout` s, or as soon as the job has
    ended (for 10 s: a requeue passes through no ended state) without `cond` coming true."""
    deadline, held_since, ended_since = time.time() + timeout, None, None
    while not cond():
        state = job_field(job, "JobState", env)
        ended_since = (ended_since or time.time()) if state in ENDED else None
        if time.time() > deadline or (ended_since and time.time() - ended_since > 10 and not cond()):
            why = f"not after {timeout} s" if time.time() > deadline else f"the job ended ({state})"
            raise AssertionError(f"{what}: {why}; job: {job_report(job, env)}")
        # a requeued job is held ~2 minutes (EligibleTime) by slurmctld: release it sooner, as an admin could,
        # but not before the old attempt's steps are gone (slurmd refuses a job whose credential it just revoked)
        if state == "PENDING" and job_field(job, "Reason", env) == "BeginTime":
            held_since = held_since or time.time()
            if time.time() - held_since > 4 and not steps_of(job, env):
                sh(["scontrol", "update", f"JobId={job}", "StartTime=now"], env, check=False)
        else:
            held_since = None
        time.sleep(0.5)


def steps_of(job: str, env) -> str:
    """The job's steps slurmctld still lists (empty once the previous attempt's steps are gone)."""
    return subprocess.run(["squeue", "--steps", "--jobs", job, "--noheader"], env=env, capture_output=True,
                          text=True).stdout.strip()


def submit(env, path: str, *extra) -> str:
    out = sh([sys.executable, "-m", "dstlm.cli", "slurm", "--config", path, "--tasks-per-node", "2",
              "--time", "0:20:00", "--lead-time", "60", "--collective-timeout", "120", "--submit", *extra], env)
    return re.search(r"submitted job (\d+)", out).group(1)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_stage_2", marks=pytest.mark.slow)])
@pytest.mark.faults
def test_preempted_job_requeues_and_resumes_bit_exactly(tmp_path, small_corpus, cluster, strategy, uninterrupted):
    env, _ = cluster
    path = recipe(tmp_path, small_corpus, "pre", strategy=strategy)
    run = tmp_path / "runs" / "pre"
    job = submit(env, path)
    wait_for(lambda: (run / "checkpoints" / "step0000010.ckpt").exists(), 300, "first checkpoint", env, job)
    sh(["scancel", "--signal=USR2", job], env)  # to every task of the job's steps, as --signal=USR2@LEAD does
    wait_for(lambda: job_field(job, "JobState", env) == "COMPLETED", 600, "job completed", env, job)

    assert job_field(job, "Restarts", env) == "1"
    log = (run / "slurm" / f"dstlm-pre-{job}.out").read_text()
    stopped = json.loads((run / "PREEMPTED").read_text())["step"] if (run / "PREEMPTED").exists() else None
    m = re.search(r"every rank stops after step (\d+)", log)
    assert m and stopped is None, log[-3000:]  # the marker is removed by the next attempt's script
    step = int(m.group(1))
    assert "dstlm-slurm: preempted (time left" in log and "requeueing (restart 1)" in log, log[-3000:]
    # resumed at the very step it stopped at: no work repeated
    assert f"resuming from {run}/checkpoints/last.ckpt -> {run}/checkpoints/step{step:07d}.ckpt" in log
    assert "dstlm-slurm: finished" in log and json.loads((run / "FINISHED").read_text())["steps"] == 40
    a, b = uninterrupted(strategy), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # masks included
    # the same job submitted again finds the run finished and trains nothing
    again = submit(env, path)
    wait_for(lambda: job_field(again, "JobState", env) == "COMPLETED", 600, "job completed", env, again)
    log = (run / "slurm" / f"dstlm-pre-{again}.out").read_text()
    assert job_field(again, "Restarts", env) == "0" and "nothing to do" in log and "resuming" not in log, log[-3000:]
    c = weights(run)
    assert "dstlm-slurm: finished" in log and all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.faults
def test_task_killed_mid_save_resumes_from_the_previous_checkpoint(tmp_path, small_corpus, cluster, uninterrupted):
    """Rank 1 SIGKILLs itself after writing its part of the step-20 checkpoint, before the swap (fault
    injection, once): srun ends the step, the job requeues as a crash, the half-done step-20 checkpoint is set
    aside and named, the run resumes from step 10 (one interval of work repeated) and ends bit-equal to an
    uninterrupted run."""
    env, _ = cluster
    path = recipe(tmp_path, small_corpus, "kill", strategy="ddp")
    run = tmp_path / "runs" / "kill"
    plugin = [a for k, v in PLUGIN_ENV.items() for a in ("--export", f"{k}={v}")]  # the fault plug-in
    job = submit(env, path, "--export", "DSTLM_FAULT=kill:rank=1:point=save:step=20", *plugin)
    wait_for(lambda: job_field(job, "JobState", env) == "COMPLETED", 600, "job completed", env, job)
    log = (run / "slurm" / f"dstlm-kill-{job}.out").read_text()
    assert "rank 1 kills itself at save of step 20" in log and job_field(job, "Restarts", env) == "1"
    assert re.search(r"crashed \(exit code \d+; 1 crash\(es\) in a row\): requeueing", log), log[-3000:]
    assert f"set aside an incomplete checkpoint (a save was interrupted): {run}/checkpoints/step0000020.ckpt" \
           f".incomplete-0" in log
    assert f"-> {run}/checkpoints/step0000010.ckpt" in log and "dstlm-slurm: finished" in log
    # the surviving rank did not hang: the second attempt started well within the collective timeout
    starts = re.findall(r"dstlm-slurm: job \d+ start (\S+)", log)
    fired = (run / "checkpoints" / ".fault-fired-save-1-20").stat().st_mtime
    from datetime import datetime

    assert len(starts) == 2 and datetime.fromisoformat(starts[1]).timestamp() - fired < 120
    a, b = uninterrupted("ddp"), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.faults
def test_crashing_job_stops_after_its_retry_bound(tmp_path, small_corpus, cluster):
    env, _ = cluster
    path = recipe(tmp_path, small_corpus, "crash", strategy="ddp")
    job = submit(env, path, "--max-retries", "1", "--data.files", json.dumps([str(tmp_path / "gone.txt")]))
    wait_for(lambda: job_field(job, "JobState", env) in ("FAILED", "COMPLETED"), 600, "job ended", env, job)
    log = (tmp_path / "runs" / "crash" / "slurm" / f"dstlm-crash-{job}.out").read_text()
    assert job_field(job, "JobState", env) == "FAILED" and job_field(job, "Restarts", env) == "1", log[-3000:]
    # srun's code: the task that failed first, or 143 for a task --kill-on-bad-exit terminated
    assert re.search(r"crashed \(exit code \d+; 1 crash\(es\) in a row\): requeueing", log), log[-3000:]
    assert re.search(r"crashed \(exit code \d+; 2 crash\(es\) in a row\): more than --max-retries 1; not "
                     r"requeueing", log)
    assert "corpus file" in log  # the run's own one-line reason is in the job's log


def test_render_refuses_inconsistent_devices_and_another_recipes_run_dir(tmp_path, small_corpus):
    from dstlm.cli import parse_run
    from dstlm.slurm import render as render_with

    def render(argv):
        return render_with(argv, parse_run)

    path = recipe(tmp_path, small_corpus, "r", strategy="ddp", devices=4)
    with pytest.raises(ValueError, match=r"trainer.devices=4 but the job runs 2 process\(es\) per node"):
        render(["--config", path, "--tasks-per-node", "2"])
    with pytest.raises(ValueError, match="USR1 is also caught by NCCL"):
        render(["--config", path, "--tasks-per-node", "4", "--signal", "USR1"])
    text, out, _, _ = render(["--config", path, "--tasks-per-node", "4", "--nodes", "1", "--time", "1:00:00"])
    assert "#SBATCH --ntasks-per-node=4" in text and "--trainer.devices 4" in text and "%%" not in text
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "save_seconds.txt").write_text("12.00 40.00\n")  # what StepCheckpoint records
    with pytest.warns(UserWarning, match=r"--lead-time=60 s is less than twice the measured checkpoint save of "
                                         r"this run \(40 s"):
        render(["--config", path, "--tasks-per-node", "4", "--lead-time", "60"])
    (run / "config.yaml").write_text("model: {n_layer: 12}\n")
    with pytest.raises(ValueError, match="holds a run of another recipe"):
        render(["--config", path, "--tasks-per-node", "4"])


@pytest.mark.parametrize("requeue_ok", [True, False])
def test_script_fails_the_job_when_slurm_refuses_the_requeue(tmp_path, small_corpus, requeue_ok):
    """The rendered script with stand-ins for srun (a crash) and scontrol (requeue accepted or always refused):
    an accepted requeue ends the script with 0 after one call; a refused one is retried, then the job fails
    with exit 1 and a line saying to resubmit, instead of ending COMPLETED with the run unfinished."""
    from dstlm.cli import parse_run
    from dstlm.slurm import render

    path = recipe(tmp_path, small_corpus, "q", strategy="ddp")
    text, out, _, _ = render(["--config", path, "--tasks-per-node", "2"], parse_run)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    refuse = 'echo "slurm_requeue error: Requested operation is presently disabled" >&2; exit 1'
    stubs = {"srun": "exit 1",
             "squeue": "echo 10:00",
             "scontrol": f"""echo "$*" >> {calls}
case "$1 $2" in
  "show hostnames") echo vm ;;
  "show node") echo "NodeName=vm NodeAddr=127.0.0.1" ;;
  requeue*) {"exit 0" if requeue_ok else refuse} ;;
esac"""}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm",
           "DSTLM_REQUEUE_RETRY_S": "0"}
    r = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env, timeout=60)
    requeues = [line for line in calls.read_text().splitlines() if line.startswith("requeue")]
    assert "crashed (exit code 1; 1 crash(es) in a row): requeueing (restart 1)" in r.stdout, r.stdout + r.stderr
    if requeue_ok:
        assert r.returncode == 0 and requeues == ["requeue 7"], r.stderr
    else:
        assert r.returncode == 1 and requeues == ["requeue 7"] * 3, r.stderr
        assert "'scontrol requeue 7' failed 3 times" in r.stderr and "resubmit this script" in r.stderr
