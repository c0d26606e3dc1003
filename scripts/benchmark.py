"""Training-step throughput: imgclf_jax versus the same model in Keras and in PyTorch, on the same batches.

    python scripts/benchmark.py [--config tutorial_cnn] [--data_dir ../shared/datasets/cats_vs_dogs]
        [--image_size N] [--rounds 3] [--steps 10] [--no_keras] [--no_torch] [--conv_impls auto,xla]
    python scripts/benchmark.py --config default --image_size 96    # the default ResNet at a training size
    python scripts/benchmark.py --pipeline [--data_dir DIR]          # the input pipeline alone

Warm-up (compilation) is excluded; then rounds alternate between the implementations, and the best round
of each is reported: images/s, the ratio to Keras and to PyTorch, the achieved GFLOP/s from XLA's count of
the model's FLOPs, and that as a fraction of the host's peak measured here on the spot (a 2048x2048 float32
matmul, the best of XLA, numpy and PyTorch; and bfloat16 through PyTorch, where oneDNN uses AMX or
AVX512-BF16 if the CPU has them). The twins (scripts/framework_twins.py) are yardsticks only: the package
imports neither framework. PyTorch is optional (`pip install torch`); without it its column is left out.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if "--no_torch" not in sys.argv:
    try:  # PyTorch's compiler stack (triton) crashes when loaded after jaxlib and TensorFlow: load it first.
        import torch._dynamo  # noqa: F401
    except ImportError:
        pass

import jax
import jax.numpy as jnp
import numpy as np

import framework_twins  # noqa: E402 - scripts/, beside this file.
from imgclf_jax import cpu_conv, losses, models, parallel, recipes, schedule, steps, train_state, xla_cpu  # noqa: E402
from recipe_suite import host  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "datasets", "cats_vs_dogs")


def describe_device() -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"CPU: {host()}"
    return f"{device.platform.upper()}: {device.device_kind}"


def has_torch() -> bool:
    return "torch" in sys.modules  # Imported at the top unless --no_torch.


def matmul_peak_gflops(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a square matmul through XLA."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def numpy_matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = min(_timed(lambda: a @ a) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def measure_peaks(with_torch: bool) -> dict[str, float]:
    """The device's measured matmul peaks (GFLOP/s) by dtype. On a CPU: float32 the best of XLA, numpy and
    PyTorch, bfloat16 the best of XLA and PyTorch (2048x2048), None where the CPU has no native bfloat16; on
    an accelerator, XLA's alone (8192x8192). Each source is printed."""
    if jax.default_backend() != "cpu":
        found = {"float32 XLA": matmul_peak_gflops(n=8192), "bfloat16 XLA": matmul_peak_gflops(jnp.bfloat16, 8192)}
        print("Matmul peaks measured here (8192x8192): " + ", ".join(f"{k} {v:.0f}" for k, v in found.items())
              + " GFLOP/s")
        return {"float32": found["float32 XLA"], "bfloat16": found["bfloat16 XLA"]}
    native_bf16 = bool(cpu_conv.cpu_flags() & {"avx512_bf16", "amx_bf16"})  # Elsewhere bfloat16 is emulated.
    found = {"float32 XLA": matmul_peak_gflops(), "float32 numpy": numpy_matmul_peak_gflops(),
             "bfloat16 XLA": matmul_peak_gflops(jnp.bfloat16)}
    if with_torch:
        found["float32 PyTorch"] = framework_twins.torch_matmul_peak_gflops("float32")
        if native_bf16:  # Emulated bfloat16 runs far below float32: not worth timing.
            found["bfloat16 PyTorch"] = framework_twins.torch_matmul_peak_gflops("bfloat16")
    print("Matmul peaks measured here (2048x2048): " + ", ".join(f"{k} {v:.0f}" for k, v in found.items())
          + " GFLOP/s")
    peaks = {dtype: max(v for k, v in found.items() if k.startswith(dtype)) for dtype in ("float32", "bfloat16")}
    if not native_bf16:
        peaks["bfloat16"] = None  # No native bfloat16 arithmetic here: XLA's bfloat16 runs as float32.
    return peaks


