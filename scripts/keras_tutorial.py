"""The Keras image-classification tutorial's training command, as our yardstick for the whole-command time.

    /usr/bin/time -v python scripts/keras_tutorial.py --data_dir ../shared/datasets/cats_vs_dogs --epochs 2
    /usr/bin/time -v python -m imgclf_jax.train --config tutorial_cnn \\
        --data_dir ../shared/datasets/cats_vs_dogs --epochs 2

Same folder (train/ + validation/), 180x180 squashed, batch 32, Adam 1e-3, the tutorial's CNN with the
output layer ours has (one logit and sigmoid cross-entropy for two classes, else one logit per class), the
tutorial's tf.data recipe (cache, shuffle, prefetch). Keras is only a yardstick: the package never imports it.

`--augment` is the tutorial's second recipe, the accuracy yardstick of issue 6 (random flip, rotation 0.1 and
zoom 0.1 layers, dropout 0.2 before the dense layers; 15 epochs in the tutorial). A folder without
validation/ holds out 20% of train/ as the tutorial does (`validation_split=0.2`, seed 123); a test/ folder
is scored once at the end with the last epoch's weights, as the tutorial would.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402


def build_model(
    image_size: int, num_classes: int, learning_rate: float, rescale: bool, augment: bool = False
) -> keras.Model:
    """The tutorial's CNN, compiled; our output layer (one logit for two classes). `rescale` maps 0-255
    pixels to [0, 1] in the model, as the tutorial does; without it the model takes [0, 1] images, as ours.
    `augment` adds the tutorial's augmentation layers and dropout."""
    outputs = 1 if num_classes == 2 else num_classes
    augmentation = [
        keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1), keras.layers.RandomZoom(0.1)
    ] if augment else []
    inputs = ([keras.Input((image_size, image_size, 3))] + augmentation
              + ([keras.layers.Rescaling(1.0 / 255)] if rescale else []))
    model = keras.Sequential(inputs + [
        layer for filters in (16, 32, 64)
        for layer in (keras.layers.Conv2D(filters, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D())
    ] + ([keras.layers.Dropout(0.2)] if augment else []) + [
        keras.layers.Flatten(), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(outputs)])
    loss = (keras.losses.BinaryCrossentropy(from_logits=True) if outputs == 1
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    metric = keras.metrics.BinaryAccuracy(threshold=0.0) if outputs == 1 else "accuracy"
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=[metric])
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=180)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--augment", action="store_true", help="the tutorial's augmentation + dropout recipe")
    parser.add_argument("--seed", type=int, help="seeds the weights and shuffling too (the tutorial seeds only "
                        "its split, so each run is another draw)")
    args = parser.parse_args(argv)
    if args.seed is not None:
        keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    size = (args.image_size, args.image_size)
    load = lambda split, **kw: keras.utils.image_dataset_from_directory(  # noqa: E731
        os.path.join(args.data_dir, split), image_size=size, batch_size=args.batch_size, seed=123, **kw)
    if os.path.isdir(os.path.join(args.data_dir, "validation")):
        train_ds, val_ds = load("train"), load("validation")
    else:
        train_ds, val_ds = load("train", validation_split=0.2, subset="both")
    num_classes = len(train_ds.class_names)
    train_ds = train_ds.cache().shuffle(1000).prefetch(tf.data.AUTOTUNE)
    val_ds = val_ds.cache().prefetch(tf.data.AUTOTUNE)
    model = build_model(args.image_size, num_classes, learning_rate=1e-3, rescale=True, augment=args.augment)
    history = model.fit(train_ds, validation_data=val_ds, epochs=args.epochs, verbose=2)
    elapsed = time.perf_counter() - start
    accuracy_key = next(k for k in history.history if k.startswith("val_") and "accuracy" in k)
    val_accuracy = history.history[accuracy_key]
    print(f"keras_tutorial: {args.epochs} epochs in {elapsed:.1f} s (after imports); validation accuracy "
          f"last {val_accuracy[-1]:.4f}, best {max(val_accuracy):.4f} (epoch {val_accuracy.index(max(val_accuracy)) + 1})")
    if os.path.isdir(os.path.join(args.data_dir, "test")):
        test_ds = load("test", shuffle=False)
        _, test_accuracy = model.evaluate(test_ds, verbose=0)
        print(f"keras_tutorial: test accuracy {test_accuracy:.4f} ({args.data_dir}/test, last epoch's weights)")


if __name__ == "__main__":
    main()
