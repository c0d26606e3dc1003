"""Dataset doctor: what is in an image folder, and what is wrong with it, before any training.

    python -m imgclf_jax.doctor DATA_DIR [--output doctor.json] [--near_threshold 6]

Per split and class: image counts, sizes and aspect ratios, formats, grayscale and transparent images;
class-imbalance warnings; the files that cannot be used and why (the trainer's own scan); exact duplicates
(same bytes) and near-duplicates (perceptual hash within a few bits) within a split and, most important,
across train/validation/test, where they leak validation images into training. Prints a summary with the
pairs and writes everything to a JSON file.
"""

from __future__ import annotations

if __name__ == "__main__":  # Before TensorFlow loads, so that its C++ start-up lines stay quiet.
    import sys

    from imgclf_jax import cli

    cli.prepare_environment(sys.argv, tensorflow=False)

import collections
import concurrent.futures
import os
from typing import Any, Optional, Sequence

import numpy as np
import tqdm
from PIL import Image

from imgclf_jax import cli, config_lib, fingerprints, folders, image_io
from imgclf_jax import workdir as workdir_lib
from imgclf_jax.errors import UserError

IMBALANCE_RATIO = 1.5  # Largest class / smallest class (per split) above this is worth a warning.
SMALL_CLASS = 20  # Fewer training images than this in a class is worth a warning.
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def image_properties(path: str) -> dict[str, Any]:
    """Format, size and colour of one file, from its header (no decoding)."""
    with Image.open(path) as image:
        mode = image.mode
        return {
            "format": image.format or "unknown",
            "width": image.width,
            "height": image.height,
            "grayscale": mode in GRAYSCALE_MODES,
            "alpha": mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info,
        }


def _read_properties(paths: Sequence[str]) -> list[dict[str, Any]]:
    workers = min(32, (os.cpu_count() or 1) * 4)  # Header reads wait on the disk, not the CPU.
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(tqdm.tqdm(pool.map(image_properties, paths), total=len(paths), desc="Reading headers",
                              unit="img", disable=None, leave=False))


def _range(values: Sequence[float], digits: int = 0) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {k: round(float(f(array)), digits) if digits else int(round(float(f(array))))
            for k, f in (("min", np.min), ("median", np.median), ("max", np.max))}


def _group_stats(props: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "images": len(props),
        "width": _range([p["width"] for p in props]),
        "height": _range([p["height"] for p in props]),
        "aspect": _range([p["width"] / p["height"] for p in props], digits=2),
        "formats": dict(collections.Counter(p["format"] for p in props).most_common()),
        "grayscale": sum(p["grayscale"] for p in props),
        "alpha": sum(p["alpha"] for p in props),
    }


def _imbalance_warnings(splits: dict[str, dict[str, Any]], class_names: Sequence[str]) -> list[str]:
    warnings = []
    for split, info in splits.items():
        counts = {c: info["classes"].get(c, {"images": 0})["images"] for c in class_names}
        missing = [c for c, n in counts.items() if n == 0]
        if missing:
            warnings.append(f"{split}: no images of class(es) {', '.join(missing)}")
        present = {c: n for c, n in counts.items() if n}
        if len(present) >= 2:
            big, small = max(present, key=present.get), min(present, key=present.get)
            if present[big] > IMBALANCE_RATIO * present[small]:
                warnings.append(
                    f"{split}: classes are imbalanced: '{big}' has {present[big]} images, '{small}' "
                    f"{present[small]} ({present[big] / present[small]:.1f}x); accuracy will favour the "
                    "larger classes (look at per-class recall in the evaluation report)")
        if split == "train":
            for c, n in present.items():
                if n < SMALL_CLASS:
                    warnings.append(f"train: class '{c}' has only {n} images; a few hundred per class "
                                    "train far better")
    return warnings


def _pair_record(pair: fingerprints.DuplicatePair, root: str) -> dict[str, Any]:
    def side(f: fingerprints.FileFingerprint) -> dict[str, str]:
        return {"path": os.path.relpath(f.path, root), "split": f.split, "class": f.label}

    return {"kind": pair.kind, "distance": pair.distance if pair.distance is not None else 0,
            "cross_split": pair.cross_split, "label_conflict": pair.label_conflict,
            "first": side(pair.first), "second": side(pair.second)}


def diagnose(data_dir: str, near_threshold: int = fingerprints.DEFAULT_NEAR_THRESHOLD,
             max_pixels: int = image_io.DEFAULT_MAX_IMAGE_PIXELS, validation_split: float = 0.2,
             seed: int = 0) -> dict[str, Any]:
    """Examines `data_dir` (any layout the trainer accepts) and returns the findings as plain data.

    A folder without a validation folder is examined the way the trainer would split it (`validation_split`
    held out with `seed`), so duplicates that would straddle that split count as leaks.
    """
    dataset = folders.load_folder_dataset(data_dir, validation_split, seed, max_pixels,
                                          splits=("train", "validation", "test"))
    root = dataset.root
    splits: dict[str, dict[str, Any]] = {}
    for split in ("train", "validation", "test"):
        examples = dataset.splits.get(split)
        if not examples:
            continue
        props = _read_properties([e.path for e in examples])
        by_class: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for example, p in zip(examples, props):
            by_class[dataset.class_names[example.label]].append(p)
        splits[split] = {
            "images": len(examples),
            "classes": {c: _group_stats(by_class[c]) for c in dataset.class_names if by_class[c]},
        }
    pairs = fingerprints.find_duplicates(folders.file_fingerprints(dataset), near_threshold)
    records = [_pair_record(p, root) for p in pairs]
    records.sort(key=lambda r: (not r["cross_split"], r["kind"] != "exact", r["distance"]))
    count = lambda **want: sum(all(r[k] == v for k, v in want.items()) for r in records)
    return {
        "data_dir": root,
        "classes": dataset.class_names,
        "validation": dataset.validation_note,
        "splits": splits,
        "unreadable": [{"path": os.path.relpath(p, root), "reason": r} for p, r in dataset.skipped],
        "warnings": _imbalance_warnings(splits, dataset.class_names),
        "duplicates": {
            "near_threshold_bits": near_threshold,
            "exact_within_split": count(kind="exact", cross_split=False),
            "near_within_split": count(kind="near", cross_split=False),
            "exact_across_splits": count(kind="exact", cross_split=True),
            "near_across_splits": count(kind="near", cross_split=True),
            "label_conflicts": count(label_conflict=True),
            "pairs": records,
        },
    }


