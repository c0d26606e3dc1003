"""Native f32 convolution kernels for x86-64 CPUs (AVX2 + FMA, or AVX-512), compiled on first use and called
through the XLA FFI.

The C++ source sits beside this file (`cpu_conv.cc`; why and how in its header). It is compiled once per
machine with the system C++ compiler, for the widest vectors the CPU has (`variant`: 16 floats with AVX-512,
8 with AVX2), into `user_cache.cache_dir()` and loaded from there afterwards (about 4 s the first time).
Where that cannot happen — no compiler, another CPU architecture, a CPU without AVX2/FMA, a jaxlib without
the FFI — `available()` says False and the models keep XLA's own convolutions, so nothing depends on the
kernels but speed.
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

from imgclf_jax import user_cache

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_conv.cc")
_FLAGS = ("-O3", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-pthread")
# The builds of the source: name -> (their own compiler flags, the CPU flags they need). IMGCLF_LANES is the
# floats per vector of the matrix tiles. "avx2_lanes16" is the AVX-512 build's code compiled for AVX2: it runs
# the 16-lane blocking on any AVX2 CPU, so that its logic is tested on every x86-64 host
# (tests/test_conv.py), while "avx512" itself runs only where the CPU has AVX-512.
VARIANTS = {
    "avx2": (("-mavx2", "-mfma", "-DIMGCLF_LANES=8"), ("avx2", "fma")),
    "avx512": (("-mavx512f", "-mavx2", "-mfma", "-DIMGCLF_LANES=16"), ("avx2", "fma", "avx512f")),
    "avx2_lanes16": (("-mavx2", "-mfma", "-DIMGCLF_LANES=16", "-Wno-psabi"), ("avx2", "fma")),
}
# Names one of VARIANTS to use instead of the best this CPU runs (benchmarks and tests compare them).
VARIANT_ENV = "IMGCLF_CONV_VARIANT"
# XLA FFI target name -> the handler's symbol in the library.
_TARGETS = {
    "imgclf_conv_forward": "ImgclfConvForward",
    "imgclf_conv_weight_grad": "ImgclfConvWeightGrad",
    "imgclf_conv_relu_pool": "ImgclfConvReluPool",
    "imgclf_conv_pooled_forward": "ImgclfConvPooledForward",
    "imgclf_conv_pooled_weight_grad": "ImgclfConvPooledWeightGrad",
}
Padding = tuple[tuple[int, int], tuple[int, int]]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the operating system reports them, lower case (/proc/cpuinfo's "flags" on
    Linux, sysctl's features on macOS); empty where it cannot tell."""
    try:
        if platform.system() == "Linux":
            with open("/proc/cpuinfo") as f:
                return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
        features = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                                  capture_output=True, text=True, timeout=10).stdout.lower().split()
        return frozenset(f.replace(".", "_") for f in features)
    except (OSError, subprocess.SubprocessError):
        return frozenset()


def variant() -> Optional[str]:
    """The build of the kernels for this CPU: `IMGCLF_CONV_VARIANT` where set, else "avx512" where the CPU has
    AVX-512, "avx2" where it has AVX2 and FMA; None where it has neither or the named build needs what it
    lacks."""
    forced = os.environ.get(VARIANT_ENV)
    if forced:
        if forced not in VARIANTS:
            log.warning("%s=%s is not one of %s: the CPU's own build is used", VARIANT_ENV, forced, ", ".join(VARIANTS))
        else:
            return forced if set(VARIANTS[forced][1]) <= cpu_flags() else None
    for name in ("avx512", "avx2"):
        if set(VARIANTS[name][1]) <= cpu_flags():
            return name
    return None


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _compiler_version(compiler: str) -> str:
    """The first line of `compiler --version` ('' if it does not say)."""
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (result.stdout.strip().splitlines() or [""])[0]


