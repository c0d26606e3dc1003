"""Data parallelism over every device of every process, with `jax.sharding` and `jax.distributed`.

One mesh axis, `data`: each global batch is split across all devices (of all processes) and the parameters,
batch-norm statistics and optimizer state are replicated. The jitted steps see global arrays, so XLA inserts
the gradient and batch-norm reductions itself, and the maths is that of one device with the whole batch.
Each process feeds only the rows of each global batch that its own devices hold (`process_rows`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from imgclf_jax.errors import UserError

log = logging.getLogger(__name__)

DATA_AXIS = "data"


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto_detect: bool = False) -> None:
    """Joins a multi-process run, if asked to: explicitly (the three values) or, with `auto_detect`, from
    the cluster's environment (SLURM, Open MPI, Kubernetes, TPU pods: what `jax.distributed` detects).

    Must run before anything touches a JAX device. On CPU, processes talk through gloo collectives.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if all(v is None for v in explicit) and not auto_detect:
        return
    if not auto_detect and any(v is None for v in explicit):
        raise UserError("a multi-process run needs --coordinator_address HOST:PORT, --num_processes N and "
                        "--process_id I together (or --distributed to detect them from the cluster)")
    if num_processes is not None and num_processes < 1:
        raise UserError(f"num_processes must be at least 1 (got {num_processes})")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"process_id must be in 0..{num_processes - 1} (got {process_id})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not join the multi-process run: {first_line}") from None


def is_main_process() -> bool:
    """Process 0 writes logs, metrics, plots and reports; checkpoints are saved by all, through orbax."""
    return jax.process_index() == 0


def describe() -> str:
    """'N CPU device(s) in P process(es)' plus this process's index when there are several."""
    devices = jax.devices()
    text = (f"{len(devices)} {devices[0].platform.upper()} device(s) in {jax.process_count()} process(es), "
            f"{jax.local_device_count()} local")
    if jax.process_count() > 1:
        text += f"; this is process {jax.process_index()}"
    return text


def create_mesh() -> Mesh:
    """A one-axis mesh over all devices of all processes."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(name: str, batch_size: int, devices: int) -> None:
    """The global batch must split evenly over the devices."""
    if batch_size % devices:
        raise UserError(
            f"{name} {batch_size} does not split evenly over {devices} devices; use a multiple of {devices}"
        )


def process_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """The [start, stop) rows of each global batch that this process's devices hold."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    bounds = sorted((s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
                    for s in index_map.values())
    for (_, stop), (start, _) in zip(bounds, bounds[1:]):
        if start != stop:  # jax.make_mesh orders devices by process; anything else is a bug here.
            raise RuntimeError(f"this process's devices hold non-contiguous batch rows: {bounds}")
    return bounds[0][0], bounds[-1][1]


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles this process's rows of a batch (from `process_rows`) into global, sharded arrays."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def value_of_main_process(value: int) -> int:
    """Process 0's `value` on every process, so that a choice made from local measurements (the epochs that
    fit a time budget) is the same everywhere."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (the same on every process) on every device."""
    return jax.device_put(tree, replicated(mesh))
