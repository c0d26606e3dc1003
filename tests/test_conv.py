"""Both custom convolutions (native kernels, matmul weight gradient) equal XLA's convolution and its jax.grad,
up to float rounding; and the native kernels fall back cleanly where they cannot build."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import logging
import os
import platform
import shutil
import subprocess
import sys

from imgclf_jax import conv, cpu_conv, models, pooling

CASES = [  # (input shape, kernel shape, strides, padding)
    ((2, 9, 9, 3), (3, 3, 3, 5), (1, 1), "SAME"),
    ((3, 8, 7, 4), (3, 3, 4, 6), (2, 2), "SAME"),
    ((2, 10, 10, 6), (1, 1, 6, 4), (2, 2), "SAME"),
    ((2, 7, 9, 2), (3, 3, 2, 3), (1, 2), "VALID"),
    ((1, 6, 6, 2), (5, 5, 2, 2), (1, 1), ((2, 1), (0, 3))),
]
NATIVE_CASES = [  # Shapes that exercise the native kernels' blocking; the matmul gradient is covered above.
    # Output channels past one 16-wide block with a ragged tail; rows not a multiple of the 6-pixel block.
    ((2, 11, 13, 7), (3, 3, 7, 27), (1, 1), "SAME"),
    # One image (the kernels then split its rows over threads); padding wider than the kernel reaches.
    ((1, 9, 8, 3), (3, 3, 3, 16), (1, 1), ((3, 0), (2, 2))),
    # A stride that leaves input rows unread.
    ((2, 12, 12, 8), (3, 3, 8, 16), (2, 2), "VALID"),
    # 3x3 stride 1 with >= 8 input channels (Winograd F(2x2) below 12 output pixels a side, F(4x4) from 12):
    # output sides that leave part of the edge tiles unused, ragged channel counts, more than one block of
    # tiles per image, lopsided padding, VALID.
    ((2, 11, 13, 9), (3, 3, 9, 27), (1, 1), "SAME"),
    ((2, 30, 29, 8), (3, 3, 8, 16), (1, 1), "SAME"),
    ((1, 10, 9, 12), (3, 3, 12, 20), (1, 1), ((2, 0), (0, 1))),
    ((1, 14, 17, 12), (3, 3, 12, 20), (1, 1), ((2, 0), (0, 1))),
    ((3, 8, 7, 16), (3, 3, 16, 8), (1, 1), "VALID"),
    ((2, 15, 14, 16), (3, 3, 16, 8), (1, 1), "VALID"),
]
NATIVE_EXPECTED = platform.machine().lower() in ("x86_64", "amd64") and any(
    shutil.which(c) for c in ("c++", "g++", "clang++"))
needs_native = pytest.mark.skipif(not NATIVE_EXPECTED, reason="needs x86-64 and a C++ compiler")
IMPLS = ["matmul_grad", pytest.param("native", marks=needs_native)]
IMPL_CASES = [(*case, "matmul_grad") for case in CASES] + [
    pytest.param(*case, "native", marks=needs_native) for case in CASES] + [
    pytest.param(*case, "native", marks=needs_native, id=f"native-blocking{i}") for i, case in enumerate(NATIVE_CASES)]


def _largest(values) -> float:
    """The largest magnitude in `values`, by numpy: an eager jnp reduction compiles anew for every shape."""
    return float(np.max(np.abs(np.asarray(values))))


def _inputs(x_shape, k_shape):
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    return jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)


@pytest.fixture(autouse=True)
def native_kernels_for_every_size(monkeypatch):
    """The test shapes are small; in training, outputs this small go to XLA's convolutions instead."""
    monkeypatch.setattr(cpu_conv, "MIN_OUTPUT_PIXELS", 0)


