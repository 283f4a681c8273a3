"""Preemption and automatic resume: a real `dstlm fit` process gets the preemption signal mid-run, stops at a
step boundary with a complete checkpoint and exit code 75, and `--ckpt_path auto` goes on from it to the
weights of an uninterrupted run, bit for bit; half-written checkpoints are set aside; a finished run does
nothing. (tests/test_slurm.py does the same through a real SLURM.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from helpers.faults import PLUGIN_ENV

pytestmark = pytest.mark.faults  # `make faults` runs every fault test (docs/faults.md)

ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false",
       "HF_DATASETS_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
       **PLUGIN_ENV}  # the fault plug-in in every rank (inert unless DSTLM_FAULT is set)


def recipe(tmp_path: Path, files, name: str, steps: int = 40, **trainer) -> str:
    cfg = dict(name=name, out_dir=str(tmp_path / "runs"), seed=7,
               model=dict(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64),
               data=dict(files=files, vocab_size=512, block_size=64, batch_size=8, val_batches=2),
               optim=dict(lr=0.003, warmup_steps=2),
               sparsity=dict(method="rigl", sparsity=0.8, delta_t=5),
               trainer=dict(max_steps=steps, val_every_n_steps=20, ckpt_every_n_steps=10, progress_bar=False,
                            accelerator="cpu", log_every_n_steps=1, **trainer))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def fit(path: str, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dstlm.cli", "fit", "--config", path, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def weights(run: Path) -> dict:
    from dstlm.checkpoint import read_checkpoint

    return read_checkpoint(run)["state_dict"]


def signal_when(proc: subprocess.Popen, ready: Path, signum=signal.SIGUSR2, timeout=300) -> None:
    deadline = time.time() + timeout
    while not ready.exists():
        assert proc.poll() is None, "the run ended before the signal"
        assert time.time() < deadline, f"{ready} did not appear"
        time.sleep(0.05)
    proc.send_signal(signum)


def test_signal_stops_at_a_checkpoint_and_auto_resume_is_bit_exact(tmp_path, small_corpus):
    ref = fit(recipe(tmp_path, small_corpus, "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]

    path = recipe(tmp_path, small_corpus, "pre")
    run = tmp_path / "runs" / "pre"
    proc = subprocess.Popen([sys.executable, "-m", "dstlm.cli", "fit", "--config", path, "--ckpt_path", "auto"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    signal_when(proc, run / "checkpoints" / "step0000010.ckpt")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]
    marker = json.loads((run / "PREEMPTED").read_text())
    stopped = marker["step"]
    assert 10 <= stopped < 40 and marker["signal"] == "SIGUSR2"
    assert f"stops after step {stopped}" in out and not (run / "FINISHED").exists()
    assert os.path.realpath(run / "checkpoints" / "last.ckpt").endswith(f"step{stopped:07d}.ckpt")
    assert float((run / "checkpoints" / "save_seconds.txt").read_text().split()[-1]) > 0

    # a save killed halfway leaves a .tmp: set aside and named, never resumed from
    (run / "checkpoints" / "step0000099.ckpt.tmp").write_text("half written")
    again = fit(path, "--ckpt_path", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "set aside an incomplete checkpoint" in again.stdout and "resuming from" in again.stdout
    assert (run / "checkpoints" / "step0000099.ckpt.incomplete-0").exists()
    assert json.loads((run / "FINISHED").read_text())["steps"] == 40
    a, b = weights(tmp_path / "runs" / "ref"), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # masks included

    done = fit(path, "--ckpt_path", "auto")
    assert done.returncode == 0 and "nothing to do" in done.stdout and "dstlm run finished" not in done.stdout


def test_preempt_signal_value_is_checked(tmp_path, small_corpus):
    from conftest import run_cli  # in this process: tests/test_training.py runs a bad input in a real one

    code, stderr = run_cli(["fit", "--config", recipe(tmp_path, small_corpus, "bad", preempt_signal="USR9")])
    assert code != 0 and "trainer.preempt_signal='USR9' is not a signal name" in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.dist
def test_two_ranks_stop_at_the_same_step(tmp_path, small_corpus):
    """Only rank 1 gets the signal: the all-reduced flag stops both ranks after the same step, one checkpoint."""
    path = recipe(tmp_path, small_corpus, "two", strategy="ddp", devices=2)
    run = tmp_path / "runs" / "two"
    proc = subprocess.Popen(["bash", "launch/torchrun.sh", "2", path], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "PYTHON": sys.executable,
                                                                    "STRATEGY": "ddp"})
    ready = run / "checkpoints" / "step0000010.ckpt"
    deadline = time.time() + 300
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout.splitlines()
    pids = sorted(int(line.split()[0]) for line in ps
                  if f"dstlm.cli fit --config {path}" in line and "torch.distributed.run" not in line)
    assert len(pids) == 2, [line for line in ps if "dstlm" in line]
    os.kill(pids[-1], signal.SIGUSR2)
    out, err = proc.communicate(timeout=600)
    marker = json.loads((run / "PREEMPTED").read_text())
    assert out.count("preemption signal SIGUSR2 received") == 1, out[-2000:] + err[-2000:]
    assert os.path.realpath(run / "checkpoints" / "last.ckpt").endswith(f"step{marker['step']:07d}.ckpt")


@pytest.mark.dist
@pytest.mark.parametrize("strategy, how", [
    ("ddp", signal.SIGKILL), ("ddp", signal.SIGSTOP),  # CI: both ways a peer is lost; ZeRO-2 with make faults
    pytest.param("deepspeed_stage_2", signal.SIGKILL, marks=pytest.mark.slow),
    pytest.param("deepspeed_stage_2", signal.SIGSTOP, marks=pytest.mark.slow)])
def test_a_dead_rank_ends_the_other_within_the_collective_timeout(tmp_path, small_corpus, strategy, how):
    """Two ranks started as plain processes (no launcher that would kill the survivor): after the step-10
    checkpoint (linked as last.ckpt) rank 1 is SIGKILLed (its sockets close: rank 0 fails at once) or SIGSTOPped
    (a hung peer: the connection stays open, only the timeout ends the wait); either way rank 0 exits within
    trainer.collective_timeout_s (20 s) instead of hanging, with one line naming rank 1 and the last checkpoint."""
    import socket

    path = recipe(tmp_path, small_corpus, "dead", steps=400, strategy=strategy, devices=2, collective_timeout_s=20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0",
               "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "dstlm.cli", "fit", "--config", path], cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
    try:
        signal_when(procs[1], tmp_path / "runs" / "dead" / "checkpoints" / "last.ckpt", how)  # step 10, linked
        t0 = time.time()
        procs[0].wait(timeout=120)
        waited = time.time() - t0
    finally:
        for p in procs:
            p.kill()
    err = procs[0].stderr.read()
    assert procs[0].returncode != 0 and waited < 20 + 15, (waited, err[-2000:])
    if how == signal.SIGSTOP:
        assert waited > 5, waited  # it did wait on the silent peer: the timeout, not a closed socket, ended it
    lines = [x for x in err.splitlines() if x.startswith("dstlm: error:")]
    assert len(lines) == 1 and lines[0].startswith("dstlm: error: rank 0 lost rank(s) [1] at step "), err[-3000:]
    assert "dead, or hung beyond trainer.collective_timeout_s=20 s; training stopped" in lines[0]
    ckpt = tmp_path / "runs" / "dead" / "checkpoints"
    assert f"; the last good checkpoint is {ckpt}/step00000" in lines[0], lines[0]
    assert lines[0].endswith("restart the job (--ckpt_path auto resumes)"), lines[0]


def test_zero_groups_get_the_collective_timeout(tmp_path):
    """DeepSpeed runs ZeRO's reductions on process groups it makes itself without a timeout, which torch gives
    its 30-minute default: the strategy hands them trainer.collective_timeout_s, so a peer that hangs inside a
    ZeRO reduction ends the run as quickly as one that hangs in the world group (a real strategy, set up at world
    size 1 in a fresh process: the process group is process-wide)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from datetime import timedelta\n"
        "import lightning as L, torch\n"
        "from deepspeed.utils import groups\n"
        "from dstlm.training.zero.strategies import DeepSpeedZeRO\n"
        "s = DeepSpeedZeRO(stage=2, cpu=True, timeout=timedelta(seconds=9))\n"
        "L.Trainer(accelerator='cpu', devices=1, strategy=s, logger=False).strategy.setup_environment()\n"
        "for g in (torch.distributed.group.WORLD, groups._get_data_parallel_group()):\n"
        "    print('timeout', g._get_backend(torch.device('cpu')).options._timeout.total_seconds())\n")
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "1", "RANK": "0",
           "LOCAL_RANK": "0", "NODE_RANK": "0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    timeouts = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("timeout ")]
    assert timeouts == ["9.0", "9.0"], out.stdout[-2000:] + out.stderr[-2000:]


