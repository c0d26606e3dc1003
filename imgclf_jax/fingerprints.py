"""Image fingerprints and the duplicates they reveal.

Two fingerprints per file, both computed during the scan's decode check (so the trainer gets them for free):
- `content_digest`: a hash of the file's bytes; equal digests are the same file (exact duplicates).
- `perceptual_hash`: a 64-bit DCT hash of the picture (pHash: the signs of the lowest 8x8 frequencies of a
  32x32 grayscale thumbnail against their median). Re-encoding, resizing and small colour changes move it
  by a few bits; different photos differ in about half of them. Pairs within `threshold` bits are
  near-duplicates.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

HASH_SIZE = 8  # 8x8 frequencies = 64 bits.
_THUMB_SIZE = 32
DEFAULT_NEAR_THRESHOLD = 6  # Bits; see docs/doctor.md for the distances measured on real photos.
# Pictures with a shorter side below this are not perceptually hashed: the hash's 32x32 thumbnail of an 8x8
# digit is mostly interpolation, and distinct digits then fall within the threshold (hundreds of false
# "near copies" among 1,797 handwritten digits). Their exact copies are still found by digest.
MIN_HASH_SIDE = 32


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: coefficients = M @ signal."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(_THUMB_SIZE)


def content_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def perceptual_hash(rgb: np.ndarray) -> str:
    """64-bit pHash of an (H, W, 3) uint8 image, as 16 hex digits; '' for an image too small to compare
    (`MIN_HASH_SIDE`)."""
    if min(rgb.shape[:2]) < MIN_HASH_SIDE:
        return ""
    thumb = Image.fromarray(rgb).convert("L").resize((_THUMB_SIZE, _THUMB_SIZE), Image.Resampling.BOX)
    pixels = np.asarray(thumb, np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = low > np.median(low[1:])  # The DC term (overall brightness) is left out of the median.
    return f"{int(np.packbits(bits).view('>u8')[0]):016x}"


def hash_array(hashes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def hamming_distance(a: str, b: str) -> int:
    return int(np.bitwise_count(np.uint64(int(a, 16)) ^ np.uint64(int(b, 16))))


def near_pairs(hashes: np.ndarray, threshold: int, chunk: int = 1024) -> Iterable[tuple[int, int, int]]:
    """(i, j, distance) for every i < j whose hashes differ in at most `threshold` bits."""
    n = len(hashes)
    for start in range(0, n, chunk):
        block = hashes[start:start + chunk]
        distances = np.bitwise_count(block[:, None] ^ hashes[None, :])
        rows, cols = np.nonzero(distances <= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if c > start + r:
                yield start + r, c, int(distances[r, c])


@dataclasses.dataclass(frozen=True)
class FileFingerprint:
    """One usable file: where it is (split, class) and its two fingerprints."""

    path: str
    split: str
    label: str
    digest: str
    phash: str


@dataclasses.dataclass(frozen=True)
class DuplicatePair:
    """Two files with the same content (`distance` None) or a perceptual distance of `distance` bits."""

    first: FileFingerprint
    second: FileFingerprint
    distance: int | None

    @property
    def kind(self) -> str:
        return "exact" if self.distance is None else "near"

    @property
    def cross_split(self) -> bool:
        return self.first.split != self.second.split

    @property
    def label_conflict(self) -> bool:
        return self.first.label != self.second.label


def find_duplicates(files: Sequence[FileFingerprint], threshold: int = DEFAULT_NEAR_THRESHOLD,
                    ) -> list[DuplicatePair]:
    """Exact duplicates (same digest; each copy paired with the group's first file), then near-duplicates
    (pHash within `threshold` bits) that are not exact copies, each pair once. A negative threshold skips
    the near-duplicate search. Files without a digest (not from a folder scan) are left out, and files without
    a pHash (too small) from the near-duplicate search."""
    pairs: list[DuplicatePair] = []
    first_of_digest: dict[str, FileFingerprint] = {}
    for f in files:
        if not f.digest:  # Not fingerprinted (not from a folder scan).
            continue
        if f.digest in first_of_digest:
            pairs.append(DuplicatePair(first_of_digest[f.digest], f, None))
        else:
            first_of_digest[f.digest] = f
    if threshold >= 0:
        unique = [f for f in first_of_digest.values() if f.phash]  # An exact copy is already reported once.
        for i, j, distance in near_pairs(hash_array([f.phash for f in unique]), threshold):
            pairs.append(DuplicatePair(unique[i], unique[j], distance))
    return pairs
