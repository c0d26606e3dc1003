"""xla_cpu: freed host memory is reused (no page faults per step), and the XLA:CPU options take effect."""

import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from imgclf_jax import cpu_conv, models, xla_cpu

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the malloc settings are glibc's")

# Runs a jitted function with two 200 MB temporaries (above glibc's 32 MiB mmap threshold) 10 times to let the
# heap grow, then 10 more, and prints the minor page faults of those last 10 calls. The malloc settings are
# process-wide and must come before JAX starts, hence a fresh interpreter.
_WARMUP_CALLS = 10
_CALLS = 10
_PAGES_PER_CALL = 2 * 200_000_000 // 4096
_FAULTS_SCRIPT = textwrap.dedent(f"""
    import resource, time
    from imgclf_jax import xla_cpu
    print("kept" if xla_cpu.keep_freed_memory() else "default")
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: (jnp.sin(x) * jnp.cos(x) + x).sum())
    x = jnp.ones((50_000_000,), jnp.float32)
    for _ in range(1 + {_WARMUP_CALLS}):  # Compiles, then grows the heap.
        f(x).block_until_ready()
        time.sleep(0.1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range({_CALLS}):
        f(x).block_until_ready()
        time.sleep(0.1)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _run_faults_script(extra_env: dict[str, str]) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.slow
@glibc_only
def test_freed_memory_is_reused_without_page_faults():
    mode, faults = _run_faults_script({})
    assert mode == "kept"
    # Glibc's defaults fault every page in again at every call (measured: 97,656 faults a call). Kept, the
    # heap grows for the first few calls (freed blocks are not always contiguous yet: 2-3 calls alone, 5 in a
    # busy CI run, which a bound over all calls from the first made flaky), then stays mapped: after the
    # warm-up, the calls together fault in less than one call's worth (measured: 0-1 faults).
    assert faults < _PAGES_PER_CALL


@pytest.mark.slow
@glibc_only
def test_opt_out_and_users_own_malloc_settings_are_respected():
    assert _run_faults_script({xla_cpu.OPT_OUT: "0"})[0] == "default"
    assert _run_faults_script({"MALLOC_ARENA_MAX": "4"})[0] == "default"


def _plain_conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
def test_compiler_options_keep_convolutions_and_their_gradients_out_of_ynnpack():
    options = xla_cpu.compiler_options()
    if not options:
        pytest.skip("this jaxlib does not take the XLA:CPU option")
    x, k = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 8))
    grads = jax.grad(lambda x, k: _plain_conv(x, k).sum(), argnums=(0, 1))
    default_hlo = jax.jit(grads).lower(x, k).compile().as_text()
    tuned_hlo = jax.jit(grads, compiler_options=options).lower(x, k).compile().as_text()
    tuned_convs = [line for line in tuned_hlo.splitlines() if " convolution(" in line]
    assert len(tuned_convs) == 2  # The input and the weight gradient, both XLA's own.
    assert all("ynn" not in line for line in tuned_convs)
    if "ynn_fusion" in default_hlo:  # This jaxlib would have used YNNPACK: the option is what changed it.
        assert tuned_hlo.count(" convolution(") > default_hlo.count(" convolution(")
    # Same numbers either way.
    for a, b in zip(jax.jit(grads)(x, k), jax.jit(grads, compiler_options=options)(x, k)):
        assert jnp.allclose(a, b, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
def test_compiler_options_hand_both_matrix_products_and_reductions_to_ynnpack():
    options = xla_cpu.compiler_options()
    if not options:
        pytest.skip("this jaxlib does not take the XLA:CPU option")
    a, b = jnp.ones((256, 256)), jnp.ones((256, 128))
    hlo = jax.jit(lambda a, b: (jnp.tanh(a @ b), jnp.tanh(a).sum(axis=0)),
                  compiler_options=options).lower(a, b).compile().as_text()
    ynn_shapes = {line.split("=")[1].split()[0] for line in hlo.splitlines() if "%ynn_fusion" in line.split("=")[0]}
    assert "f32[256,128]{1,0}" in ynn_shapes  # The matrix product (a dense layer's).
    assert "f32[256]{0}" in ynn_shapes  # The reduction.


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
def test_an_xla_that_rejects_the_list_of_fusion_types_still_keeps_ynnpacks_convolutions_out(monkeypatch):
    if not xla_cpu.compiler_options():
        pytest.skip("this jaxlib does not take the XLA:CPU option")
    # A fusion type this XLA does not know stands for a jaxlib that takes one type only.
    monkeypatch.setattr(xla_cpu, "_CPU_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type":
                                                  "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_NO_SUCH_TYPE"})
    assert xla_cpu.compiler_options.__wrapped__() == xla_cpu._CPU_OPTIONS_FALLBACK


def test_auto_conv_without_native_kernels_is_xla_wherever_the_cpu_options_apply(monkeypatch):
    # Where the native kernels build, 'auto' picks them (tests/test_conv.py); here they are made unavailable.
    monkeypatch.setattr(cpu_conv, "available", lambda: False)
    if jax.default_backend() == "cpu" and not xla_cpu.compiler_options() and jax.device_count() == 1:
        assert models.resolve_conv_impl("auto") == "matmul_grad"
    else:
        assert models.resolve_conv_impl("auto") == "xla"
    assert models.resolve_conv_impl("xla") == "xla"


@pytest.mark.slow
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")
def test_one_off_options_compile_the_same_initial_parameters():
    from imgclf_jax import config_lib, schedule, train_state

    options = xla_cpu.one_off_compiler_options()
    if not options:
        pytest.skip("this jaxlib does not take the XLA:CPU option")
    config = config_lib.base_config()
    config.cnn.filters, config.cnn.dense_units = (8, 16), 16
    model = models.create_model(config, 3)
    optimizer = train_state.create_optimizer(config, schedule.create_learning_rate_fn(config, 10))
    tuned = train_state.create_train_state(model, 32, optimizer, seed=3)  # Compiled with the one-off options.
    default = jax.jit(lambda: train_state._initial_state(model, 32, optimizer, 3))()  # XLA's default build.
    for a, b in zip(jax.tree_util.tree_leaves(tuned.params), jax.tree_util.tree_leaves(default.params)):
        assert a.shape == b.shape and jnp.allclose(a, b, rtol=1e-6, atol=1e-7)  # Float rounding at most.
