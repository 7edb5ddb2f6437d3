"""A real single-node Slurm cluster on localhost for tests/test_slurm.py.

`ensure_packages()` installs Debian's slurm-wlm and munge when they are missing (root and
apt-get required; otherwise it returns why not). `LocalCluster` runs a private munged,
slurmctld and slurmd from a fresh directory under the temp dir (own munge key and socket,
own free ports, generated slurm.conf), so a system Slurm or a colleague's run on the same
machine is never touched; `stop()` ends exactly the daemons it started, by pid. A run that
died without stopping (its owner process gone) is cleaned up by the next `start()`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
PROGRAMS = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol"]
PREFIX = "pipeweaver-slurm-"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def ensure_packages(timeout: float = 1200.0) -> str | None:
    """Install slurm-wlm and munge if a program is missing; None when ready, else why not."""
    if all(shutil.which(p) for p in PROGRAMS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm/munge missing and cannot be installed (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y",
               "--no-install-recommends", *PACKAGES]
    out = ""
    for cmd in (install, ["apt-get", "update"], install):
        try:
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)} timed out after {timeout:.0f} s"
        out = run.stdout + run.stderr
        if run.returncode == 0 and cmd is install and all(shutil.which(p) for p in PROGRAMS):
            return None
    return f"apt-get install {' '.join(PACKAGES)} failed: {out.strip()[-500:]}"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:  # all bound at once, so the ports differ
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def sweep(d: Path) -> None:
    """SIGKILL every process of the run in d: daemons name d on their command line, and
    slurmstepd and job processes inherit SLURM_CONF=d/slurm.conf."""
    marks = (str(d).encode(), f"SLURM_CONF={d}/slurm.conf".encode())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            seen = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
        except OSError:
            continue
        if any(m in seen for m in marks):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def clean_stale(tmp: Path) -> None:
    """Sweep the runs whose owner process is gone (killed tests), then remove their dirs."""
    for d in tmp.glob(PREFIX + "*"):
        try:
            owner = int((d / "owner").read_text())
        except (OSError, ValueError):
            owner = -1
        if owner > 0 and _alive(owner):
            continue  # a live run (perhaps a colleague's): leave it alone
        sweep(d)
        shutil.rmtree(d, ignore_errors=True)


class LocalCluster:
    """munged + slurmctld + slurmd on this machine, configured under a fresh directory."""

    def __init__(self, cpus: int = 2):
        self.cpus = cpus
        self.procs: list[subprocess.Popen] = []
        tmp = Path(tempfile.gettempdir())
        clean_stale(tmp)
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX, dir=tmp))
        self.dir.chmod(0o755)  # munged wants every directory above its socket searchable
        (self.dir / "owner").write_text(str(os.getpid()))
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def write_conf(self) -> None:
        """slurm.conf: this host as controller and one node, state and logs under self.dir."""
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir()
        with open("/proc/meminfo") as f:  # MemTotal in kB; half of it for the node
            mem_mb = max(int(f.readline().split()[1]) // 2048, 1)
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(f"""\
ClusterName=pwtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.dir / f"{name}.out", "w") as out:
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                               env=self.env, start_new_session=True))

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{dead} exited" if dead else f"timed out after {timeout:.0f} s"
                raise RuntimeError(f"waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.5)

    def start(self, timeout: float = 120.0) -> None:
        """A new munge key and munged, then slurmctld and slurmd; returns once the node is idle."""
        d = self.dir
        key = d / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True,
                       capture_output=True)
        key.chmod(0o600)
        self._spawn("munged", ["munged", "-F", f"--socket={d}/munge.sock", f"--key-file={key}",
                               f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed",
                               f"--log-file={d}/munged.log"])
        self._wait("munged", (d / "munge.sock").exists, timeout)
        self.write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        self._wait("the node to be idle", lambda: self.slurm("sinfo", "-h", "-N", "-o", "%t",
                                                               check=False) == "idle", timeout)

    def slurm(self, *cmd: str, check: bool = True, **kw) -> str:
        """A Slurm client command against this cluster; its stdout, stripped."""
        run = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60, **kw)
        if check and run.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {run.returncode}: {run.stderr.strip()}")
        return run.stdout.strip()

    def wait_job(self, job: str, timeout: float) -> str:
        """Poll until the job ends; its final JobState (the job is cancelled on time-out)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.slurm("scontrol", "-o", "show", "job", job)
            state = re.search(r"JobState=(\S+)", info).group(1)
            if state in FINAL_STATES:
                return state
            if time.monotonic() > deadline:
                self.slurm("scancel", job, check=False)
                return f"TIMEOUT after {timeout:.0f} s (still {state})"
            time.sleep(1)

    def logs(self) -> str:
        """The tails of the daemons' logs, for failure messages."""
        names = ("munged.out", "slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out")
        return "\n".join(f"--- {name}\n{_tail(self.dir / name)}" for name in names)

    def stop(self) -> None:
        """Cancel what still runs, end the daemons (slurmd first) and anything of this run
        left behind, then remove the directory."""
        if self.procs and self.procs[-1].poll() is None:
            jobs = self.slurm("squeue", "-h", "-o", "%A", check=False).split()
            if jobs:
                self.slurm("scancel", *jobs, check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        sweep(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
