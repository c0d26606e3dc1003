"""Perceptual and content fingerprints, and the duplicate search built on them."""

from __future__ import annotations

import numpy as np

from helpers import near_copy, smooth_random_image
from imgclf_jax import fingerprints


def test_perceptual_hash_survives_re_encoding_but_tells_photos_apart():
    hashes = [fingerprints.perceptual_hash(smooth_random_image(seed)) for seed in range(20)]
    for seed, h in enumerate(hashes):
        assert len(h) == 16
        copy = fingerprints.perceptual_hash(near_copy(smooth_random_image(seed)))
        assert fingerprints.hamming_distance(h, copy) <= fingerprints.DEFAULT_NEAR_THRESHOLD
    distances = [fingerprints.hamming_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(distances) > fingerprints.DEFAULT_NEAR_THRESHOLD
    assert 20 < np.mean(distances) < 44  # Unrelated pictures differ in about half of the 64 bits.


def test_near_pairs_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 300, dtype=np.uint64)
    hashes[7] = hashes[250] ^ np.uint64(0b1011)  # 3 bits apart.
    found = set(fingerprints.near_pairs(hashes, 20, chunk=64))
    expected = {(i, j, bin(int(hashes[i]) ^ int(hashes[j])).count("1"))
                for i in range(300) for j in range(i + 1, 300)
                if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 20}
    assert found == expected and (7, 250, 3) in found


def test_find_duplicates_pairs_exact_copies_once_and_skips_unfingerprinted_files():
    f = lambda path, split, digest, phash: fingerprints.FileFingerprint(path, split, "a", digest, phash)
    files = [f("a", "train", "d1", "0" * 16), f("b", "validation", "d1", "0" * 16),
             f("c", "train", "d2", "0" * 15 + "3"), f("d", "train", "d3", "f" * 16), f("e", "train", "", "")]
    pairs = fingerprints.find_duplicates(files, threshold=2)
    assert [(p.first.path, p.second.path, p.kind, p.distance, p.cross_split) for p in pairs] == [
        ("a", "b", "exact", None, True), ("a", "c", "near", 2, False)]
    assert [p.kind for p in fingerprints.find_duplicates(files, threshold=-1)] == ["exact"]


def test_tiny_images_are_not_near_copies_but_exact_copies_still_are():
    from sklearn.datasets import load_digits

    digits = load_digits().images[:300]
    tiny = [np.repeat((d * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1) for d in digits]
    assert {fingerprints.perceptual_hash(image) for image in tiny} == {""}
    files = [fingerprints.FileFingerprint(f"{i}.png", "train" if i % 2 else "validation", "a",
                                          f"digest{i}", "") for i in range(300)]
    files.append(fingerprints.FileFingerprint("copy.png", "validation", "a", "digest1", ""))
    pairs = fingerprints.find_duplicates(files)
    assert [(p.first.path, p.second.path, p.kind) for p in pairs] == [("1.png", "copy.png", "exact")]
    photo = smooth_random_image(3)  # A resized, re-encoded photo across splits is still a near copy.
    assert fingerprints.hamming_distance(fingerprints.perceptual_hash(photo),
                                         fingerprints.perceptual_hash(near_copy(photo))) <= 6