@pytest.mark.slow
@pytest.mark.parametrize("x_shape, k_shape, strides, padding, impl", IMPL_CASES)
def test_forward_and_gradients_match_lax(x_shape, k_shape, strides, padding, impl):
    x, kernel = _inputs(x_shape, k_shape)
    dn = ("NHWC", "HWIO", "NHWC")

    def reference(x, kernel):
        return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dn)

    def ours(x, kernel):
        return conv.conv_general_dilated(x, kernel, strides, padding, impl=impl,
                                         dimension_numbers=lax.conv_dimension_numbers(x.shape, kernel.shape, dn))

    # Winograd's F(4x4, 3x3) rounds to about 2e-6 of the outputs' scale (its transforms multiply by up to 8).
    want_y = jax.jit(reference)(x, kernel)  # Jitted: one compilation, not one per op.
    np.testing.assert_allclose(jax.jit(ours)(x, kernel), want_y, rtol=1e-5, atol=1e-5 * _largest(want_y))
    weights = jax.random.normal(jax.random.key(3), want_y.shape)

    def loss(f):
        return lambda x, kernel: jnp.sum(jnp.tanh(f(x, kernel)) * weights)

    want = jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(x, kernel)
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, kernel)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * _largest(w))


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_flax_conv_with_the_custom_op_matches_the_default(impl):
    x = jax.random.normal(jax.random.key(1), (4, 12, 12, 3))
    default = nn.Conv(8, (3, 3), strides=2, padding="SAME")
    custom = nn.Conv(8, (3, 3), strides=2, padding="SAME",
                     conv_general_dilated=functools.partial(conv.conv_general_dilated, impl=impl))
    params = default.init(jax.random.key(2), x)

    def grads(module):
        return jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))(params)

    for a, b in zip(jax.tree_util.tree_leaves(grads(default)), jax.tree_util.tree_leaves(grads(custom))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_unsupported_cases_fall_back_to_lax():
    x, kernel = _inputs((1, 8, 8, 4), (3, 3, 2, 4))  # Two feature groups.
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    got = conv.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
    want = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert conv.explicit_padding("CIRCULAR", (8, 8), (3, 3), (1, 1)) is None
    assert conv.explicit_padding("SAME", (8, 7), (3, 3), (2, 2)) == ((0, 1), (1, 1))


@needs_native
def test_native_kernels_build_here_and_auto_picks_them():
    assert cpu_conv.available()
    assert models.resolve_conv_impl("auto") == "native"
    assert cpu_conv.loaded_build() == cpu_conv.variant()  # The build for this CPU.
    assert f"cpu_conv-{cpu_conv.variant()}-" in cpu_conv._registered._name


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernels are x86-64 only")
def test_an_avx512_build_that_cannot_be_built_leaves_the_avx2_build_in_charge(monkeypatch):
    built, registered = [], []

    def build(compiler, include_dir, name):
        built.append(name)
        if name == "avx512":
            raise RuntimeError("c++: error: unrecognized command-line option '-mavx512f'")
        return f"/cache/cpu_conv-{name}.so"

    class Library:  # What ctypes loads: the support check, and one handler symbol per target.
        def __init__(self, path):
            self._name = path

        def ImgclfConvCpuSupported(self):
            return 1

        def __getattr__(self, symbol):
            return symbol

    monkeypatch.setattr(cpu_conv, "_build", build)
    monkeypatch.setattr(cpu_conv.ctypes.cdll, "LoadLibrary", Library)
    monkeypatch.setattr(cpu_conv.jax.ffi, "pycapsule", lambda handler: handler)
    monkeypatch.setattr(cpu_conv.jax.ffi, "register_ffi_target", lambda target, *_, **__: registered.append(target))
    monkeypatch.setattr(cpu_conv, "variant", lambda: "avx512")
    monkeypatch.setattr(cpu_conv, "_compiler", lambda: "c++")
    monkeypatch.setattr(cpu_conv, "_registered", None)  # As in a process that has not loaded them yet.
    monkeypatch.setattr(cpu_conv, "_registered_build", None)
    monkeypatch.delenv(cpu_conv.ENABLE_ENV, raising=False)
    cpu_conv.available.cache_clear()
    try:
        assert cpu_conv.available()
        assert built == ["avx512", "avx2"]
        assert registered == list(cpu_conv._TARGETS)
        assert cpu_conv.loaded_build() == "avx2"
    finally:
        cpu_conv.available.cache_clear()


def test_native_kernels_that_fail_to_build_leave_xla_in_charge(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_conv, "_FLAGS", cpu_conv._FLAGS + ("-DIMGCLF_TEST_BROKEN", "-no-such-flag"))
    monkeypatch.setattr(cpu_conv, "_registered", None)  # As in a process that has not loaded them yet.
    cpu_conv.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert not cpu_conv.available()
        assert models.resolve_conv_impl("auto") != "native"
        with pytest.raises(models.UserError, match="conv_impl='native' needs to run on"):
            models.resolve_conv_impl("native")
    finally:
        cpu_conv.available.cache_clear()
    if NATIVE_EXPECTED:
        assert "native CPU convolutions unavailable" in caplog.text


@needs_native
def test_native_leaves_small_outputs_to_xla(monkeypatch):
    monkeypatch.setattr(cpu_conv, "MIN_OUTPUT_PIXELS", 64)
    dn = lax.conv_dimension_numbers((2, 8, 8, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"))

    def uses_kernels(size):
        x, kernel = _inputs((2, size, size, 3), (3, 3, 3, 4))
        jaxpr = jax.make_jaxpr(lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn,
                                                                      impl="native"))(x, kernel)
        return "ffi_call" in str(jaxpr)

    assert uses_kernels(8) and not uses_kernels(7)  # 64 and 49 output pixels.


def test_winograd_convolutions_use_the_kernels_down_to_smaller_outputs(monkeypatch):
    monkeypatch.setattr(cpu_conv, "MIN_OUTPUT_PIXELS", 1024)
    monkeypatch.setattr(cpu_conv, "MIN_WINOGRAD_OUTPUT_PIXELS", 256)
    same = ((1, 1), (1, 1))
    assert cpu_conv.worth_it((2, 16, 16, 8), (3, 3, 8, 4), (1, 1), same)  # 256 pixels, Winograd.
    assert not cpu_conv.worth_it((2, 15, 15, 8), (3, 3, 8, 4), (1, 1), same)  # 225 pixels.
    assert not cpu_conv.worth_it((2, 16, 16, 7), (3, 3, 7, 4), (1, 1), same)  # Too few channels for Winograd.
    assert not cpu_conv.worth_it((2, 32, 32, 8), (3, 3, 8, 4), (2, 2), ((0, 1), (0, 1)))  # Strided: 256 pixels.
    assert not cpu_conv.worth_it((2, 16, 16, 8), (1, 1, 8, 4), (1, 1), ((0, 0), (0, 0)))  # 1x1.
    assert cpu_conv.worth_it((2, 32, 32, 3), (3, 3, 3, 4), (1, 1), same)  # 1,024 pixels, direct.


@pytest.mark.slow
@needs_native
def test_native_weight_gradient_is_the_same_every_time():
    # The threads share the work as they happen to run; the per-chunk sums are added in a fixed order.
    x, kernel = _inputs((8, 24, 24, 8), (3, 3, 8, 16))
    dy = jax.random.normal(jax.random.key(5), (8, 24, 24, 16))
    grad = jax.jit(lambda x, dy: cpu_conv.weight_gradient(x, dy, kernel.shape, (1, 1), ((1, 1), (1, 1))))
    first = np.asarray(grad(x, dy))
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(grad(x, dy)), first)


def _unfused_block(x, kernel, bias):
    """What flax's nn.Conv (SAME, stride 1), nn.relu and pooling.max_pool compute."""
    y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    return pooling.max_pool(jax.nn.relu(y), (2, 2))


BLOCK_CASES = [  # (input shape, output channels)
    ((2, 9, 11, 3), 16),   # 3 input channels (direct kernels); odd sides: the pool drops a row and a column.
    ((1, 10, 8, 12), 20),  # One image; >= 8 input channels (Winograd); output channels past one 16-wide block.
    ((3, 13, 12, 8), 5),   # Fewer output channels than one vector.
    ((2, 26, 14, 8), 12),  # Winograd F(4x4): each tile holds four pooling windows; the last tile row holds one row.
    ((1, 25, 13, 9), 20),  # F(4x4) with odd sides: the pool drops the last row and column of the edge tiles.
]


@pytest.mark.slow
@needs_native
@pytest.mark.parametrize("x_shape, features", BLOCK_CASES)
def test_fused_conv_relu_pool_matches_the_unfused_layers(x_shape, features):
    x, kernel = _inputs(x_shape, (3, 3, x_shape[-1], features))
    bias = 0.3 * jax.random.normal(jax.random.key(7), (features,))
    fused = jax.jit(lambda x, k, b: conv.conv_relu_pool(x, k, b, "native"))
    assert "imgclf_conv_relu_pool" in str(jax.make_jaxpr(fused)(x, kernel, bias))
    want = jax.jit(_unfused_block)(x, kernel, bias)
    np.testing.assert_allclose(fused(x, kernel, bias), want, rtol=1e-5, atol=1e-5 * _largest(want))
    weights = jax.random.normal(jax.random.key(3), want.shape)

    def loss(f):
        return lambda *args: jnp.sum(jnp.tanh(f(*args)) * weights)

    expected = jax.jit(jax.grad(loss(_unfused_block), argnums=(0, 1, 2)))(x, kernel, bias)
    got = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(x, kernel, bias)
    for g, w in zip(got, expected):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * _largest(w))