def _format_pair(r: dict[str, Any]) -> str:
    a, b = r["first"], r["second"]
    how = "identical" if r["kind"] == "exact" else f"near, {r['distance']} bits"
    note = "  [different classes]" if r["label_conflict"] else ""
    return f"  {a['path']}  ~  {b['path']}  ({how}){note}"


def format_findings(findings: dict[str, Any], max_pairs: int = 20) -> str:
    """The human-readable summary printed by the command line."""
    lines = [f"Dataset {findings['data_dir']}: {len(findings['classes'])} classes; validation: "
             f"{findings['validation']}", ""]
    width = max(8, *(len(c) + 2 for c in findings["classes"]))
    lines.append(f"{'split':<12}{'class':<{width}}{'images':>7}  {'width min/med/max':>19}  "
                 f"{'height min/med/max':>19}  {'aspect med':>10}  {'gray':>5}  {'alpha':>5}  formats")
    for split, info in findings["splits"].items():
        for c, s in info["classes"].items():
            w, h = s["width"], s["height"]
            formats = ", ".join(f"{f} {n}" for f, n in s["formats"].items())
            lines.append(f"{split:<12}{c:<{width}}{s['images']:>7}  {w['min']:>5}/{w['median']:>5}/{w['max']:>6}  "
                         f"  {h['min']:>5}/{h['median']:>5}/{h['max']:>6}  {s['aspect']['median']:>10.2f}  "
                         f"{s['grayscale']:>5}  {s['alpha']:>5}  {formats}")
    unreadable = findings["unreadable"]
    lines += ["", f"Unusable files: {len(unreadable)}" + (" (the trainer skips them)" if unreadable else "")]
    lines += [f"  {u['path']}: {u['reason']}" for u in unreadable[:max_pairs]]
    if len(unreadable) > max_pairs:
        lines.append(f"  ... and {len(unreadable) - max_pairs} more (all in the JSON file)")
    d = findings["duplicates"]
    lines += ["", f"Duplicates (near = perceptual hash within {d['near_threshold_bits']} bits): "
              f"across splits {d['exact_across_splits']} identical + {d['near_across_splits']} near; "
              f"within a split {d['exact_within_split']} identical + {d['near_within_split']} near; "
              f"{d['label_conflicts']} pair(s) with different classes."]
    for title, cross in (("Across splits (leakage: these validation/test photos are also trained on):", True),
                         ("Within a split:", False)):
        chosen = [r for r in d["pairs"] if r["cross_split"] == cross]
        if chosen:
            lines.append(title)
            lines += [_format_pair(r) for r in chosen[:max_pairs]]
            if len(chosen) > max_pairs:
                lines.append(f"  ... and {len(chosen) - max_pairs} more (all in the JSON file)")
    lines += ["", "Warnings:" if findings["warnings"] else "Warnings: none"]
    lines += [f"  {w}" for w in findings["warnings"]]
    return "\n".join(lines)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("output", "doctor.json", "Where to write the findings as JSON.")
    flags.DEFINE_integer("near_threshold", fingerprints.DEFAULT_NEAR_THRESHOLD,
                         "Perceptual-hash distance (bits of 64) at or below which two images are near-"
                         "duplicates; -1 turns the near-duplicate search off.")
    flags.DEFINE_integer("max_image_pixels", image_io.DEFAULT_MAX_IMAGE_PIXELS,
                         "Larger images are reported as unusable (as the trainer does).")
    flags.DEFINE_float("validation_split", 0.2, "For a folder without a validation folder: the fraction the "
                       "trainer would hold out (so leaks across that split are found).")
    flags.DEFINE_integer("seed", 0, "For a folder without a validation folder: the trainer's seed.")


def main(argv: Sequence[str]) -> Optional[dict[str, Any]]:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) != 2:
        raise UserError("name one data folder: python -m imgclf_jax.doctor DATA_DIR")
    if FLAGS.near_threshold > 64:
        raise UserError(f"near_threshold is in bits of a 64-bit hash (got {FLAGS.near_threshold})")
    config_lib.require_positive_int("max_image_pixels", FLAGS.max_image_pixels)
    findings = diagnose(argv[1], FLAGS.near_threshold, FLAGS.max_image_pixels, FLAGS.validation_split,
                        FLAGS.seed)
    print(format_findings(findings))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        workdir_lib.write_json(FLAGS.output, findings)
    except OSError as e:
        raise UserError(f"cannot write {FLAGS.output}: {e.strerror or e}") from None
    print(f"\nWrote {FLAGS.output}")
    return findings


def run() -> None:
    _define_flags()
    cli.run("imgclf_jax.doctor", main)


if __name__ == "__main__":
    run()
