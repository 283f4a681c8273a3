"""Multi-node for real: two "hosts" (this network namespace and a second one joined by a veth pair, created
and removed here), a slurmd in each, and a job rendered by `dstlm slurm --nodes 2` with one task per node
(srun, rendezvous at the first node's address, gloo pinned to the interface that reaches it) ends where one
node with 2 processes ends, under DDP and ZeRO-3. Needs root (namespaces, daemons)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_faults import ddp_reference  # noqa: F401 (a fixture: the 2-rank DDP run both files compare against)
from test_preemption import ENV, recipe, weights
from test_slurm import job_field, running_cluster, sh, wait_for

pytestmark = pytest.mark.dist  # one SLURM at a time (fixed ports): tests/conftest.py keeps this file on one worker


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    for env, _ in running_cluster(tmp_path_factory, nodes=2, cpus=1):
        yield env


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_stage_3", marks=pytest.mark.slow)])
def test_two_nodes_match_one_node_with_two_processes(tmp_path, small_corpus, two_nodes, strategy, request):
    env = two_nodes
    if strategy == "ddp":  # the fault tests' 2-rank DDP run of the same recipe: made once, shared
        a = request.getfixturevalue("ddp_reference")
    else:
        ref = subprocess.run(["bash", "launch/torchrun.sh", "2", recipe(tmp_path, small_corpus, "one", steps=20,
                                                                       strategy=strategy)],
                             cwd=REPO, capture_output=True, text=True, timeout=600,
                             env={**ENV, "PYTHON": sys.executable, "STRATEGY": strategy})
        assert ref.returncode == 0, ref.stderr[-3000:]
        a = weights(tmp_path / "runs" / "one")
    path = recipe(tmp_path, small_corpus, "two", steps=20, strategy=strategy)
    out = sh([sys.executable, "-m", "dstlm.cli", "slurm", "--config", path, "--nodes", "2", "--tasks-per-node", "1",
              "--time", "0:20:00", "--collective-timeout", "120", "--max-retries", "0", "--submit"], env)
    job = re.search(r"submitted job (\d+)", out).group(1)
    wait_for(lambda: job_field(job, "JobState", env) in ("COMPLETED", "FAILED"), 600, "job ended", env, job)
    log = (tmp_path / "runs" / "two" / "slurm" / f"dstlm-two-{job}.out").read_text()
    assert job_field(job, "JobState", env) == "COMPLETED", log[-3000:]
    assert "nodes=n[1-2]" in log and "dstlm-slurm: finished" in log
    b = weights(tmp_path / "runs" / "two")
    assert a.keys() == b.keys()
    for k in a:  # the same two ranks, the same gloo reductions: equal
        assert torch.equal(a[k], b[k]), k
