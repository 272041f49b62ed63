"""RunDirectoryLock: refusal without damage, take-over of dead runs, the cross-host heartbeat fallback."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from hsfm_train.engine.run_lock import LOCK_NAME, RunDirectoryLock, RunLockError

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD = ("import sys, time\n"
         "from hsfm_train.engine.run_lock import RunDirectoryLock\n"
         "RunDirectoryLock(sys.argv[1], purpose='child').acquire()\n"
         "print('locked', flush=True)\n"
         "time.sleep(60)\n")


def record(directory: Path) -> dict:
    return json.loads((directory / LOCK_NAME).read_text())


def write_record(directory: Path, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rec = {"pid": 424242, "hostname": "other-node", "started": "2024-01-01T00:00:00+00:00",
           "heartbeat": time.time(), "command": "hsfm pretrain x.yaml", "purpose": "run"} | fields
    (directory / LOCK_NAME).write_text(json.dumps(rec))


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any take-over warning fails the test
        yield


def test_acquire_release_and_record(tmp_path, no_warnings):
    d = tmp_path / "new" / "run"  # created on acquire
    lock = RunDirectoryLock(d, purpose="pretrain")
    assert not lock.held
    assert lock.acquire() is lock and lock.held
    rec = record(d)
    assert rec["pid"] == os.getpid() and rec["hostname"] == socket.gethostname()
    assert rec["purpose"] == "pretrain" and "started" in rec and "command" in rec
    assert lock.takeover_message is None and lock.previous_holder is None
    lock.release()
    lock.release()  # idempotent
    assert not lock.held
    assert (d / LOCK_NAME).exists() and (d / LOCK_NAME).read_text() == ""  # kept, record cleared


def test_context_manager(tmp_path, no_warnings):
    with RunDirectoryLock(tmp_path) as lock:
        assert lock.held
    assert not lock.held
    with RunDirectoryLock(tmp_path) as again:  # a clean exit leaves nothing to take over
        assert again.takeover_message is None


def test_second_lock_in_same_process_refuses_without_damage(tmp_path):
    with RunDirectoryLock(tmp_path) as first:
        before = (tmp_path / LOCK_NAME).read_bytes()
        second = RunDirectoryLock(tmp_path)
        with pytest.raises(RunLockError, match=f"pid {os.getpid()} on host {socket.gethostname()}") as e:
            second.acquire()
        assert "\n" not in str(e.value) and "use another output_dir" in str(e.value)
        assert not second.held and first.held
        assert (tmp_path / LOCK_NAME).read_bytes() == before
    with RunDirectoryLock(tmp_path):  # free again once the first is released
        pass


@pytest.mark.timeout(60)
def test_child_holder_refuses_then_is_taken_over_after_sigkill(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=f"pid {child.pid} on host"):
            RunDirectoryLock(tmp_path).acquire()
        assert record(tmp_path)["pid"] == child.pid  # refusal left the child's record alone
    finally:
        child.kill()
        child.wait()
    lock = RunDirectoryLock(tmp_path)
    with pytest.warns(RuntimeWarning, match=f"no longer running \\(pid {child.pid} on host"):
        lock.acquire()
    assert lock.previous_holder["pid"] == child.pid and str(child.pid) in lock.takeover_message
    lock.release()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with RunDirectoryLock(tmp_path) as clean:
            assert clean.takeover_message is None


def test_other_host_with_fresh_heartbeat_refuses(tmp_path):
    write_record(tmp_path)
    before = (tmp_path / LOCK_NAME).read_bytes()
    with pytest.raises(RunLockError, match="on host other-node .*delete"):
        RunDirectoryLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_bytes() == before


def test_other_host_with_old_heartbeat_is_taken_over(tmp_path):
    write_record(tmp_path, heartbeat=time.time() - 1000)
    lock = RunDirectoryLock(tmp_path, stale_after_s=120)
    with pytest.warns(RuntimeWarning, match="pid 424242 on host other-node"):
        lock.acquire()
    assert record(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_same_host_live_pid_without_flock_is_taken_over(tmp_path):
    # The pid is alive (our parent) but holds no flock: a reused pid, so the run it names has ended.
    write_record(tmp_path, pid=os.getppid(), hostname=socket.gethostname())
    with pytest.warns(RuntimeWarning, match="belongs to another process"):
        RunDirectoryLock(tmp_path).acquire().release()


def test_garbled_lock_file_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_bytes(b"\x00{not json")
    lock = RunDirectoryLock(tmp_path)
    with pytest.warns(RuntimeWarning, match="unreadable record"):
        lock.acquire()
    assert record(tmp_path)["pid"] == os.getpid()
    lock.release()


def test_heartbeat_advances_while_held(tmp_path):
    with RunDirectoryLock(tmp_path, heartbeat_s=0.1):
        first = record(tmp_path)["heartbeat"]
        deadline = time.time() + 5
        while record(tmp_path)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert record(tmp_path)["heartbeat"] > first
    assert (tmp_path / LOCK_NAME).read_text() == ""  # the stopped thread wrote nothing after release


def test_without_flock_support_the_heartbeat_still_refuses(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    with RunDirectoryLock(tmp_path):
        monkeypatch.setattr(fcntl, "flock", no_flock)
        with pytest.warns(RuntimeWarning, match="does not support flock"):
            with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
                RunDirectoryLock(tmp_path).acquire()
        monkeypatch.undo()


def test_a_forked_child_does_not_keep_a_killed_runs_lock(tmp_path):
    # a DataLoader worker outlives its SIGKILLed parent for a few seconds; the directory must be free at once
    script = (
        "import os, sys, time\n"
        "from hsfm_train.engine.run_lock import RunDirectoryLock\n"
        f"lock = RunDirectoryLock({str(tmp_path)!r}, heartbeat_s=None).acquire()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    print('child', os.getpid(), flush=True)\n"  # after the fork handlers ran in the child
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    grandchild = int(parent.stdout.readline().split()[1])
    try:
        parent.kill()
        parent.wait()
        with pytest.warns(RuntimeWarning, match=f"pid {parent.pid} on host"):
            lock = RunDirectoryLock(tmp_path).acquire()  # the forked child is still alive
        os.kill(grandchild, 0)
        lock.release()
    finally:
        os.kill(grandchild, 9)
