"""The work directory's lock: a second run is refused while the first lives; a killed run's lock is taken over."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest

from imgclf_jax.workdir import LOCK_FILE, WorkdirInUse, WorkdirLock

_HOLD = ("import sys, time\nfrom imgclf_jax.workdir import WorkdirLock\n"
         "with WorkdirLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n")


def _holder(workdir):
    process = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


@pytest.mark.slow
def test_a_live_holder_keeps_others_out_and_is_named(tmp_path):
    process = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirInUse, match=f"in use by another training run \\(process {process.pid} on "):
            with WorkdirLock(str(tmp_path)):
                pass
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    process = _holder(tmp_path)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(process.pid)  # Left behind, as by kill -9.
    with WorkdirLock(str(tmp_path)):
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert f"process {process.pid}" in caplog.text and "taken over" in caplog.text


def test_released_on_exit_so_the_next_run_gets_it(tmp_path):
    with WorkdirLock(str(tmp_path)):
        pass
    with WorkdirLock(str(tmp_path)):
        pass
    assert (tmp_path / LOCK_FILE).read_text() == ""


@pytest.mark.slow
def test_without_filesystem_locks_a_dead_process_id_is_stale(tmp_path, monkeypatch):
    import fcntl
    import socket

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")  # ENOLCK, as on some network filesystems.

    monkeypatch.setattr(fcntl, "flock", no_locks)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(f"{dead.stdout.strip()} {socket.gethostname()} 2026-01-01T00:00:00\n")
    with WorkdirLock(str(tmp_path)):
        pass
    (tmp_path / LOCK_FILE).write_text(f"1 {socket.gethostname()} 2026-01-01T00:00:00\n")  # init: alive.
    with pytest.raises(WorkdirInUse, match="process 1 on"):
        with WorkdirLock(str(tmp_path)):
            pass