def _build(compiler: str, include_dir: str, name: str) -> Path:
    """Compiles the kernels' build `name` (one of VARIANTS) into the cache unless already there. The cache key
    covers what the binary depends on: the source, the flags, the compiler and its version, the jaxlib whose
    FFI headers it is built against, and the machine's architecture."""
    import jaxlib

    flags = (*_FLAGS, *VARIANTS[name][0])
    parts = (SOURCE.read_text(), " ".join(flags), compiler, _compiler_version(compiler), jaxlib.__version__,
             include_dir, platform.machine())
    key = hashlib.sha1(b"\0".join(part.encode() for part in parts)).hexdigest()[:16]
    target = Path(user_cache.cache_dir()) / f"cpu_conv-{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *flags, f"-I{include_dir}", str(SOURCE), "-o", str(built)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, target)  # Atomic: a concurrent build of the same source writes the same file.
    return target


# The loaded kernels and their build's name, once registered: XLA's handler registry is per process and takes
# one library per name.
_registered: Optional[ctypes.CDLL] = None
_registered_build: Optional[str] = None


# Set to 0 to keep XLA's own convolutions (the kernels are then never compiled or loaded).
ENABLE_ENV = "IMGCLF_NATIVE_KERNELS"


@functools.cache
def available() -> bool:
    """True once the kernels are compiled, loaded and registered with XLA for the CPU (at most once a process).

    The one way in to them: the CPU's flags are read from the operating system, and the build for them
    chosen (`variant`), before the library, whose static initialisers are AVX2 or AVX-512 code, is loaded."""
    global _registered, _registered_build
    if _registered is not None:
        return True
    if os.environ.get(ENABLE_ENV, "1") == "0":
        log.info("%s=0: XLA's own CPU convolutions are used", ENABLE_ENV)
        return False
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() not in ("Linux", "Darwin"):
        return False
    name = variant()
    if name is None:
        log.info("this CPU lacks AVX2/FMA (or what %s names): XLA's own CPU convolutions are used", VARIANT_ENV)
        return False
    compiler = _compiler()
    if compiler is None or not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
        log.info("no C++ compiler or XLA FFI here: XLA's own CPU convolutions are used")
        return False
    # Where the AVX-512 build cannot be compiled (an older compiler) or loaded, the AVX2 one still beats XLA's.
    for build in [name] + (["avx2"] if name == "avx512" else []):
        try:
            library = ctypes.cdll.LoadLibrary(str(_build(compiler, jax.ffi.include_dir(), build)))
            if not library.ImgclfConvCpuSupported():
                log.info("this CPU lacks what the %s kernels need", build)
                continue
            for target, symbol in _TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError, AttributeError) as e:
            log.warning("native CPU convolutions (%s build) unavailable: %s", build, e)
            continue
        _registered, _registered_build = library, build
        log.info("native CPU convolutions: the %s build", build)
        return True
    log.warning("native CPU convolutions unavailable: XLA's own are used instead")
    return False


def loaded_build() -> Optional[str]:
    """The name of the kernels' build this process runs (one of VARIANTS), or None before or without them."""
    return _registered_build if available() else None


# Below this many output pixels per image the kernels lost to XLA's convolutions inside a whole training step
# (default ResNet at 80 px, batch 32, 2-core EPYC: step 234 ms using them only for outputs of >= 1,000 pixels,
# 241-246 ms with XLA's everywhere, 300-345 ms with them everywhere; docs/performance.md).
MIN_OUTPUT_PIXELS = 1024
# Convolutions the kernels compute by Winograd's algorithm (3x3, stride 1, >= 8 input channels; cpu_conv.cc's
# UseWinograd) win down to smaller outputs: the same ResNet step ran 5-13% faster at 48-80 px with 256 here
# than with 1,024, and slower again with 0 (docs/performance.md); in the full training loop, with
# tf.data and augmentation competing for the cores, no slower.
MIN_WINOGRAD_OUTPUT_PIXELS = 256
WINOGRAD_MIN_CHANNELS = 8


def output_hw(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
               padding: Padding) -> tuple[int, int]:
    ho, wo = ((size + lo + hi - k) // s + 1
              for size, (lo, hi), k, s in zip(x_shape[1:3], padding, kernel_shape[:2], strides))
    return ho, wo


