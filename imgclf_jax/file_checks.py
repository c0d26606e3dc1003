"""The scan's decode check of each candidate file: usable or not (and why), with its fingerprints; run in
parallel and cached per file (size, modification time, pixel limit) in the user's cache, so a second scan of
a folder does not decode again."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import tqdm
from PIL import Image

from imgclf_jax import fingerprints, image_io, user_cache

log = logging.getLogger(__name__)

_SCAN_CACHE_VERSION = 5  # 3: HEIF and AVIF are images; 4: no pHash for tiny images; 5: shorter sides.


@dataclasses.dataclass(frozen=True)
class FileCheck:
    """The scan's verdict on one file: `reason` is '' if usable; fingerprints only then."""

    reason: str
    digest: str = ""
    phash: str = ""
    short_side: int = 0  # The photo's shorter side in pixels, as stored.


def _cache_path(root: Path) -> Optional[Path]:
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(user_cache.cache_dir()) / f"scan-{digest}.json"


def _load_scan_cache(path: Optional[Path]) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return data["entries"] if data.get("version") == _SCAN_CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _save_scan_cache(path: Optional[Path], entries: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": _SCAN_CACHE_VERSION, "entries": entries}))
        os.replace(tmp, path)
    except OSError as e:  # A read-only home must not stop training; the scan just is not cached.
        log.debug("Could not write the scan cache %s: %s", path, e)


def check_file(path: str, max_pixels: int) -> FileCheck:
    """Decodes the file (small: a reduced DCT scale still reads the whole JPEG stream, so truncation is
    caught cheaply) and fingerprints it, or says why it cannot be used."""
    try:
        image = image_io.load_image(path, min_size=64, max_pixels=max_pixels)  # Enough for the pHash.
        with open(path, "rb") as f:
            digest = fingerprints.content_digest(f.read())
        with Image.open(path) as header:  # The size as stored (the decode above may have been reduced).
            short_side = min(header.size)
    except image_io.UnusableImageError as e:
        return FileCheck(str(e))
    except OSError as e:
        return FileCheck(f"cannot read file ({e.strerror or e})")
    return FileCheck("", digest, fingerprints.perceptual_hash(image), short_side)


def check_files(paths: Sequence[str], root: Path, max_pixels: int) -> dict[str, FileCheck]:
    """Decode-checks and fingerprints files in parallel; cached per size, mtime and pixel limit."""
    cache_file = _cache_path(root)
    cache = _load_scan_cache(cache_file)
    verdicts, todo, keys = {}, [], {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as e:
            verdicts[path] = FileCheck(f"cannot read file ({e.strerror or e})")
            continue
        key = [st.st_size, st.st_mtime_ns, max_pixels]
        keys[path] = key
        entry = cache.get(path)
        if entry is not None and entry[:3] == key:
            verdicts[path] = FileCheck(*entry[3:])
        else:
            todo.append(path)
    if todo:
        workers = min(32, (os.cpu_count() or 1) * 2)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = pool.map(lambda p: check_file(p, max_pixels), todo)
            for path, check in tqdm.tqdm(
                zip(todo, results),
                total=len(todo),
                desc="Checking images",
                unit="img",
                disable=None,  # Terminals only.
                leave=False,
            ):
                verdicts[path] = check
                cache[path] = keys[path] + [check.reason, check.digest, check.phash, check.short_side]
        _save_scan_cache(cache_file, cache)
    return verdicts
