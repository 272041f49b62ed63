"""A real, throw-away Slurm cluster on this machine for the job-script tests: one munged, one slurmctld and two
``slurmd -N nodeK`` daemons (fake nodes ``node1`` and ``node2``, both NodeAddr 127.0.0.1 on distinct ports),
everything (config, keys, sockets, state, spool, logs) in one temporary directory.

Debian's ``slurm-wlm`` is installed with apt-get when ``slurmctld`` is missing; only when that cannot work is
the cluster unavailable (:class:`SlurmUnavailable`, which the fixture turns into a skip that says why).

The client commands reach this cluster through ``SLURM_CONF`` (:meth:`LocalSlurmCluster.env`); jobs inherit
it from the submitting environment, so ``srun``/``scontrol``/``scancel`` inside a job talk to the same
controller. Teardown stops what was started by PID: jobs are cancelled, the daemons get SIGTERM (then SIGKILL),
and any process left whose environment names this cluster's ``SLURM_CONF`` (a step daemon or a task of a job
that outlived its slurmd) is killed; the temporary directory is removed.
"""
from __future__ import annotations

import ctypes
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

NODES = ("node1", "node2")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here."""


class SlurmError(RuntimeError):
    """The local cluster did not come up, or a job did not reach the state waited for."""


def ensure_slurm_installed(timeout: float = 900) -> None:
    """Install Debian's slurm-wlm (and munge) when ``slurmctld`` is missing; raise SlurmUnavailable when the
    install cannot work (no apt-get, not root, no package source)."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurmctld is not installed and there is no apt-get to install slurm-wlm")
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmctld is not installed and installing slurm-wlm needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for command in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{' '.join(command)} did not finish within {timeout:.0f} s") from None
        log.append(result.stdout[-2000:] + result.stderr[-2000:])
        if result.returncode != 0 and command[1] == "install":
            raise SlurmUnavailable(f"apt-get install slurm-wlm failed (exit {result.returncode}): "
                                   f"{result.stderr.strip().splitlines()[-1:]}")
    if shutil.which("slurmctld") is None:
        raise SlurmUnavailable("apt-get install slurm-wlm ran but slurmctld is still missing: " + log[-1][-500:])