def _steal_seconds() -> Optional[float]:
    """CPU time the hypervisor gave to other guests (Linux /proc/stat 'steal'), summed over cores."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_batches(config, data_dir: str, count: int) -> list[dict[str, np.ndarray]]:
    """`count` real training batches (decoded, resized, as the trainer sees them); random if no folder."""
    size, bs = config.image_size, config.batch_size
    if data_dir and os.path.isdir(data_dir):
        from imgclf_jax import input_pipeline  # TensorFlow's tf.data: only for real photos.

        source = input_pipeline.load_folder_source(data_dir, config.validation_split, 0, size,
                                                   config.max_image_pixels)
        prepared = input_pipeline.prepare(source.splits["train"], size, config.resize, cache=False)
        batches = input_pipeline.train_batches(prepared, source.splits["train"].num_examples, bs, 0, 1)
        # Float images for both frameworks (our step takes uint8 too, and converts it the same way).
        out = [{"image": b["image"].astype(np.float32) / 255.0, "label": b["label"]}
               for b in (next(batches) for _ in range(count))]
        return out, source.class_names
    rng = np.random.default_rng(0)
    return [{"image": rng.uniform(size=(bs, size, size, 3)).astype(np.float32),
             "label": rng.integers(0, 2, bs).astype(np.int32)} for _ in range(count)], ["a", "b"]


def jax_runner(config, conv_impl: str, num_classes: int, batches, compiler_options: dict):
    config = config.copy_and_resolve_references()
    config.conv_impl = conv_impl
    loss_kind = losses.resolve_loss(config.loss, num_classes)
    model = models.create_model(config, losses.num_outputs(loss_kind, num_classes))
    lr = schedule.create_learning_rate_fn(config, steps_per_epoch=100)
    mesh = parallel.create_mesh()  # As the trainer does: the batch split over every device, state replicated.
    state = train_state.create_train_state(model, config.image_size, train_state.create_optimizer(config, lr), 0, mesh)
    state_sharding = parallel.replicated(mesh)
    step = jax.jit(functools.partial(steps.train_step, loss_kind=loss_kind, label_smoothing=config.label_smoothing),
                   in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                   out_shardings=(state_sharding, state_sharding), donate_argnums=0,
                   compiler_options=compiler_options)
    device_batches = [parallel.global_batch(mesh, b) for b in batches]
    holder = {"state": state}

    def run(steps: int) -> None:
        s = holder["state"]
        for i in range(steps):
            s, metrics = step(s, device_batches[i % len(device_batches)])
        jax.block_until_ready(metrics)
        holder["state"] = s

    return run


def model_flops_per_step(config, num_classes: int, batch) -> float:
    """FLOPs of one training step as XLA counts them for the plain (conv_impl='xla') formulation: the
    model's arithmetic, the same for every implementation (a scan's body would be counted once)."""
    config = config.copy_and_resolve_references()
    config.conv_impl = "xla"
    loss_kind = losses.resolve_loss(config.loss, num_classes)
    model = models.create_model(config, losses.num_outputs(loss_kind, num_classes))
    lr = schedule.create_learning_rate_fn(config, steps_per_epoch=100)
    state = train_state.create_train_state(model, config.image_size, train_state.create_optimizer(config, lr), 0)
    step = jax.jit(functools.partial(steps.train_step, loss_kind=loss_kind, label_smoothing=config.label_smoothing))
    analysis = step.lower(state, batch).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", float("nan")))


def benchmark_steps(args) -> None:
    config = recipes.load_config_file(args.config)
    if args.image_size:
        config.image_size = args.image_size
    if args.dtype:
        config.dtype = args.dtype
    batches, class_names = load_batches(config, args.data_dir, args.batches)
    with_torch = not args.no_torch and has_torch()
    print(f"Device: {describe_device()}; JAX {jax.__version__} on {jax.default_backend()}")
    peaks = measure_peaks(with_torch)
    print(f"Model {config.model}, {config.image_size}px, batch {config.batch_size}, "
          f"{len(batches)} real batches from {args.data_dir if os.path.isdir(args.data_dir or '') else 'random data'}")
    loss_kind = losses.resolve_loss(config.loss, len(class_names))
    ours = models.create_model(config, losses.num_outputs(loss_kind, len(class_names)))
    counts = [f"imgclf_jax {models.count_params(ours.init(jax.random.key(0), batches[0]['image'][:1])['params']):,}"]
    if not args.no_keras:
        counts.append(f"Keras {framework_twins.keras_param_count(config, len(class_names)):,}")
    if with_torch:
        counts.append(f"PyTorch {framework_twins.torch_param_count(config, len(class_names)):,}")
    print("Parameters: " + ", ".join(counts))
    flops = model_flops_per_step(config, len(class_names), batches[0])
    print(f"Model FLOPs per image (one training step, XLA's count): {flops / config.batch_size / 1e9:.3f} GFLOP")
    options = {} if args.untuned else xla_cpu.compiler_options()
    print(f"XLA compiler options: {options or 'defaults'}")
    if "native" in args.conv_impls or "auto" in args.conv_impls:
        build = cpu_conv.loaded_build()
        print(f"Native kernels: {f'the {build} build' if build else 'not available here'} "
              f"({cpu_conv.VARIANT_ENV} picks another)")
    runners = {}
    for impl in args.conv_impls.split(","):
        runners[f"imgclf_jax (conv_impl={impl})"] = jax_runner(config, impl, len(class_names), batches, options)
    if not args.no_keras:
        runners["keras"] = framework_twins.keras_runner(config, len(class_names), batches)
    if with_torch:
        runners["pytorch"] = framework_twins.torch_runner(config, len(class_names), batches)
    for run in runners.values():  # Warm-up: compilation, tracing, allocator.
        run(2)
    best = {name: 0.0 for name in runners}
    for r in range(args.rounds):
        for name, run in runners.items():
            cpu_before, steal_before = os.times(), _steal_seconds()
            seconds = _timed(lambda: run(args.steps))
            cpu_after, steal_after = os.times(), _steal_seconds()
            busy = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / seconds
            ips = args.steps * config.batch_size / seconds
            best[name] = max(best[name], ips)
            line = f"  round {r + 1}: {name:<36} {ips:8.1f} images/s  ({busy:.1f} of {os.cpu_count()} cores busy"
            if steal_before is not None and steal_after is not None:
                line += f", {(steal_after - steal_before) / seconds:.2f} cores stolen by the hypervisor"
            print(line + ")")
    print("\nBest round:")
    for name, ips in best.items():
        line = f"  {name:<36} {ips:8.1f} images/s"
        if flops == flops:
            achieved = flops * ips / config.batch_size / 1e9
            line += f"  {achieved:6.1f} GFLOP/s ({achieved / peaks['float32']:.0%} of the f32 peak"
            line += f", {achieved / peaks['bfloat16']:.0%} of the bf16 peak)" if peaks["bfloat16"] else ")"
        for yardstick, label in (("keras", "Keras"), ("pytorch", "PyTorch")):
            if yardstick in best and name not in ("keras", "pytorch"):
                line += f"  {ips / best[yardstick]:.2f}x {label}"
        print(line)


def benchmark_pipeline(args) -> None:
    config = recipes.load_config_file(args.config)
    from imgclf_jax import input_pipeline

    source = input_pipeline.load_folder_source(args.data_dir, config.validation_split, 0, config.image_size,
                                               config.max_image_pixels)
    split = source.splits["train"]
    prepared = input_pipeline.prepare(split, config.image_size, config.resize, cache=True)
    print(f"Device: {describe_device()}; {split.num_examples} training images from {args.data_dir} "
          "(augmentation is not here: it runs in the train step)")
    for epoch in (1, 2, 3):
        start = time.perf_counter()
        n = sum(len(b["label"]) for b in input_pipeline.train_batches(
            prepared, split.num_examples, config.batch_size, 0, epoch))
        seconds = time.perf_counter() - start
        kind = "decode + resize + cache" if epoch == 1 else "from the cache"
        print(f"  epoch {epoch} ({kind}): {n / seconds:8.1f} images/s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tutorial_cnn")
    parser.add_argument("--data_dir", default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--conv_impls", default="auto,xla")
    parser.add_argument("--image_size", type=int, default=0, help="train at this size instead of the config's")
    parser.add_argument("--dtype", default="", help="compute dtype instead of the config's (bfloat16 on GPUs)")
    parser.add_argument("--no_keras", action="store_true")
    parser.add_argument("--no_torch", action="store_true", help="leave PyTorch out even if it is installed")
    parser.add_argument("--pipeline", action="store_true", help="time the input pipeline alone")
    parser.add_argument("--untuned", action="store_true",
                        help="leave malloc and the XLA:CPU options at their defaults (imgclf_jax.xla_cpu does not "
                             "run), to measure what those two settings are worth")
    args = parser.parse_args(argv)
    kept = not args.untuned and xla_cpu.keep_freed_memory()
    print(f"Host memory: {'freed memory kept for reuse (xla_cpu.keep_freed_memory)' if kept else 'malloc defaults'}")
    (benchmark_pipeline if args.pipeline else benchmark_steps)(args)


if __name__ == "__main__":
    sys.exit(main())