def test_auto_resume_takes_a_complete_save_whose_link_was_not_swapped(tmp_path):
    """A job killed between putting step 20 in place and relinking last.ckpt resumes from step 20, not 10;
    a half-written save (*.tmp) is never taken; a dangling link is refused with the fix."""
    from dstlm.training.resilience.preemption import newest_complete

    ckpts = tmp_path / "checkpoints"
    assert newest_complete(ckpts) is None
    ckpts.mkdir()
    (ckpts / "step0000010.ckpt").write_bytes(b"10")
    os.symlink("step0000010.ckpt", ckpts / "last.ckpt")
    assert newest_complete(ckpts) == ckpts / "last.ckpt"
    (ckpts / "step0000020.ckpt.tmp").write_bytes(b"half")
    assert newest_complete(ckpts) == ckpts / "last.ckpt"
    (ckpts / "step0000020.ckpt").write_bytes(b"20")
    assert newest_complete(ckpts) == ckpts / "step0000020.ckpt"
    os.remove(ckpts / "last.ckpt")
    assert newest_complete(ckpts) == ckpts / "step0000020.ckpt"  # no link at all: the newest step
    os.symlink("step0000005.ckpt", ckpts / "last.ckpt")
    with pytest.raises(FileNotFoundError, match="which does not exist; remove the link"):
        newest_complete(ckpts)


def test_a_run_resumed_at_max_steps_is_finished(tmp_path, small_corpus):
    """The job died after the last checkpoint (say in the final evaluation), before summary.json and FINISHED:
    --ckpt_path auto then runs no step, but still validates and evaluates, so the summary is whole and equal to
    the original run's."""
    import json

    from conftest import tiny_run
    from dstlm.training.config import EvalConfig
    from dstlm.training.assembly.run import fit as fit_run

    cfg = tiny_run(tmp_path, small_corpus, name="r", model=dict(block_size=256), data=dict(block_size=64),
                   trainer=dict(max_steps=4, val_every_n_steps=4, ckpt_every_n_steps=4))
    cfg.eval = EvalConfig(tasks=["hellaswag"], limit=4)
    first = fit_run(cfg)
    run = tmp_path / "r"
    (run / "summary.json").unlink()
    (run / "FINISHED").unlink()
    again = fit_run(cfg, ckpt_path="auto")
    assert again["steps"] == 4 and again["val_loss"] == pytest.approx(first["val_loss"], abs=1e-6)
    assert again["eval"] == first["eval"]
    assert json.loads((run / "summary.json").read_text())["val_loss"] == again["val_loss"]
    assert (run / "FINISHED").exists()
