"""A real single-node SLURM on this machine, for trying `slurm/` and for the tests: munged, slurmctld and
slurmd from the Debian packages, with their configuration, state, logs and PID files in one directory.

    sudo python slurm/local_cluster.py start /tmp/slurm   # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
    SLURM_CONF=/tmp/slurm/slurm.conf sbatch ...
    sudo python slurm/local_cluster.py stop /tmp/slurm    # stops the daemons it started, by PID

Needs root (the daemons) and `apt-get install slurm-wlm munge` (`--install` runs it). Nothing outside the
directory is changed except /run/munge (munged's socket). One node named after this host, every CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order


def installed() -> bool:
    return all(shutil.which(c) or Path(f"/usr/sbin/{c}").exists() for c in ("slurmctld", "slurmd", "munged",
                                                                          "sbatch", "scontrol"))


def install() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def config(root: Path, cpus: int) -> str:
    host = socket.gethostname().split(".")[0]
    return f"""# written by slurm/local_cluster.py
ClusterName=dstlm-local
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def start(root: Path, cpus: int | None = None, timeout: float = 60.0) -> dict[str, str]:
    """Start the three daemons; returns the environment a client needs ({'SLURM_CONF': ...}). Waits until the
    node is idle. Refuses to start over a running cluster of the same directory."""
    if os.geteuid() != 0:
        raise PermissionError("the SLURM daemons need root; run as root (or use a real cluster)")
    if not installed():
        raise FileNotFoundError("slurmctld/slurmd/munged not installed; `apt-get install slurm-wlm munge` "
                                "(or pass --install)")
    root = root.resolve()
    if _alive(_pid(root / "slurmctld.pid")):
        raise RuntimeError(f"a cluster is already running from {root}; stop it first")
    for d in ("state", "spool"):
        shutil.rmtree(root / d, ignore_errors=True)
        (root / d).mkdir(parents=True)
    conf = root / "slurm.conf"
    conf.write_text(config(root, cpus or os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    run_munge = Path("/run/munge")
    run_munge.mkdir(exist_ok=True)
    shutil.chown(run_munge, "munge", "munge")
    if not _alive(_pid(run_munge / "munged.pid")):
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    (root / "munged.pid").write_text((run_munge / "munged.pid").read_text())
    subprocess.run(["/usr/sbin/slurmctld", "-c"], check=True, env=env)  # -c: no saved state (a clean cluster)
    subprocess.run(["/usr/sbin/slurmd"], check=True, env=env)
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
        state = r.stdout.strip()
        if r.returncode == 0 and state.startswith("idle"):
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    stop(root)
    raise TimeoutError(f"the SLURM node did not become idle in {timeout:.0f} s (state {state!r}); see "
                       f"{root}/slurmctld.log and {root}/slurmd.log")


def stop(root: Path) -> None:
    """Stop what `start` started, by PID (slurmd, slurmctld, then munged), waiting for each to exit."""
    root = root.resolve()
    for name in DAEMONS:
        pid = _pid(root / f"{name}.pid")
        if not _alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("start", "stop"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the node (default: all)")
    ap.add_argument("--install", action="store_true", help="apt-get install slurm-wlm munge when missing")
    args = ap.parse_args(argv)
    if args.action == "stop":
        stop(args.dir)
        return 0
    if args.install and not installed():
        install()
    env = start(args.dir, args.cpus)
    print(f"export SLURM_CONF={env['SLURM_CONF']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
