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



def installed() -> bool:
    return all(shutil.which(c) or Path(f"/usr/sbin/{c}").exists() for c in ("slurmctld", "slurmd", "munged",
                                                                          "sbatch", "scontrol"))


def install() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


NETNS = "dstlm-n2"  # the second "host" of a two-node cluster
VETH = ("veth-dstlm0", "veth-dstlm1")
ADDRS = ("10.77.0.1", "10.77.0.2")
CTLD_PORT, SLURMD_PORT = 6817, 6818  # fixed: one cluster on a machine at a time


def config(root: Path, cpus: int, nodes: int = 1) -> str:
    host = socket.gethostname().split(".")[0]
    if nodes == 1:
        node_lines = f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN"
        ctld = f"{host}(127.0.0.1)"
    else:  # n1 in this network namespace, n2 in NETNS, joined by a veth pair
        node_lines = "\n".join(f"NodeName=n{i + 1} NodeAddr={a} CPUs={cpus} State=UNKNOWN"
                                for i, a in enumerate(ADDRS))
        ctld = f"{host}({ADDRS[0]})"
    return f"""# written by slurm/local_cluster.py
ClusterName=dstlm-local
SlurmctldHost={ctld}
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
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}
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


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", netns, "ip"] if netns else ["ip"]) + list(args)
    subprocess.run(cmd, check=True, capture_output=True)


def make_second_host() -> None:
    """A network namespace joined to this one by a veth pair: ADDRS[0] here, ADDRS[1] there."""
    remove_second_host()
    _ip("netns", "add", NETNS)
    _ip("link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1])
    _ip("link", "set", VETH[1], "netns", NETNS)
    _ip("addr", "add", f"{ADDRS[0]}/24", "dev", VETH[0])
    _ip("link", "set", VETH[0], "up")
    _ip("addr", "add", f"{ADDRS[1]}/24", "dev", VETH[1], netns=NETNS)
    _ip("link", "set", VETH[1], "up", netns=NETNS)
    _ip("link", "set", "lo", "up", netns=NETNS)


def remove_second_host() -> None:
    subprocess.run(["ip", "link", "del", VETH[0]], capture_output=True)  # removes both ends
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


def node_names(nodes: int) -> list[str]:
    return [socket.gethostname().split(".")[0]] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]


def start(root: Path, cpus: int | None = None, timeout: float = 60.0, nodes: int = 1) -> dict[str, str]:
    """Start munged, slurmctld and a slurmd per node (nodes=2: the second in its own network namespace, a
    second "host"); returns the environment a client needs ({'SLURM_CONF': ...}). Waits until every node is
    idle. Refuses to start over a running cluster of the same directory."""
    if nodes not in (1, 2):
        raise ValueError(f"nodes={nodes}: 1, or 2 (this host and a network namespace)")
    if os.geteuid() != 0:
        raise PermissionError("the SLURM daemons need root; run as root (or use a real cluster)")
    if not installed():
        raise FileNotFoundError("slurmctld/slurmd/munged not installed; `apt-get install slurm-wlm munge` "
                                "(or pass --install)")
    root = root.resolve()
    if _alive(_pid(root / "slurmctld.pid")):
        raise RuntimeError(f"a cluster is already running from {root}; stop it first")
    _wait_for_free_ports((CTLD_PORT, SLURMD_PORT), timeout)
    names = node_names(nodes)
    for d in ("state", "spool"):
        shutil.rmtree(root / d, ignore_errors=True)
        (root / d).mkdir(parents=True)
    for n in names:
        (root / "spool" / n).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(config(root, cpus or os.cpu_count() or 1, nodes))
    (root / "nodes").write_text(" ".join(names))
    if nodes == 2:
        make_second_host()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    run_munge = Path("/run/munge")
    run_munge.mkdir(exist_ok=True)
    shutil.chown(run_munge, "munge", "munge")
    if not _alive(_pid(run_munge / "munged.pid")):
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    (root / "munged.pid").write_text((run_munge / "munged.pid").read_text())
    subprocess.run(["/usr/sbin/slurmctld", "-c"], check=True, env=env)  # -c: no saved state (a clean cluster)
    for i, n in enumerate(names):
        # nsenter: only the network namespace (ip netns exec also remounts /sys, hiding the cgroup tree)
        netns = ["nsenter", f"--net=/run/netns/{NETNS}"] if i == 1 else []
        subprocess.run(netns + ["/usr/sbin/slurmd", "-N", n], check=True, env=env)
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env)
        state = r.stdout.split()
        if r.returncode == 0 and len(state) == nodes and all(x.startswith("idle") for x in state):
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    stop(root)
    raise TimeoutError(f"the SLURM nodes did not become idle in {timeout:.0f} s (states {state!r}); see "
                       f"{root}/slurmctld.log and {root}/slurmd-*.log")


def _wait_for_free_ports(ports: tuple[int, ...], timeout: float) -> None:
    """Wait until slurmctld and slurmd can listen on their ports: the daemons of a cluster stopped a moment ago
    (or its job steps) may hold them for a few seconds more, and slurmctld exits at once on a busy port."""
    deadline = time.time() + timeout
    for port in ports:
        while True:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("0.0.0.0", port))
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"port {port} is still in use after {timeout:.0f} s: another SLURM "
                                           f"(or another program) listens there; stop it first") from None
            time.sleep(0.5)


def stop(root: Path) -> None:
    """Stop what `start` started, by PID (slurmd, slurmctld, then munged), waiting for each to exit."""
    root = root.resolve()
    names = (root / "nodes").read_text().split() if (root / "nodes").exists() else []
    pid_files = [root / f"slurmd-{n}.pid" for n in names] + [root / "slurmctld.pid", root / "munged.pid"]
    for path in pid_files:
        pid = _pid(path)
        if not _alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    if len(names) == 2:
        remove_second_host()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("start", "stop"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of each node (default: all)")
    ap.add_argument("--nodes", type=int, default=1, help="2: a second node in a network namespace")
    ap.add_argument("--install", action="store_true", help="apt-get install slurm-wlm munge when missing")
    args = ap.parse_args(argv)
    if args.action == "stop":
        stop(args.dir)
        return 0
    if args.install and not installed():
        install()
    env = start(args.dir, args.cpus, nodes=args.nodes)
    print(f"export SLURM_CONF={env['SLURM_CONF']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
