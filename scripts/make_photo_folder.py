"""Builds a small multi-class photo folder in the shape users bring: `train/` and `test/` only, mixed formats.

    python scripts/make_photo_folder.py --source ../shared/datasets/flowers5 --out /tmp/photos \\
        --train_per_class 200 --test_per_class 50

Issue 6 scores the default recipe on "a few classes, ~200 photos each, only train/ and test/ sub-folders,
mixed formats", which we do not have. This draws such a folder from any `<class>/` (or `train/<class>/` +
`validation/<class>/`) source: train photos from the source's train split, test photos from its validation
split when it has one (so the two never share a file), re-saved as a mix of JPEG, .JPG, PNG, RGBA PNG, BMP,
WebP, HEIC and AVIF, some enlarged or made non-square. The copy goes outside the repository: never commit shared images.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()  # Lets Pillow write HEIC.

# (suffix, PIL format, mode, share of the files): what a phone/web/screenshot mix looks like.
FORMATS = (
    (".jpg", "JPEG", "RGB", 0.45),
    (".JPG", "JPEG", "RGB", 0.10),
    (".png", "PNG", "RGB", 0.15),
    (".png", "PNG", "RGBA", 0.10),
    (".bmp", "BMP", "RGB", 0.10),
    (".webp", "WEBP", "RGB", 0.06),
    (".heic", "HEIF", "RGB", 0.02),
    (".avif", "AVIF", "RGB", 0.02),
)
KERAS_UNREADABLE = {"WEBP", "HEIF", "AVIF"}  # image_dataset_from_directory skips these files.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def class_files(folder: Path) -> dict[str, list[Path]]:
    """Image files per class sub-folder of `folder`, sorted so a seed picks the same ones every time."""
    return {
        d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(folder.iterdir()) if d.is_dir()
    }


def resave(source: Path, target_stem: Path, rng: random.Random, formats=FORMATS) -> Path:
    """Writes `source` in a format drawn from `formats`, sometimes enlarged (1.5-2.5x) or stretched to 4:3."""
    suffix, fmt, mode, _ = rng.choices(formats, weights=[f[3] for f in formats])[0]
    with Image.open(source) as image:
        image = image.convert("RGB")
        width, height = image.size
        shape = rng.random()
        if shape < 0.2:
            scale = rng.uniform(1.5, 2.5)
            image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
        elif shape < 0.35:
            image = image.resize((round(width * 4 / 3), height), Image.Resampling.BICUBIC)
        if mode == "RGBA":
            image = image.convert("RGBA")
        target = target_stem.with_suffix(suffix)
        image.save(target, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="folder with <class>/ or train/<class>/ sub-folders")
    parser.add_argument("--out", required=True, help="new folder to create (must not exist)")
    parser.add_argument("--classes", type=int, default=0, help="use the first N classes (0: all)")
    parser.add_argument("--train_per_class", type=int, default=200)
    parser.add_argument("--test_per_class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keras_readable", action="store_true",
                        help="no WebP, HEIC or AVIF (Keras's folder loader skips them), for a like-for-like comparison")
    args = parser.parse_args(argv)

    source, out = Path(args.source), Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; pick a new folder")
    train_source = source / "train" if (source / "train").is_dir() else source
    held_out = next((source / n for n in ("validation", "val", "test") if (source / n).is_dir()), None)
    train_files = class_files(train_source)
    test_files = class_files(held_out) if held_out else None
    names = list(train_files)[: args.classes or None]
    formats = tuple(f for f in FORMATS if not (args.keras_readable and f[1] in KERAS_UNREADABLE))
    rng = random.Random(args.seed)
    for name in names:
        pool = list(train_files[name])
        rng.shuffle(pool)
        if test_files is None:  # One folder: the test photos are the first ones drawn, never reused.
            test, train = pool[: args.test_per_class], pool[args.test_per_class:]
        else:
            test, train = list(test_files[name]), pool
            rng.shuffle(test)
        for split, files, count in (("train", train, args.train_per_class), ("test", test, args.test_per_class)):
            if len(files) < count:
                raise SystemExit(f"class {name!r} has {len(files)} {split} photos, fewer than {count}")
            folder = out / split / name
            folder.mkdir(parents=True)
            for index, path in enumerate(files[:count]):
                resave(path, folder / f"{name}_{index:04d}", rng, formats)
    print(f"wrote {out}: {len(names)} classes, {args.train_per_class} train + {args.test_per_class} test photos each")


if __name__ == "__main__":
    main()
