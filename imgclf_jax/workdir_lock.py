"""One run at a time in a work directory: an advisory lock held by the training process.

Two runs writing one work directory would log every epoch twice and overwrite each other's checkpoints. The
lock is `fcntl.flock` on WORKDIR/.imgclf.lock, which the kernel releases when its process ends however it
ends (kill -9 included), so a lock left by a killed run is taken over without asking. Where the filesystem
has no locks, the process id written in the file decides instead: a lock whose process no longer runs on
this host is stale and taken over.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket
from typing import Optional

from imgclf_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".imgclf.lock"


class WorkdirInUse(UserError):
    """Another live process holds the work directory."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the work directory for the body, or raises WorkdirInUse."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: Optional[int] = None

    def __enter__(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use(previous) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            if previous and _is_alive(previous):  # No locks on this filesystem: judge by the recorded process.
                os.close(fd)
                raise self._in_use(previous) from None
        if previous and previous.get("pid") != os.getpid():
            log.info("Work directory %s: the run that held it (process %s on %s) has ended without releasing "
                     "it; taken over.", self.workdir, previous.get("pid"), previous.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {datetime.datetime.now().isoformat(timespec='seconds')}\n"
                  .encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # Kept, empty: removing it would race with a run opening it.
            except OSError:
                pass
            os.close(self._fd)  # Releases the lock.
            self._fd = None

    def _in_use(self, holder: Optional[dict]) -> WorkdirInUse:
        who = f"process {holder['pid']} on {holder['host']}, since {holder['since']}" if holder else "another process"
        return WorkdirInUse(f"work directory {self.workdir} is in use by another training run ({who}); wait for "
                            "it to end, or use another --workdir")


def _read_holder(fd: int) -> Optional[dict]:
    try:
        fields = os.pread(fd, 512, 0).decode(errors="replace").split()
        return {"pid": int(fields[0]), "host": fields[1], "since": fields[2]} if len(fields) >= 3 else None
    except (OSError, ValueError):
        return None


def _is_alive(holder: dict) -> bool:
    if holder["host"] != socket.gethostname():
        return True  # Another host's process cannot be checked from here: assume it runs.
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return holder["pid"] != os.getpid()