def worth_it(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
             padding: Padding) -> bool:
    """Whether to use the kernels for this convolution: outputs of at least MIN_OUTPUT_PIXELS pixels, or
    MIN_WINOGRAD_OUTPUT_PIXELS for the convolutions they compute by Winograd's algorithm."""
    ho, wo = output_hw(x_shape, kernel_shape, strides, padding)
    winograd = (tuple(kernel_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
                and kernel_shape[2] >= WINOGRAD_MIN_CHANNELS)
    return ho * wo >= (min(MIN_OUTPUT_PIXELS, MIN_WINOGRAD_OUTPUT_PIXELS) if winograd else MIN_OUTPUT_PIXELS)


def _attributes(strides: Sequence[int], padding: Padding, full_hw: Optional[Sequence[int]] = None) -> dict:
    attributes = dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
                      pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]))
    if full_hw is not None:  # The unpooled size of a pooled array.
        attributes.update(full_h=np.int64(full_hw[0]), full_w=np.int64(full_hw[1]))
    return attributes


def _call(target: str, results, *args, **attributes):
    return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args, **attributes)


def forward(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding) -> jax.Array:
    """NHWC x HWIO convolution (f32), as `lax.conv_general_dilated` with explicit padding computes it."""
    ho, wo = output_hw(x.shape, kernel.shape, strides, padding)
    return _call("imgclf_conv_forward", jax.ShapeDtypeStruct((x.shape[0], ho, wo, kernel.shape[3]), x.dtype),
                 x, kernel, **_attributes(strides, padding))


def weight_gradient(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], strides: Sequence[int],
                    padding: Padding) -> jax.Array:
    """d(loss)/d(kernel) of `forward` from its input x and output gradient dy."""
    return _call("imgclf_conv_weight_grad", jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype), x, dy,
                 **_attributes(strides, padding))


# A convolution followed by bias, ReLU and 2x2 max-pooling, fused: its full-size output is never written. The
# pool's `choice` (uint8, the pooled shape) says which of each window's four positions (row-major) held the
# maximum, 4 where it was not positive; the gradients take the pooled output gradient with it.


def relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, strides: Sequence[int],
              padding: Padding) -> tuple[jax.Array, jax.Array]:
    """(max_pool_2x2(relu(conv(x, kernel) + bias)), choice); the convolution's output must be at least 2x2."""
    full_hw = output_hw(x.shape, kernel.shape, strides, padding)
    pooled = (x.shape[0], full_hw[0] // 2, full_hw[1] // 2, kernel.shape[3])
    results = (jax.ShapeDtypeStruct(pooled, x.dtype), jax.ShapeDtypeStruct(pooled, np.uint8))
    return _call("imgclf_conv_relu_pool", results, x, kernel, bias, **_attributes(strides, padding, full_hw))


def pooled_forward(dy: jax.Array, choice: jax.Array, kernel: jax.Array, full_hw: Sequence[int],
                   padding: Padding) -> jax.Array:
    """`forward` (stride 1) of the full-size gradient (full_hw) that a pooled gradient and its choices stand for."""
    x_shape = (dy.shape[0], *full_hw, dy.shape[3])
    ho, wo = output_hw(x_shape, kernel.shape, (1, 1), padding)
    return _call("imgclf_conv_pooled_forward", jax.ShapeDtypeStruct((dy.shape[0], ho, wo, kernel.shape[3]), dy.dtype),
                 dy, choice, kernel, **_attributes((1, 1), padding, full_hw))


def pooled_weight_gradient(x: jax.Array, dy: jax.Array, choice: jax.Array, kernel_shape: Sequence[int],
                           strides: Sequence[int], padding: Padding) -> jax.Array:
    """d(loss)/d(kernel) of `relu_pool` from its input x, pooled output gradient dy and choices."""
    full_hw = output_hw(x.shape, kernel_shape, strides, padding)
    return _call("imgclf_conv_pooled_weight_grad", jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype), x, dy,
                 choice, **_attributes(strides, padding, full_hw))
