"""Reading one image file into an RGB uint8 array, the same way for training, evaluation and prediction.

Pillow decodes (it handles more real-world files than tf.io: CMYK JPEG, 16-bit PNG, palette GIF, WebP,
AVIF, EXIF orientation), with pillow-heif's opener for HEIC/HEIF, the format phones save photos in. Files
are recognised by their content, not by their extension.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, features

try:  # A dependency; without it (a platform with no wheel) HEIC photos are skipped with that reason.
    import pillow_heif
except ImportError:
    pillow_heif = None


@functools.cache
def _open_heif_with_pillow() -> None:
    """Teaches Pillow HEIC/HEIF (pillow-heif's opener) when the first such photo is read, once: it changes
    Pillow's global table of formats, so it is not done on import."""
    pillow_heif.register_heif_opener()

# Extensions that announce an image: such a file that cannot be decoded is reported, not silently ignored.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".webp", ".tif", ".tiff",
     ".heic", ".heif", ".avif"}
)
# Brands of the ISO media file ('ftyp' box) that mark a HEIF still image; 'avif' among them marks AVIF.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})

# Leading bytes of the formats we read. A file matching none of these is not an image.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000

# `load_image` enforces its own, configurable pixel limit from the header before decoding; Pillow's
# fixed global limit would otherwise override it (and warn) for large but legitimate photos.
Image.MAX_IMAGE_PIXELS = None


class UnusableImageError(Exception):
    """An image file that cannot be used; the message says why, in words a user understands."""


def sniff_format(header: bytes) -> Optional[str]:
    """Returns the image format named by a file's first bytes, or None if it is not an image we read."""
    if len(header) >= 12 and header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "WEBP"
    if len(header) >= 12 and header[4:8] == b"ftyp":  # Major brand, version, then compatible brands.
        box_end = min(int.from_bytes(header[:4], "big"), len(header))
        brands = {header[8:12]} | {header[i:i + 4] for i in range(16, box_end - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF"
    for signature, name in _SIGNATURES:
        if header.startswith(signature):
            return name
    return None


def read_header(path: str, size: int = 32) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def describe_non_image(header: bytes) -> str:
    """A short guess at what a file that is not an image is, for the skip reason."""
    if not header:
        return "empty file"
    text = header.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")):
        return "not an image (HTML/XML text)"
    if all(b >= 32 or b in b"\t\n\r" for b in header):  # UTF-8 text has no other control bytes.
        return "not an image (text)"
    return "not an image (unrecognised content)"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to RGB. Transparency is composited on white; 16-bit gray is rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if (mode.startswith("I;16") or values.max(initial=0) > 255) else 255.0
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def load_image(
    path: str,
    min_size: Optional[int] = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decodes an image file to an (H, W, 3) uint8 RGB array.

    Args:
      path: the file; its format is found from its content.
      min_size: if given, JPEGs may be decoded at a reduced DCT scale as long as both sides stay at
        least this large (much faster for big photos that are resized down anyway).
      max_pixels: images declaring more pixels are refused before anything is allocated
        (decompression bombs).

    Raises:
      UnusableImageError: with the reason, for anything that cannot be used.
    """
    try:
        header = read_header(path)
    except OSError as e:
        raise UnusableImageError(f"cannot read file ({e.strerror or e})") from None
    image_format = sniff_format(header)
    if image_format is None:
        raise UnusableImageError(describe_non_image(header))
    if image_format == "HEIF" and pillow_heif is None:
        raise UnusableImageError("HEIC/HEIF image, and pillow-heif is not installed (pip install pillow-heif)")
    if image_format == "HEIF":
        _open_heif_with_pillow()
    if image_format == "AVIF" and not features.check("avif"):
        raise UnusableImageError("AVIF image, and this Pillow has no AVIF support (Pillow >= 11.3 has)")
    try:
        image = Image.open(path)
        with image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise UnusableImageError(f"invalid image size {width}x{height}")
            if width * height > max_pixels:
                raise UnusableImageError(
                    f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
                    f"{max_pixels:,} (possible decompression bomb; raise max_image_pixels to allow it)"
                )
            if min_size and image.format == "JPEG":
                # EXIF rotation may swap the sides, so ask for min_size on both.
                image.draft("RGB", (min_size, min_size))
            image.load()
            image = ImageOps.exif_transpose(image)
            return np.asarray(_to_rgb(image), dtype=np.uint8)
    except UnusableImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower():
            reason = f"truncated image ({reason})"
        raise UnusableImageError(f"cannot decode: {reason}") from None


def is_junk_name(name: str) -> bool:
    """Operating-system litter that never counts as data (.DS_Store, Thumbs.db, ._resource forks...)."""
    lower = name.lower()
    return lower.startswith(".") or lower in ("thumbs.db", "desktop.ini", "ehthumbs.db")


def has_image_extension(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
