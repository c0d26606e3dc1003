"""Native f32 convolution kernels for x86-64 CPUs (AVX2 + FMA), compiled on first use and called through the XLA FFI.

The C++ source sits beside this file (`cpu_conv.cc`; why and how in its header). It is compiled once per
machine with the system C++ compiler into `folders.cache_dir()` and loaded from there afterwards (about 4 s the
first time). Where that cannot happen — no compiler, another CPU architecture, a CPU without AVX2/FMA, a
jaxlib without the FFI — `available()` says False and the models keep XLA's own convolutions, so nothing
depends on the kernels but speed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_conv.cc")
_FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-pthread")
_FORWARD, _WEIGHT_GRAD = "imgclf_conv_forward", "imgclf_conv_weight_grad"
Padding = tuple[tuple[int, int], tuple[int, int]]


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str, include_dir: str) -> Path:
    """Compiles the kernels into the cache (keyed by source, flags, compiler and jaxlib) unless already there."""
    from imgclf_jax import folders

    key = hashlib.sha1(
        b"\0".join(s.encode() for s in (SOURCE.read_text(), " ".join(_FLAGS), compiler, jax.__version__))
    ).hexdigest()[:16]
    target = Path(folders.cache_dir()) / f"cpu_conv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *_FLAGS, f"-I{include_dir}", str(SOURCE), "-o", str(built)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, target)  # Atomic: a concurrent build of the same source writes the same file.
    return target


# The loaded kernels, once registered: XLA's handler registry is per process and takes one library per name.
_registered: Optional[ctypes.CDLL] = None


@functools.cache
def available() -> bool:
    """True once the kernels are compiled, loaded and registered with XLA for the CPU (at most once a process)."""
    global _registered
    if _registered is not None:
        return True
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() not in ("Linux", "Darwin"):
        return False
    compiler = _compiler()
    if compiler is None or not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
        log.info("no C++ compiler or XLA FFI here: XLA's own CPU convolutions are used")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler, jax.ffi.include_dir())))
        if not library.ImgclfConvCpuSupported():
            log.info("this CPU lacks AVX2/FMA: XLA's own CPU convolutions are used")
            return False
        jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.ImgclfConvForward), platform="cpu")
        jax.ffi.register_ffi_target(_WEIGHT_GRAD, jax.ffi.pycapsule(library.ImgclfConvWeightGrad),
                                    platform="cpu")
        _registered = library
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError, AttributeError) as e:
        log.warning("native CPU convolutions unavailable, XLA's are used instead: %s", e)
        return False
    return True


# Below this many output pixels per image the kernels lost to XLA's convolutions inside a whole training step
# (default ResNet at 80 px, batch 32, 2-core EPYC: step 234 ms using them only for outputs of >= 1,000 pixels,
# 241-246 ms with XLA's everywhere, 300-345 ms with them everywhere; docs/performance.md, session 9).
MIN_OUTPUT_PIXELS = 1024


def _output_hw(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
               padding: Padding) -> tuple[int, int]:
    ho, wo = ((size + lo + hi - k) // s + 1
              for size, (lo, hi), k, s in zip(x_shape[1:3], padding, kernel_shape[:2], strides))
    return ho, wo


def worth_it(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
             padding: Padding) -> bool:
    """Whether to use the kernels for this convolution: outputs of at least MIN_OUTPUT_PIXELS pixels."""
    ho, wo = _output_hw(x_shape, kernel_shape, strides, padding)
    return ho * wo >= MIN_OUTPUT_PIXELS


def _attributes(strides: Sequence[int], padding: Padding) -> dict:
    return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
                pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]))


def forward(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding) -> jax.Array:
    """NHWC x HWIO convolution (f32), as `lax.conv_general_dilated` with explicit padding computes it."""
    ho, wo = _output_hw(x.shape, kernel.shape, strides, padding)
    call = jax.ffi.ffi_call(_FORWARD, jax.ShapeDtypeStruct((x.shape[0], ho, wo, kernel.shape[3]), x.dtype),
                            vmap_method="sequential")
    return call(x, kernel, **_attributes(strides, padding))


def weight_gradient(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides: Sequence[int],
                    padding: Padding) -> jax.Array:
    """d(loss)/d(kernel) of `forward` from its input x and output gradient dy."""
    call = jax.ffi.ffi_call(_WEIGHT_GRAD, jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype),
                            vmap_method="sequential")
    return call(x, dy, **_attributes(strides, padding))
