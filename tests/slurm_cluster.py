"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's
packages (``.ci/run`` installs them), each with its own files in a temporary folder (key, socket,
state, spool, logs, ``slurm.conf``) and free ports, so nothing of the host's own configuration is
used or changed. ``env`` is what a client (sbatch, squeue, scancel) needs to reach it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
KILL_WAIT_S = 10  # SIGTERM, then SIGKILL this much later: a short grace period (Slurm's default is 30 s)


def missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """munged + slurmctld + slurmd for one node (this host, every core), started in ``__init__``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="harness-slurm-"))
        self.root.chmod(0o755)  # slurmstepd reads the config as the job's user
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir()
        (self.root / "munge").chmod(0o700)
        self.node = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        munge_key = self.root / "munge" / "munge.key"
        munge_key.write_bytes(os.urandom(128))
        munge_key.chmod(0o600)
        self.munge_socket = self.root / "munge" / "munge.socket"
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
        conf = f"""\
ClusterName=harness-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={self.root / 'slurmctld.log'}
SlurmdLogFile={self.root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait={KILL_WAIT_S}
MinJobAge=300
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerParameters=sched_interval=1
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
"""
        self.conf = self.root / "slurm.conf"
        self.conf.write_text(conf)
        self.conf.chmod(0o644)
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        m = self.root / "munge"
        self._spawn([_binary("munged"), "-F", "--force", f"--key-file={m / 'munge.key'}",
                     f"--socket={self.munge_socket}", f"--pid-file={m / 'munged.pid'}",
                     f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged", 20)
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn([_binary("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._idle, "the node to come up", 90)

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.root / f"{Path(cmd[0]).name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip()
        return out in ("idle", "mix", "alloc")

    def _wait(self, ready, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        raise RuntimeError(f"slurm: waiting for {what} failed; logs:\n{self.logs()}")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.rglob("*")) if p.suffix in (".log", ".out") and p.is_file())

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=3)  # its state is thrown away: no need to let it save it
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.root, ignore_errors=True)