def _die_with_parent() -> None:
    """In a daemon's child before exec: SIGTERM when the process that started it dies (say a test run killed
    without its teardown), so the daemons never outlive it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):
        pass


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def _wait(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.25,
          diagnostics: Callable[[], str] = lambda: "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnostics()}")
        time.sleep(interval)


class LocalSlurmCluster:
    """Start with :meth:`start` (or use as a context manager); :meth:`stop` always cleans up."""

    def __init__(self, cpus: int | None = None, nodes: Iterable[str] = NODES, cred_expire: int = 5) -> None:
        self.nodes = tuple(nodes)
        self.cred_expire = cred_expire
        self.cpus = cpus or os.cpu_count() or 1
        self.root = Path(tempfile.mkdtemp(prefix="hsfm-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._processes: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalSlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for client commands (and, through sbatch's default --export=ALL, for jobs)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "SBATCH_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def start(self, timeout: float = 60) -> None:
        ensure_slurm_installed()
        self._start_munge()
        self._write_config()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        _wait(lambda: self._run(["scontrol", "ping"], check=False).stdout.count("UP") > 0, timeout,
              "slurmctld to answer", diagnostics=self.diagnostics)
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        _wait(self._nodes_idle, timeout, f"nodes {', '.join(self.nodes)} to be idle", diagnostics=self.diagnostics)

    def stop(self) -> None:
        """Cancel every job, stop the daemons by PID, kill what a job left behind, remove the directory."""
        if self._processes.get("slurmctld") is not None and self._processes["slurmctld"].poll() is None:
            self._run(["scancel", "--full", "--signal=KILL", "--user", str(os.getuid())], check=False, timeout=10)
            try:
                _wait(lambda: not self._run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.strip(),
                      20, "jobs to end")
            except (SlurmError, subprocess.TimeoutExpired):
                pass
        for name in sorted(self._processes, key=lambda n: (n == "munged", n == "slurmctld")):  # slurmd first
            self._terminate(self._processes[name])
        self._kill_leftovers()
        self._processes.clear()
        for handle in self._logs:
            handle.close()
        self._logs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _terminate(process: subprocess.Popen, grace: float = 10) -> None:
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def _kill_leftovers(self) -> None:
        """Processes started by this cluster's daemons carry SLURM_CONF=<our conf> (slurmstepd too)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        own = os.getpid()
        for _ in range(3):
            found = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == own:
                    continue
                try:
                    environ = (entry / "environ").read_bytes().split(b"\0")
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if marker in environ or str(self.conf).encode() in cmdline:
                    found.append(int(entry.name))
            if not found:
                return
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)

    # ---- daemons ---------------------------------------------------------------------------------------------
    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self._logs.append(log)
        self._processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                                 cwd=self.root, start_new_session=True, preexec_fn=_die_with_parent)

    def _start_munge(self) -> None:
        directory = self.munge_socket.parent
        directory.mkdir(mode=0o700)
        key = directory / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={directory / 'munged.pid'}",
                               f"--log-file={directory / 'munged.log'}", f"--seed-file={directory / 'munged.seed'}",
                               "--num-threads=2"])
        _wait(self.munge_socket.exists, 20, "munged's socket",
              diagnostics=lambda: self._tail(directory / "munged.log") + self._tail(self.root / "munged.stdout"))

    def _write_config(self) -> None:
        controller_port, *node_ports = _free_ports(1 + len(self.nodes))
        user, first_job_id = pwd.getpwuid(os.getuid()).pw_name, random.randrange(1000, 1_000_000)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        nodes = "\n".join(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname=localhost Port={port} "
                          f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
                          for node, port in zip(self.nodes, node_ports))
        self.conf.write_text(f"""\
# written by tests/slurm_cluster.py: a local test cluster, removed when the tests end
ClusterName=hsfmtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={controller_port}
SlurmUser={user}
SlurmdUser={user}
# job ids (and the launcher's rendezvous port, derived from them) differ between clusters started in parallel
FirstJobId={first_job_id}
AuthType=auth/munge
# cred_expire: the step-credential lifetime, which is also how long Slurm holds a requeued job pending
# (BeginTime = requeue + cred_expire + 1 s; the default 120 s would dominate the requeue test)
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in a container: track processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
JobRequeue=1
MinJobAge=120
KillWait=5
MessageTimeout=20
InactiveLimit=0
{nodes}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _nodes_idle(self) -> bool:
        result = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        states = dict(line.split()[:2] for line in result.stdout.splitlines() if len(line.split()) >= 2)
        return all(states.get(node, "").rstrip("*") == "idle" for node in self.nodes)

    # ---- clients ---------------------------------------------------------------------------------------------
    def _run(self, command: list[str], check: bool = True, timeout: float = 30,
             env: Mapping[str, str] | None = None, cwd: Path | str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env=self.env(env), capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def command(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Any Slurm client command against this cluster, e.g. ``cluster.command("scancel", "-s", "USR1", id)``."""
        return self._run(list(args), **kwargs)

    def sbatch(self, script: Path | str, *args: str, options: Iterable[str] = (), cwd: Path | str | None = None,
               env: Mapping[str, str] | None = None) -> str:
        """``sbatch --parsable OPTIONS SCRIPT ARGS``; returns the job id."""
        result = self._run(["sbatch", "--parsable", *options, str(script), *args], env=env, cwd=cwd)
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the controller has purged the job)."""
        result = self._run(["scontrol", "show", "job", "-o", job_id], check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\S+?)=(\S*)", result.stdout))

    def wait_for_state(self, job_id: str, states: Iterable[str], timeout: float = 120,
                       log: Path | None = None) -> dict[str, str]:
        """Poll until the job's JobState is one of ``states``; returns the job record. A job that reaches a final
        state that is not wanted fails at once, with the job record, the job's log and the daemons' log tails."""
        wanted = set(states)

        def reached() -> dict[str, str] | None:
            job = self.job(job_id)
            state = job.get("JobState")
            if state in wanted:
                return job
            if state in FINAL_STATES:
                raise SlurmError(f"job {job_id} ended {state}, not {sorted(wanted)}: {job}\n"
                                 f"{self.diagnostics(log)}")
            return None

        return _wait(reached, timeout, f"job {job_id} to be {sorted(wanted)}",
                     diagnostics=lambda: f"{self.job(job_id)}\n{self.diagnostics(log)}")

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str, log: Path | None = None) -> object:
        """Poll ``predicate`` until it returns something true (returned); on timeout, fail with the daemons' log
        tails and the job's log."""
        return _wait(predicate, timeout, what, diagnostics=lambda: self.diagnostics(log))

    def wait_for_end(self, job_id: str, timeout: float = 120, log: Path | None = None) -> dict[str, str]:
        return self.wait_for_state(job_id, FINAL_STATES, timeout, log)

    # ---- diagnostics -----------------------------------------------------------------------------------------
    @staticmethod
    def _tail(path: Path, lines: int = 30) -> str:
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"--- {path.name} ---\n" + "\n".join(text) + "\n"

    def diagnostics(self, job_log: Path | None = None) -> str:
        parts = [self._tail(job_log, 80)] if job_log else []
        parts += [self._tail(self.root / "slurmctld.log")]
        parts += [self._tail(self.root / f"slurmd-{node}.log", 15) for node in self.nodes]
        parts += [self._tail(path, 10) for path in sorted(self.root.glob("*.stdout"))]
        return "".join(parts)
