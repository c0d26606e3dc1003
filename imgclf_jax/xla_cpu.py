"""Three settings that make XLA:CPU train (and start) fast; measured in docs/performance.md.

1. `keep_freed_memory()`: glibc's malloc serves every request above 32 MiB with a fresh `mmap` and gives
   it back with `munmap` when freed. XLA:CPU allocates a step's activations and gradients (blocks of
   75-300 MB for the tutorial CNN at batch 32) on its worker threads at every step, so every step the
   kernel hands out about a gigabyte of new zeroed pages: ~55,000 page faults and a third of the step in
   the kernel. With one malloc arena, no mmap and no trimming, freed blocks stay mapped and are reused.
   Process-wide (on GPU machines too: the backend is not known yet) and glibc-only (elsewhere nothing
   changes); the price is a heap that keeps its peak size. It must run before JAX starts its CPU backend,
   because each thread binds to a malloc arena at its first allocation, so the entry points call it first
   thing (`cli.run`). Setting glibc's own MALLOC_ARENA_MAX / MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_, or
   IMGCLF_KEEP_FREED_MEMORY=0, leaves the allocator as it is.

2. `compiler_options()`: recent jaxlibs hand convolutions to YNNPACK, which runs this project's convolutions
   at 40-70 GFLOP/s and their weight gradients 10x slower than the forward pass; XLA's own (Eigen)
   convolutions run the same shapes at 100-135 GFLOP/s on 2 cores. The options keep YNNPACK for reductions
   and matrix products (dots: the dense layers, which it runs on both cores where XLA's own runs them on
   one), and its convolutions off (the fastest of the measured choices). Passed to the jitted
   train/eval/predict steps, only on CPU, and only where this jaxlib knows the option (checked once by
   compiling a tiny function).

3. `one_off_compiler_options()`: for a function compiled to run once, the parameter initialisation. Its
   code is mostly random-number generation (threefry and an inverse erf per parameter array), which LLVM
   spends many seconds optimising; unoptimised it compiles several times faster and runs in a fraction of a
   second still. The parameters differ from the optimised build's by float rounding (1-2 units in the last
   place).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
from typing import Any

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_USER_MALLOC_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
OPT_OUT = "IMGCLF_KEEP_FREED_MEMORY"

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_DOT"}
# For a jaxlib that takes one fusion type only: reductions, still keeping YNNPACK's convolutions out.
_CPU_OPTIONS_FALLBACK = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
_ONE_OFF_CPU_OPTIONS = {"xla_backend_optimization_level": 0}


def keep_freed_memory() -> bool:
    """Asks glibc to keep freed memory for reuse; True if it now does, False if left as it was."""
    if os.environ.get(OPT_OUT, "1") == "0" or any(name in os.environ for name in _USER_MALLOC_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
        return all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError) as e:  # No usable libc: keep the default allocator.
        log.debug("could not tune malloc: %s", e)
        return False


@functools.cache
def compiler_options() -> dict[str, Any]:
    """XLA compiler options for `jax.jit(..., compiler_options=...)` on the default backend ({} off CPU)."""
    return _cpu_options_if_accepted(_CPU_OPTIONS) or _cpu_options_if_accepted(_CPU_OPTIONS_FALLBACK)


@functools.cache
def one_off_compiler_options() -> dict[str, Any]:
    """Compiler options for a function that runs once, such as the parameter initialisation ({} off CPU)."""
    return _cpu_options_if_accepted(_ONE_OFF_CPU_OPTIONS)


def _cpu_options_if_accepted(options: dict[str, Any]) -> dict[str, Any]:
    import jax  # Not at the top: keep_freed_memory must be importable before JAX is.
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(jnp.sum, compiler_options=options).lower(jnp.zeros(2)).compile()
    except Exception as e:  # An XLA without the option (older or newer jaxlib): its defaults it is.
        log.debug("XLA:CPU options %s not supported here: %s", options, e)
        return {}
    return dict(options)