@pytest.mark.slow
@needs_native
@pytest.mark.parametrize("side, channels", [(8, 3), (24, 8)])  # The direct kernels, and Winograd F(4x4).
def test_fused_block_sends_tied_maxima_to_the_first_position_as_max_pool_does(side, channels):
    # A blank image: every output equals the bias, so every window's four values tie; the channel with a
    # negative bias has no gradient at all (ReLU is off).
    x = jnp.zeros((2, side, side, channels))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, 16))
    bias = jnp.where(jnp.arange(16) == 5, -1.0, 0.5)
    weights = jax.random.normal(jax.random.key(2), (2, side // 2, side // 2, 16))

    def loss(f):
        return lambda x, b: jnp.sum(f(x, kernel, b) * weights)

    got = jax.grad(loss(lambda *a: conv.conv_relu_pool(*a, "native")), argnums=(0, 1))(x, bias)
    want = jax.grad(loss(_unfused_block), argnums=(0, 1))(x, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * _largest(w))
    assert float(got[1][5]) == 0.0


def test_conv_relu_pool_without_native_kernels_is_the_unfused_layers():
    x, kernel = _inputs((2, 8, 8, 3), (3, 3, 3, 4))
    bias = jnp.arange(4.0) - 1.5
    for impl in ("xla", "matmul_grad"):
        np.testing.assert_allclose(conv.conv_relu_pool(x, kernel, bias, impl), _unfused_block(x, kernel, bias),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cause", ["switched off", "no AVX2"])
def test_the_kernels_are_never_loaded_when_switched_off_or_on_a_cpu_without_avx2(monkeypatch, cause):
    loads = []
    monkeypatch.setattr(cpu_conv.ctypes.cdll, "LoadLibrary", lambda path: loads.append(path))
    monkeypatch.setattr(cpu_conv, "_registered", None)  # As in a process that has not loaded them yet.
    if cause == "switched off":
        monkeypatch.setenv(cpu_conv.ENABLE_ENV, "0")
    else:
        monkeypatch.setattr(cpu_conv, "cpu_flags", lambda: frozenset({"sse2", "avx"}))
    cpu_conv.available.cache_clear()
    try:
        assert not cpu_conv.available()
        assert models.resolve_conv_impl("auto") != "native"
    finally:
        cpu_conv.available.cache_clear()
    assert loads == []


def test_the_cpu_check_reads_this_machines_flags():
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("reads /proc/cpuinfo of an x86-64 Linux machine")
    flags = open("/proc/cpuinfo").read()
    assert ("avx2" in cpu_conv.cpu_flags()) == (" avx2" in flags)
    expected = "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags and " fma" in flags else None
    assert cpu_conv.variant() == expected


def test_a_named_build_is_used_only_where_the_cpu_runs_it(monkeypatch):
    monkeypatch.setattr(cpu_conv, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma"}))
    assert cpu_conv.variant() == "avx2"
    monkeypatch.setenv(cpu_conv.VARIANT_ENV, "avx2_lanes16")
    assert cpu_conv.variant() == "avx2_lanes16"
    monkeypatch.setenv(cpu_conv.VARIANT_ENV, "avx512")
    assert cpu_conv.variant() is None  # This CPU cannot run it: XLA's convolutions, never an illegal instruction.
    monkeypatch.setenv(cpu_conv.VARIANT_ENV, "no-such-build")
    assert cpu_conv.variant() == "avx2"
    monkeypatch.setattr(cpu_conv, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    monkeypatch.delenv(cpu_conv.VARIANT_ENV)
    assert cpu_conv.variant() == "avx512"


def _builds_this_cpu_runs() -> list:
    if not NATIVE_EXPECTED:
        return [pytest.param("", marks=pytest.mark.skip(reason="needs x86-64 and a C++ compiler"))]
    builds = []
    for name, (_, needs) in cpu_conv.VARIANTS.items():
        lacks = sorted(set(needs) - cpu_conv.cpu_flags())
        reason = (f"this CPU lacks {', '.join(lacks)}" if lacks else
                  "the tests above run this build" if name == cpu_conv.variant() else None)
        builds.append(pytest.param(name, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return builds


@pytest.mark.slow
@pytest.mark.parametrize("build", _builds_this_cpu_runs())
def test_every_build_of_the_kernels_this_cpu_runs_matches_xla(build):
    """The gradient-equality tests of the native kernels' blocking shapes and of the fused block above, in a
    process that loads build `build` (one library per process)."""
    env = {**os.environ, cpu_conv.VARIANT_ENV: build}
    this_test = f"{__file__}::test_every_build_of_the_kernels_this_cpu_runs_matches_xla"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                             "blocking or fused_conv_relu_pool or build_here", "--deselect", this_test],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-1000:]


_THREADS_PROGRAM = """
import sys
import jax, numpy as np
from imgclf_jax import cpu_conv
assert cpu_conv.available()
rng = np.random.default_rng(0)
x, w = rng.standard_normal((9, 24, 24, 8), np.float32), rng.standard_normal((3, 3, 8, 16), np.float32)
dy, pad = rng.standard_normal((9, 24, 24, 16), np.float32), ((1, 1), (1, 1))
step = jax.jit(lambda x, w, dy: (cpu_conv.forward(x, w, (1, 1), pad),
                                 cpu_conv.weight_gradient(x, dy, w.shape, (1, 1), pad),
                                 cpu_conv.weight_gradient(x[..., :3], dy, (3, 3, 3, 16), (1, 1), pad)))
np.savez(sys.argv[1], *[np.asarray(a) for a in step(x, w, dy)])
"""


@needs_native
@pytest.mark.slow
def test_the_kernels_give_the_same_bits_on_xlas_threads_and_on_their_own(tmp_path):
    """The helpers run as tasks on XLA's thread pool; with IMGCLF_CONV_OWN_THREADS=1 on threads of their own;
    with IMGCLF_CONV_THREADS=3 more of them than the pool has. The chunks and their order of summation are
    fixed, so every way gives the same bits (Winograd and direct kernels, forward and weight gradient)."""
    results = []
    ways = {"pool": {}, "own": {"IMGCLF_CONV_OWN_THREADS": "1"}, "three": {"IMGCLF_CONV_THREADS": "3"}}
    for name, extra in ways.items():
        out = tmp_path / f"{name}.npz"
        result = subprocess.run([sys.executable, "-c", _THREADS_PROGRAM, str(out)], env={**os.environ, **extra},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        with np.load(out) as arrays:
            results.append([arrays[key] for key in sorted(arrays.files)])
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))
    assert all(np.isfinite(a).all() and np.abs(a).max() > 1.0 for a in results[0])
