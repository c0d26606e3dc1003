#!/usr/bin/env bash
# The GPU check: run as is from the repository root on a machine with one NVIDIA GPU, in at most 8 minutes.
#
#   bash scripts/device_check.sh            # prints everything; also writes it to $OUT/device_check.log if OUT is set
#
# 1. the GPU and JAX's view of it;
# 2. the tests that build the models and run the train/eval steps and their parts, on the GPU;
# 3. scripts/benchmark.py for the tutorial CNN (180 px) and the default ResNet (96 and 160 px, its first and
#    last progressive sizes), float32 and bfloat16: images/s, model FLOPs, and the fraction of the matmul
#    peak measured on the spot (model-FLOP utilisation);
# 4. a one-minute train + evaluate on a folder of real photos, where TensorFlow (tf.data) is installed.
#
# Python packages the machine lacks travel as wheels in .whl/ (ml_collections at least, where the image has
# JAX, flax, optax and orbax but not it); they are installed into /tmp/site first. A folder of photos for
# step 4 may travel as data/device_photos (train/ + test/), else step 4 makes one from generated images.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:+$OUT/device_check.log}
exec > >(tee ${LOG:-/dev/null}) 2>&1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
start=$SECONDS
step() { echo; echo "== $1 ($((SECONDS - start)) s in)"; }

step "1. the device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
$PY -c "import jax, flax, optax; print('JAX', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
    || { echo "FAILED: JAX cannot start"; exit 1; }
$PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" || echo "WARNING: JAX sees no GPU; the rest runs on $($PY -c 'import jax; print(jax.default_backend())')"

step "2. model and step tests on the device"
timeout 200 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_models.py tests/test_steps.py \
    tests/test_train_state.py tests/test_losses.py tests/test_mixing.py \
    tests/test_pooling.py tests/test_schedule.py
tests_rc=$?

step "3. step throughput and model-FLOP utilisation (random batches of the configs' shapes)"
for args in "--config tutorial_cnn" "--config default --image_size 96" "--config default --image_size 160"; do
    for dtype in float32 bfloat16; do
        echo "-- $args --dtype $dtype"
        timeout 60 $PY scripts/benchmark.py $args --dtype $dtype --data_dir "" --no_keras --no_torch \
            --conv_impls xla --rounds 3 --steps 20 2>&1 | grep -v "^  round"
    done
done

step "4. one-minute train + evaluate on photos"
if $PY -c "import tensorflow" 2>/dev/null; then
    photos=data/device_photos
    if [ ! -d "$photos/train" ]; then
        photos=/tmp/device_photos
        $PY - "$photos" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for split, count in (("train", 120), ("test", 40)):
    for label, name in enumerate(("dark", "light")):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 120, (96, 96, 3)) + 100 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.jpg")
EOF
    fi
    timeout 150 $PY -m imgclf_jax.train --data_dir "$photos" --workdir /tmp/device_run --time_budget_minutes 1 \
        && timeout 60 $PY -m imgclf_jax.evaluate --workdir /tmp/device_run --data_dir "$photos" --split test
    train_rc=$?
else
    echo "SKIPPED: TensorFlow is not installed here (tf.data reads the photos); its wheel is too large to travel"
    train_rc=0
fi

step "done"
echo "tests rc=$tests_rc, train+evaluate rc=$train_rc, $((SECONDS - start)) s"
exit $(( tests_rc || train_rc ))
