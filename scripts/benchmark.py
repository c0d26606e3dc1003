"""Training-step throughput: imgclf_jax versus the identical Keras model, on the same batches.

    python scripts/benchmark.py [--config tutorial_cnn] [--data_dir ../shared/datasets/cats_vs_dogs]
        [--rounds 3] [--steps 10] [--no_keras] [--conv_impls auto,xla]
    python scripts/benchmark.py --pipeline [--data_dir DIR]   # the input pipeline alone

Warm-up (compilation) is excluded; then rounds alternate between the implementations, and the best round
of each is reported (images/s, ratio to Keras, achieved GFLOP/s from XLA's cost analysis, and the fraction
of an f32 matmul peak measured here on the spot). Keras is only a yardstick: the package never imports it.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np

from imgclf_jax import (input_pipeline, losses, models, parallel, recipes, schedule, steps, train_state,  # noqa: E402
                        xla_cpu)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "datasets", "cats_vs_dogs")


def describe_device() -> str:
    device = jax.devices()[0]
    if device.platform == "cpu":
        model = platform.processor() or "CPU"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        return f"CPU: {model}, {os.cpu_count()} cores"
    return f"{device.platform.upper()}: {device.device_kind}"


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


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


def keras_runner(config, num_classes: int, batches):
    """The Keras tutorial's model (only tutorial_cnn has a Keras twin here), on our [0, 1] batches."""
    import tensorflow as tf

    import keras_tutorial  # scripts/, beside this file; imports Keras.

    if config.model != "tutorial_cnn":
        raise SystemExit("the Keras comparison exists for model 'tutorial_cnn' only; use --no_keras")
    outputs = 1 if num_classes == 2 else num_classes
    model = keras_tutorial.build_model(config.image_size, num_classes, config.learning_rate, rescale=False)
    tensors = [(tf.constant(b["image"]), tf.constant(b["label"].reshape(-1, 1) if outputs == 1 else b["label"]))
               for b in batches]

    def run(steps: int) -> None:
        for i in range(steps):
            x, y = tensors[i % len(tensors)]
            result = model.train_on_batch(x, y)
        float(np.asarray(result[0] if isinstance(result, (list, tuple)) else result))

    return run


def benchmark_steps(args) -> None:
    config = recipes.load_config_file(args.config)
    batches, class_names = load_batches(config, args.data_dir, args.batches)
    print(f"Device: {describe_device()}; JAX {jax.__version__} on {jax.default_backend()}")
    peak = matmul_peak_gflops()
    print(f"f32 matmul peak measured here: {peak:.0f} GFLOP/s")
    print(f"Model {config.model}, {config.image_size}px, batch {config.batch_size}, "
          f"{len(batches)} real batches from {args.data_dir if os.path.isdir(args.data_dir or '') else 'random data'}")
    flops = model_flops_per_step(config, len(class_names), batches[0])
    print(f"Model FLOPs per image (one training step, XLA's count): {flops / config.batch_size / 1e9:.3f} GFLOP")
    options = {} if args.untuned else xla_cpu.compiler_options()
    print(f"XLA compiler options: {options or 'defaults'}")
    runners = {}
    for impl in args.conv_impls.split(","):
        runners[f"imgclf_jax (conv_impl={impl})"] = jax_runner(config, impl, len(class_names), batches, options)
    if not args.no_keras:
        runners["keras"] = keras_runner(config, len(class_names), batches)
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
            line += f"  {achieved:6.1f} GFLOP/s ({achieved / peak:.0%} of the matmul peak)"
        if "keras" in best and name != "keras":
            line += f"  {ips / best['keras']:.2f}x Keras"
        print(line)


def benchmark_pipeline(args) -> None:
    config = recipes.load_config_file(args.config)
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
    parser.add_argument("--no_keras", action="store_true")
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
