"""Orbax checkpoints of the TrainState: saved after epochs that may be the best, the last, and others once
`checkpoint_every_minutes` have passed (imgclf_jax.train), keeping the latest few and the best by validation
accuracy.

Saves are atomic (orbax writes to a temporary folder and renames). A step that cannot be read (a truncated
file, garbage metadata) is never fatal: a writer (training) moves it aside into `damaged_checkpoints/` beside
the checkpoints folder, so the step is trained and saved again; a reader (evaluate, predict, report) leaves
the folder as it is and falls back to the next-best readable step, with a warning. A checkpoint of another
model (other shapes) is refused as such, never mistaken for damage.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from imgclf_jax.errors import UserError

log = logging.getLogger(__name__)

BEST_METRIC = "val_accuracy"
DAMAGED_DIR = "damaged_checkpoints"  # Beside the checkpoints folder: steps set aside, never deleted.


class IncompatibleCheckpoint(UserError):
    """A readable checkpoint of another model (other parameter shapes or state layout)."""


class WriteFailed(UserError):
    """A checkpoint could not be written (permissions, a full disk, a file-size limit)."""


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the two items we save: `state` and `meta` (JSON)."""

    def __init__(self, directory: str, max_to_keep: int = 2, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        self._max_to_keep = max_to_keep
        self._view: Optional[str] = None  # Read-only: a folder of links to the readable steps only.
        damaged = {step: reason for step, reason in
                   ((step, damage_of(self._step_dir(step))) for step in _step_numbers(self.directory)) if reason}
        for step, reason in sorted(damaged.items()):
            self._set_aside(step, reason)
        self._open(exclude=set(damaged) if read_only else set())

    def _open(self, exclude: set[int]) -> None:
        directory = self.directory
        if exclude:  # Read-only: orbax would read the damaged steps' metadata and fail; show it the others.
            self._view = tempfile.mkdtemp(prefix="imgclf_checkpoints_")
            for step in _step_numbers(self.directory):
                if step not in exclude:
                    os.symlink(self._step_dir(step), os.path.join(self._view, str(step)))
            directory = self._view
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy([
                checkpoint_managers.LatestN(n=self._max_to_keep),
                # Checkpoints saved without metrics (epochs not validated) are kept only while among the latest.
                checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                          keep_checkpoints_without_metrics=False),
            ]),
            best_fn=lambda m: m[BEST_METRIC],
            best_mode="max",
            enable_async_checkpointing=not self.read_only,
            read_only=self.read_only,
            create=not self.read_only,
        )
        try:
            self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
        except OSError as e:
            raise WriteFailed(f"cannot open the checkpoints folder {self.directory}: {_os_reason(e)}") from None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _set_aside(self, step: int, reason: str) -> None:
        """Warns of a damaged step; a writer also moves it into DAMAGED_DIR, so that it is saved anew."""
        if self.read_only:
            log.warning("Checkpoint at step %d in %s cannot be read (%s); it is passed over.",
                        step, self.directory, reason)
            return
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        target = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR, f"{step}-{stamp}")
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(self._step_dir(step), target)
        except OSError as e:
            raise WriteFailed(f"checkpoint at step {step} in {self.directory} is damaged ({reason}) and cannot be "
                              f"moved aside ({_os_reason(e)}); move or delete {self._step_dir(step)}") from None
        log.warning("Checkpoint at step %d cannot be read (%s); moved it to %s and going on without it.",
                    step, reason, target)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self._manager.best_step()

    def save(self, step: int, state: Any, meta: dict, metrics: Optional[dict]) -> None:
        """Starts an asynchronous, atomic save. `metrics` must hold `val_accuracy` for best tracking; None (an
        epoch that was not validated) saves a checkpoint that can never be the best. A failure of this or of
        an earlier save still in flight is a WriteFailed; the checkpoints saved before it stay intact."""
        try:
            # Checked here, in this thread: orbax creates the step's folder in a background thread, and where
            # that fails its other threads wait for it forever and the process never exits.
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".write_check_"):
                pass
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=None if metrics is None else {
                    k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
            )
        except Exception as e:  # noqa: BLE001 - orbax wraps OS errors in several types.
            raise self._write_failure(e) from None

    def _write_failure(self, error: BaseException) -> WriteFailed:
        return WriteFailed(f"could not save a checkpoint in {self.directory}: {_os_reason(error)}; the "
                           "checkpoints saved before it are intact and a rerun resumes from the latest")

    def _candidates(self, step: Union[int, str]) -> list[int]:
        """Steps to try, in order: for 'latest' newest first; for 'best' by validation accuracy (ties: the
        later step), then the steps without it, newest first."""
        steps = self.all_steps()
        if step == "latest":
            return steps[::-1]
        if step == "best":
            scored = {s: self._metric(s) for s in steps}
            with_metric = sorted((s for s in steps if scored[s] is not None), key=lambda s: (scored[s], s),
                                 reverse=True)
            return with_metric + [s for s in steps[::-1] if scored[s] is None]
        return [int(step)]

    def _metric(self, step: int) -> Optional[float]:
        try:
            metrics = self._manager.metrics(step)
        except Exception:  # noqa: BLE001 - unreadable metrics: treated as none.
            return None
        value = (metrics or {}).get(BEST_METRIC)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def restore(self, target: Any, step: Union[int, str] = "latest") -> Optional[tuple[Any, dict, int]]:
        """Restores `(state, meta, step)`; `step` is 'latest', 'best' or a number. None if none exist (or,
        for a writer, if every one was damaged and has been set aside: the run starts afresh).

        A damaged step is passed over for the next candidate (see `_candidates`) with a warning, and a
        writer moves it aside. A step saved by another model raises IncompatibleCheckpoint; a damaged step
        asked for by number raises a UserError naming the readable ones."""
        candidates = self._candidates(step)
        if not candidates:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        for candidate in candidates:
            mismatch, reason = self._compare_layout(candidate, abstract)
            if mismatch:
                raise IncompatibleCheckpoint(
                    f"the checkpoint at step {candidate} in {self.directory} was saved by another model or "
                    f"optimizer ({mismatch}); use another --workdir, or the config the run was trained with")
            if not reason:
                try:
                    restored = self._manager.restore(
                        candidate,
                        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                meta=ocp.args.JsonRestore()),
                    )
                    meta = dict(restored.meta)
                    int(meta["epoch"])
                    return restored.state, meta, candidate
                except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files.
                    reason = _first_line(e)
            if not isinstance(step, str):
                readable = [s for s in self.all_steps() if s != candidate]
                raise UserError(f"the checkpoint at step {candidate} in {self.directory} cannot be read "
                                f"({reason}); use --checkpoint best, latest or another step ({readable})")
            self._set_aside(candidate, reason)
            if not self.read_only:
                self._manager.reload()
        if self.read_only:
            raise UserError(f"no checkpoint in {self.directory} can be read (steps {candidates}); train again "
                            "with a new --workdir")
        log.warning("No checkpoint in %s could be read; training starts afresh.", self.directory)
        return None

    def _compare_layout(self, step: int, abstract: Any) -> tuple[str, str]:
        """('', '') if the step's saved state has the shapes of `abstract`; (mismatch, '') if another model
        saved it; ('', reason) if its metadata cannot be read."""
        try:
            saved = ocp.StandardCheckpointer().metadata(os.path.join(self._step_dir(step), "state")).item_metadata
        except Exception as e:  # noqa: BLE001
            return "", _first_line(e)
        saved_shapes = {_path_key(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(saved)
                        if hasattr(leaf, "shape")}
        wanted = {_path_key(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
        if not saved_shapes:
            return "", "its state metadata lists no arrays"
        for key in sorted(set(saved_shapes) | set(wanted), key=lambda k: (not k.startswith("params"), k)):
            if key not in saved_shapes:
                return f"it has no {key}", ""
            if key not in wanted:
                return f"it has {key}, which this config's state does not", ""
            if saved_shapes[key] != wanted[key]:
                return f"{key} has shape {saved_shapes[key]}, this config's {wanted[key]}", ""
        return "", ""

    def wait_until_finished(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_failure(e) from None

    def close(self) -> None:
        """Waits for saves in flight and releases orbax's threads; raises WriteFailed if a save failed, but
        releases them first, so the process can always exit."""
        failure = None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            failure = self._write_failure(e)
        try:
            self._manager.close()
        except Exception as e:  # noqa: BLE001
            failure = failure or self._write_failure(e)
        if self._view:
            shutil.rmtree(self._view, ignore_errors=True)
        if failure is not None:
            raise failure


def damage_of(step_dir: str) -> str:
    """Why a saved step cannot be used, from its small metadata files ('' if they look sound). Reading its
    arrays is left to the restore, which falls back if they are damaged too."""
    path = Path(step_dir)
    if not (path / "state").is_dir():
        return "no state folder"
    for name in ("_CHECKPOINT_METADATA", "metrics/metrics", "meta/metadata", "state/_METADATA"):
        file = path / name
        if not file.exists() and name in ("metrics/metrics", "_CHECKPOINT_METADATA"):
            continue  # Epochs saved without validation have no metrics.
        try:
            value = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            return f"{name}: {_first_line(e)}"
        if not isinstance(value, dict):
            return f"{name} is not a JSON object"
    return ""


def _step_numbers(directory: str) -> list[int]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _path_key(path: tuple) -> str:
    """A tree path as dotted names, the same for an object's attributes and a saved dict's keys."""
    parts = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
    return ".".join(parts)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    line = lines[0].split(" See full TensorStore details")[0] if lines else type(error).__name__
    return line[:300]


def _os_reason(error: BaseException) -> str:
    """The OS error at the root of `error` ("No space left on device: '/path'"), else its first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return f"{seen.strerror}" + (f": {seen.filename}" if seen.filename else "")
        seen = seen.__cause__ or seen.__context__
    code = re.search(r"\[os_error_code='(\d+)'\]", str(error))  # TensorStore's text for an OS error.
    if code:
        return os.strerror(int(code.group(1)))
    return _first_line(error)
