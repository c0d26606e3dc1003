"""A training run's work directory: the names of its files, reading and writing them (JSON, atomically; a
damaged file is named in one error), making it, checking that it fits the data, and the lock that keeps it to
one run at a time.

The lock is `fcntl.flock` on WORKDIR/.imgclf.lock, which the kernel releases when its process ends however it
ends (kill -9 included), so a lock left by a killed run is taken over without asking. Where the filesystem
has no locks, the process id written in the file decides instead: a lock whose process no longer runs on
this host is stale and taken over.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
from typing import Any, Optional

import ml_collections

from imgclf_jax import config_lib, folders
from imgclf_jax.metrics import finite_or_null
from imgclf_jax.errors import UserError

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"
CONFIG_FILE = "config.json"
SKIPPED_FILE = "skipped_files.txt"
CURVES_FILE = "training_curves.png"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".imgclf.lock"


def check_classes(workdir: str, class_names: list[str]) -> None:
    """Refuses a work directory trained on other classes (a damaged classes.json only warns)."""
    path = os.path.join(workdir, CLASSES_FILE)
    if os.path.exists(path):
        try:
            saved = read_class_names(path)
        except DamagedFile as e:  # Rewritten once the checkpoints (their shapes) prove compatible.
            log.warning("%s; it is written anew.", e)
            return
        if saved != class_names:
            raise UserError(
                f"work directory {workdir} was trained on classes {saved}, but this data has {class_names}; "
                "use another --workdir"
            )


def make(workdir: str) -> None:
    """Creates `workdir` if needed and checks that this process can write in it, before any training."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir} is a file, not a folder; name a folder")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_check_"):
            pass
        checkpoints = os.path.join(workdir, CHECKPOINTS_DIR)
        if os.path.isdir(checkpoints):
            with tempfile.NamedTemporaryFile(dir=checkpoints, prefix=".write_check_"):
                pass
    except OSError as e:
        raise UserError(f"cannot write in the work directory {workdir}: {e.strerror or e}"
                        f"{': ' + str(e.filename) if e.filename else ''}; fix its permissions or use another "
                        "--workdir") from None


def write_skipped(workdir: str, skipped: list[tuple[str, str]]) -> None:
    """Lists the files the scan could not use in SKIPPED_FILE (removed when there are none), and logs them."""
    path = os.path.join(workdir, SKIPPED_FILE)
    if not skipped:
        if os.path.exists(path):
            os.remove(path)
        return
    with open(path, "w") as f:
        f.writelines(f"{folders.display_path(p)}\t{reason}\n" for p, reason in skipped)
    log.warning("Skipped %d unusable file(s) (listed in %s):", len(skipped), path)
    for p, reason in skipped[:10]:
        log.warning("  %s: %s", folders.display_path(p), reason)
    if len(skipped) > 10:
        log.warning("  ... and %d more", len(skipped) - 10)


class DamagedFile(UserError):
    """A file of a work directory that cannot be read or does not hold what it should."""


def read_json(path: str, kind: type = object) -> Any:
    """The JSON value in `path`, which must be a `kind`; a DamagedFile naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise DamagedFile(f"{path} cannot be read ({reason})") from None
    if not isinstance(value, kind):
        raise DamagedFile(f"{path} is damaged: it holds a JSON {type(value).__name__}, not a {kind.__name__}")
    return value


def read_class_names(path: str) -> list[str]:
    """The class names a run saved (classes.json), checked to be a list of names."""
    names = read_json(path, list)
    if not names or not all(isinstance(name, str) for name in names):
        raise DamagedFile(f"{path} is damaged: it should list the class names, and holds {str(names)[:100]}")
    return names


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def write_json(path: str, value: Any, sort_keys: bool = False) -> None:
    """Writes `value` as indented JSON atomically (a reader never sees a half-written file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(finite_or_null(value), f, indent=2, sort_keys=sort_keys, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def _saved_form(config: ml_collections.ConfigDict) -> dict:
    """The config as saved: JSON types, with folders made absolute so evaluate/report work from anywhere."""
    data = to_json_dict(config)
    for key in ("data_dir", "tfds_data_dir"):
        if data.get(key):
            data[key] = os.path.abspath(os.path.expanduser(data[key]))
    return data


def save_config(config: ml_collections.ConfigDict, path: str) -> None:
    """Saves the resolved config (see `_saved_form`)."""
    write_json(path, _saved_form(config), sort_keys=True)


def changes_from_saved(path: str, config: ml_collections.ConfigDict) -> list[str]:
    """'field: saved -> now' for every field in which `config` differs from the one saved at `path`. A field
    that an older version did not save counts as its default here."""
    try:
        with open(path) as f:
            saved = _flatten(json.load(f))
    except (OSError, ValueError) as e:
        return [f"{path} could not be read ({e})"]
    saved = {**_flatten(_saved_form(config_lib.base_config())), **saved}
    now = _flatten(_saved_form(config))
    return [f"{key}: {saved.get(key, '(unset)')} -> {now.get(key, '(unset)')}"
            for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_saved_config(path: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved as JSON (no code is executed to read it)."""
    data = read_json(path, dict)
    config = config_lib.base_config()
    config.unlock()
    try:
        config.update(_tuples(data))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise DamagedFile(f"{path} is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return config


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


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
