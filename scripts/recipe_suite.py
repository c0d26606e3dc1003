"""Scores a recipe on a suite of photo folders against the Keras tutorial's recipe (not part of the tests).

    python scripts/recipe_suite.py --config default --out /tmp/suite \\
        flowers5=../shared/datasets/flowers5 weather4=../shared/datasets/weather4 \\
        corn_leaf=../shared/datasets/corn_leaf held_out:small=/tmp/photos_small [-- --config.epochs=300]

Each folder needs `train/` and `test/` (and may have `validation/`). For each, in turn (never two at once),
it runs the training command as a user would (`python -m imgclf_jax.train --config C --data_dir F`), scores
the test photos with `python -m imgclf_jax.evaluate` (the recipe's own test-time augmentation), then trains
the Keras tutorial's augmented recipe (`scripts/keras_tutorial.py --augment`, 15 epochs) on the same split
and reads its test accuracy. It prints one markdown table (folder, classes, photos, our test accuracy, the
tutorial's, the difference, minutes of each whole command) and writes it to OUT/table.md with the host's CPU
beside it. A `held_out:` prefix marks a folder that played no part in choosing the recipe: its rows are
listed apart, so they can judge the recipe honestly. `--keras_cache` reuses earlier Keras scores of the same
folder and split (they depend on the folder alone). The tutorial seeds its split but not its weights, so one
run of it is one draw (0.03-0.06 apart over three runs of one folder, docs/accuracy.md series 37):
`--keras_seeds N` scores the mean of N seeded runs instead, with their range.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from imgclf_jax import cpu_conv

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif"}


def count_photos(split: Path) -> dict[str, int]:
    """Image files per class sub-folder of `split` (by extension: a count for the table, not a scan)."""
    return {c.name: sum(1 for f in c.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            for c in sorted(split.iterdir()) if c.is_dir()}


def run(command: list[str], log_path: Path) -> tuple[str, float]:
    """Runs `command` to completion with its output in `log_path`; returns (output, minutes)."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    log_path.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}; see {log_path}")
    return result.stdout + result.stderr, minutes


def our_score(name: str, folder: Path, config: str, out: Path, overrides: list[str]) -> tuple[float, float]:
    """(test accuracy, minutes of the training command) for the recipe on `folder`."""
    workdir = out / f"run_{name}"
    if workdir.exists() and any(workdir.iterdir()):
        raise SystemExit(f"{workdir} is not empty: a suite run starts every run from scratch (use a new --out)")
    _, minutes = run([sys.executable, "-m", "imgclf_jax.train", "--config", config, "--data_dir", str(folder),
                      "--workdir", str(workdir), *overrides], out / f"train_{name}.log")
    run([sys.executable, "-m", "imgclf_jax.evaluate", "--workdir", str(workdir), "--data_dir", str(folder),
         "--split", "test", "--name", "suite_test"], out / f"evaluate_{name}.log")
    report = json.loads((workdir / "eval_suite_test.json").read_text())
    return report["accuracy"], minutes


def keras_score(name: str, folder: Path, out: Path, cache: dict, seed: Optional[int] = None) -> tuple[float, float]:
    """(test accuracy, minutes) of the Keras tutorial's augmented recipe, 15 epochs, on `folder`, with its
    weights seeded by `seed` (None: unseeded, as the tutorial itself)."""
    key = str(folder.resolve()) + ("" if seed is None else f"#seed={seed}")
    if key in cache:
        return cache[key]["accuracy"], cache[key]["minutes"]
    log = out / f"keras_{name}{'' if seed is None else f'_seed{seed}'}.log"
    output, minutes = run([sys.executable, "scripts/keras_tutorial.py", "--data_dir", str(folder), "--augment",
                           "--epochs", "15"] + ([] if seed is None else ["--seed", str(seed)]), log)
    found = re.search(r"test accuracy ([0-9.]+)", output)
    if not found:
        raise SystemExit(f"no test accuracy in {log}")
    cache[key] = {"accuracy": float(found.group(1)), "minutes": minutes}
    return cache[key]["accuracy"], minutes


