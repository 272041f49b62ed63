"""An exclusive lock on a run's ``output_dir``, so two runs never write (or resume) the same directory.

Guaranteed on a local filesystem: ``fcntl.flock`` on ``output_dir/.hsfm-run.lock`` is held as long as the
lock file stays open. The kernel drops it when the process dies, even on SIGKILL, so a dead run's lock
never blocks; a second lock on the same directory, from this process or any other, is refused without
touching the holder's record (pid, host, start time, command, purpose, heartbeat). Forked children
(DataLoader workers) close their inherited copy of the lock file at once, so a killed run's lock is free as
soon as its main process is gone, not when its last worker notices.

Not guaranteed: on network filesystems (NFS, Lustre, GPFS) ``flock`` may be local to each node. As a
fallback the holder rewrites ``heartbeat`` (Unix time) in its record every ``heartbeat_s`` seconds, and a
record from another host whose heartbeat is younger than ``stale_after_s`` counts as a live run. This
relies on roughly synchronised clocks and two runs starting within the same instant on different nodes
can still both win. Where ``flock`` is not supported at all, the heartbeat check is all there is.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from hsfm_train.errors import HsfmError

LOCK_NAME = ".hsfm-run.lock"
_HELD: set[int] = set()  # lock file descriptors this process holds


def _close_inherited_locks() -> None:
    # A flock belongs to the open file, which fork shares: a child that kept its copy (a DataLoader worker
    # lingering after its parent was killed) would keep the dead run's directory locked.
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLockError(HsfmError):
    """The run directory is locked by a live run."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunDirectoryLock:
    """Exclusive lock on ``directory`` (created if needed) for a run's whole life.

    Only the main process of a distributed job should take it (the caller decides which). After
    ``acquire()``, ``takeover_message`` is a line to print when the lock of a run that died was taken
    over (else None) and ``previous_holder`` is that run's record (a dict, or None).
    """

    def __init__(self, directory: str | Path, purpose: str = "run", heartbeat_s: float | None = 30.0,
                 stale_after_s: float = 120.0):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.purpose = purpose
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.previous_holder: dict[str, Any] | None = None
        self.takeover_message: str | None = None
        self._fd: int | None = None
        self._record: dict[str, Any] = {}
        self._io = threading.Lock()  # serialises record writes between the heartbeat thread and release()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunDirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> RunDirectoryLock:
        """Take the lock or raise RunLockError; a no-op if this object already holds it."""
        if self.held:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: while we do not hold the lock, the holder's record must stay intact.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flocked = self._flock(fd)
            previous = self._read(fd)
            self._check_live(previous, flocked)
        except BaseException:
            os.close(fd)  # closing also drops our flock, if we got it
            raise
        self._fd = fd
        _HELD.add(fd)
        self.previous_holder, self.takeover_message = previous or None, self._takeover(previous)
        now = time.time()
        self._record = {"pid": os.getpid(), "hostname": socket.gethostname(),
                        "started": datetime.fromtimestamp(now, timezone.utc).astimezone().isoformat("T", "seconds"),
                        "heartbeat": now, "command": " ".join(sys.argv), "purpose": self.purpose}
        try:  # from here on we hold the lock: any failure (even a warning turned error) must give it back
            self._write(sync=True)
            if self.heartbeat_s:
                self._stop.clear()
                self._thread = threading.Thread(target=self._beat, name="hsfm-run-lock-heartbeat", daemon=True)
                self._thread.start()
            if self.takeover_message:
                warnings.warn(self.takeover_message, RuntimeWarning, stacklevel=2)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Stop the heartbeat, clear the record (a clean exit leaves no holder), unlock. Idempotent."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        with self._io:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            if fd not in _HELD:  # a forked child: its copy was closed at the fork, the parent holds the lock
                return
            _HELD.discard(fd)
            try:
                os.ftruncate(fd, 0)
                os.fsync(fd)
            finally:
                # Explicit unlock, not just close: forked children (DataLoader workers) share this open file.
                # The file itself stays: deleting a flock'd file races with a run that has just opened it.
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:
                    pass  # a filesystem without flock: nothing to undo
                os.close(fd)

    def _flock(self, fd: int) -> bool:
        """True if flocked, False if the filesystem cannot flock; raises RunLockError if already held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                rec = self._read(fd)
                raise RunLockError(f"{self.directory} is in use by another run ({self._describe(rec)}: "
                                   f"{rec.get('command', '?')}); wait for it to finish or use another "
                                   "output_dir") from None
            if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                warnings.warn(f"{self.path}: the filesystem does not support flock ({e.strerror}); relying on "
                              "the heartbeat alone to detect another run", RuntimeWarning, stacklevel=3)
                return False
            raise

    def _check_live(self, rec: dict[str, Any], flocked: bool) -> None:
        """Refuse a record whose heartbeat is fresh where flock cannot be trusted to have seen it."""
        if flocked and rec.get("hostname") == socket.gethostname():
            return  # same host: flock is authoritative
        beat = rec.get("heartbeat")
        age = time.time() - beat if isinstance(beat, (int, float)) else None
        if age is not None and age < self.stale_after_s:
            raise RunLockError(f"{self.directory} is in use by another run on host {rec.get('hostname', '?')} "
                               f"({self._describe(rec)}: {rec.get('command', '?')}; heartbeat {max(age, 0):.0f} s "
                               f"ago); wait for it to finish or use another output_dir (if you are sure it is not "
                               f"running, delete {self.path})")

    def _takeover(self, rec: dict[str, Any]) -> str | None:
        if not rec:
            return None
        if "garbled" in rec:
            return f"taking over a lock file with an unreadable record ({self.path}: {rec['garbled']!r})"
        if rec.get("pid") == os.getpid() and rec.get("hostname") == socket.gethostname():
            return None  # our own leftover record
        msg = f"taking over the lock of a run that is no longer running ({self._describe(rec)})"
        pid = rec.get("pid")
        if rec.get("hostname") == socket.gethostname() and isinstance(pid, int) and pid > 0 and _pid_alive(pid):
            msg += "; that pid now belongs to another process"  # flock already proved it holds no lock
        return msg

    @staticmethod
    def _describe(rec: dict[str, Any]) -> str:
        return f"pid {rec.get('pid', '?')} on host {rec.get('hostname', '?')}, started {rec.get('started', '?')}"

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        """The record in the lock file: {} if empty, {"garbled": <text>} if unreadable."""
        raw = os.pread(fd, 65536, 0)
        if not raw.strip():
            return {}
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        return rec if isinstance(rec, dict) else {"garbled": raw[:80].decode("utf-8", "replace")}

    def _write(self, sync: bool = False) -> None:
        with self._io:
            if self._fd is None:  # released meanwhile: never write a file we no longer hold
                return
            data = json.dumps(self._record).encode() + b"\n"
            # Write first, then cut to length: a reader never sees an empty file in between.
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))
            if sync:
                os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._record["heartbeat"] = time.time()
            try:
                self._write()
            except OSError:  # a full disk must not kill the run; the next beat retries
                pass


@contextmanager
def lock_run_directory(directory: str | Path, accelerator: Any, purpose: str = "run") -> Iterator[None]:
    """Hold the run lock of ``directory`` for the ``with`` block. The main process takes it; every rank learns
    whether it did, so a refused job stops on all ranks before any of them writes. A take-over of a dead run's
    lock is said on stdout."""
    lock = RunDirectoryLock(directory, purpose) if accelerator.is_main_process else None
    refusal = None
    if lock is not None:
        try:
            with warnings.catch_warnings():  # said once on stdout below, not also as a warning
                warnings.simplefilter("ignore", RuntimeWarning)
                lock.acquire()
        except RunLockError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise RunLockError(refusal)
    if lock is not None and lock.takeover_message:
        print(f"hsfm: {lock.takeover_message}", flush=True)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
