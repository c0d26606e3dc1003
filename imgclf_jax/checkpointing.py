"""Orbax checkpoints of the TrainState: saved after epochs that may be the best, the last, and others once
`checkpoint_every_minutes` have passed (imgclf_jax.train), keeping the latest few and the best by validation
accuracy. Saves are atomic (orbax writes to a temporary folder and renames), and restoring the latest
checkpoint falls back to an older one, with a warning, if the newest cannot be read."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

log = logging.getLogger(__name__)

BEST_METRIC = "val_accuracy"


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the two items we save: `state` and `meta` (JSON)."""

    def __init__(self, directory: str, max_to_keep: int = 2, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy([
                checkpoint_managers.LatestN(n=max_to_keep),
                # Checkpoints saved without metrics (epochs not validated) are kept only while among the latest.
                checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                          keep_checkpoints_without_metrics=False),
            ]),
            best_fn=lambda m: m[BEST_METRIC],
            best_mode="max",
            enable_async_checkpointing=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self._manager.best_step()

    def save(self, step: int, state: Any, meta: dict, metrics: Optional[dict]) -> None:
        """Starts an asynchronous, atomic save. `metrics` must hold `val_accuracy` for best tracking; None (an
        epoch that was not validated) saves a checkpoint that can never be the best."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=None if metrics is None else {
                k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        )

    def restore(self, target: Any, step: Union[int, str] = "latest") -> Optional[tuple[Any, dict, int]]:
        """Restores `(state, meta, step)`; `step` is 'latest', 'best' or a number. None if none exist.

        For 'latest', a checkpoint that cannot be read is skipped (with a warning) for the one before.
        """
        steps = self.all_steps()
        if not steps:
            return None
        if step == "latest":
            candidates = sorted(steps, reverse=True)
        elif step == "best":
            candidates = [self.best_step()]
        else:
            candidates = [int(step)]
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        for i, candidate in enumerate(candidates):
            try:
                restored = self._manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
                return restored.state, dict(restored.meta), candidate
            except Exception as e:  # orbax/tensorstore raise many types for damaged files.
                if step != "latest" or i == len(candidates) - 1:
                    raise
                log.warning("Checkpoint at step %d cannot be read (%s); falling back to the previous one.",
                            candidate, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