def keras_scores(name: str, folder: Path, out: Path, cache: dict, seeds: int) -> tuple[list[float], float]:
    """The Keras tutorial's test accuracies on `folder` (one unseeded run, or one run for each of seeds
    0..seeds-1: its score varies by a few hundredths from draw to draw) and the minutes of one run on average."""
    runs = [keras_score(name, folder, out, cache, seed) for seed in (range(seeds) if seeds else [None])]
    return [accuracy for accuracy, _ in runs], sum(minutes for _, minutes in runs) / len(runs)


def keras_cell(accuracies: list[float]) -> str:
    """One Keras score, or the mean of several with their range."""
    mean = statistics.fmean(accuracies)
    return f"{mean:.3f}" if len(accuracies) == 1 else f"{mean:.3f} ({min(accuracies):.3f}-{max(accuracies):.3f})"


def _cpuinfo_field(name: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def host() -> str:
    """The CPU model and its vector extensions, named beside every timing."""
    model = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in cpu_conv.cpu_flags()]
    return f"{os.cpu_count()}-core {model} ({', '.join(vector) or 'no AVX2'})"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The suite's own arguments, and the training command's flags: whatever follows a `--`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s [options] NAME=FOLDER ... [-- TRAINING FLAGS]")
    parser.add_argument("folders", nargs="+", help="NAME=FOLDER, or held_out:NAME=FOLDER")
    parser.add_argument("--config", default="default", help="the recipe to score (a name or a file)")
    parser.add_argument("--out", required=True, help="a new folder for the runs, logs and the table")
    parser.add_argument("--no_keras", action="store_true", help="leave the Keras column out")
    parser.add_argument("--keras_cache", help="a JSON file of Keras scores to reuse and extend")
    parser.add_argument("--keras_seeds", type=int, default=0,
                        help="N > 0: the Keras column is the mean of N runs with seeds 0..N-1 (0: one unseeded run)")
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    if args.keras_seeds < 0:
        parser.error(f"--keras_seeds must be 0 or more (got {args.keras_seeds})")
    bad = [item for item in args.folders if "=" not in item or item.startswith("-")]
    if bad:
        parser.error(f"not NAME=FOLDER: {' '.join(bad)} (training flags go after --)")
    return args, argv[cut + 1:]


def main(argv: Optional[list[str]] = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = Path(args.keras_cache) if args.keras_cache else out / "keras_scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows = []
    for item in args.folders:
        name, _, folder = item.partition("=")
        held_out = name.startswith("held_out:")
        name = name.removeprefix("held_out:")
        folder = Path(folder)
        if not (folder / "train").is_dir() or not (folder / "test").is_dir():
            raise SystemExit(f"{folder} needs train/ and test/ folders")
        train, test = count_photos(folder / "train"), count_photos(folder / "test")
        ours, our_minutes = our_score(name, folder, args.config, out, overrides)
        theirs, their_minutes = ([], None) if args.no_keras else keras_scores(name, folder, out, cache,
                                                                                args.keras_seeds)
        cache_path.write_text(json.dumps(cache, indent=2))
        rows.append((held_out, name, len(train), sum(train.values()), sum(test.values()), ours, theirs,
                     our_minutes, their_minutes))
        print(f"{name}: ours {ours:.3f} in {our_minutes:.1f} min"
              + (f", Keras tutorial {keras_cell(theirs)} in {their_minutes:.1f} min" if theirs else ""), flush=True)

    lines = [f"Recipe `{args.config}`{' ' + ' '.join(overrides) if overrides else ''} on {host()}, "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| folder | classes | train photos | test photos | ours (test) | Keras tutorial (test) | difference "
             "| ours, min | Keras, min |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for held_out in (False, True):
        for row in (r for r in rows if r[0] == held_out):
            _, name, classes, n_train, n_test, ours, theirs, our_min, their_min = row
            cells = [f"{name}{' (held out)' if held_out else ''}", str(classes), str(n_train), str(n_test),
                     f"{ours:.3f}", keras_cell(theirs) if theirs else "-",
                     f"{ours - statistics.fmean(theirs):+.3f}" if theirs else "-", f"{our_min:.1f}",
                     "-" if their_min is None else f"{their_min:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
