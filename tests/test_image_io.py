"""Decoding real-world image files: formats by content, odd modes, EXIF orientation, broken files."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from helpers import class_image, write_image
from imgclf_jax import image_io


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp"),
                                      ("WEBP", "webp"), ("TIFF", "tif"), ("HEIF", "heic"),
                                      ("AVIF", "avif")])
def test_formats_decode_to_rgb_uint8(tmp_path, fmt, ext):
    pixels = class_image(1, size=(31, 17))
    path = write_image(tmp_path / f"x.{ext}", pixels, fmt)
    image = image_io.load_image(str(path))
    assert image.shape == (17, 31, 3) and image.dtype == np.uint8


def test_format_is_found_from_content_not_extension(tmp_path):
    path = write_image(tmp_path / "actually_webp.jpg", class_image(0), "WEBP")
    assert image_io.sniff_format(image_io.read_header(str(path))) == "WEBP"
    assert image_io.load_image(str(path)).shape == (20, 24, 3)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(20 * 24, dtype=np.uint8).reshape(20, 24)
    path = write_image(tmp_path / "g.png", gray)
    image = image_io.load_image(str(path))
    assert image.shape == (20, 24, 3)
    np.testing.assert_array_equal(image[..., 0], gray)
    np.testing.assert_array_equal(image[..., 2], gray)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # Red...
    rgba[:2, :, 3] = 255  # ...opaque on the top half, fully transparent below.
    path = write_image(tmp_path / "a.png", rgba)
    image = image_io.load_image(str(path))
    np.testing.assert_array_equal(image[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(image[3, 3], [255, 255, 255])


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = image_io.load_image(str(path))
    np.testing.assert_array_equal(image[0, :, 0], [0, 128, 255])


def test_cmyk_jpeg_decodes(tmp_path):
    path = write_image(tmp_path / "cmyk.jpg", class_image(0), "JPEG", mode="CMYK")
    assert Image.open(path).mode == "CMYK"
    assert image_io.load_image(str(path)).shape == (20, 24, 3)


def test_palette_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image = image_io.load_image(str(path))
    assert image.shape == (6, 8, 3)
    assert image[0, 0, 0] > 200 and image[0, 0, 2] < 50


def test_exif_orientation_is_applied(tmp_path):
    pixels = class_image(0, size=(30, 10))  # Stored 30 wide, 10 high...
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # ...with "rotate 90 CW to display".
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    assert image_io.load_image(str(path)).shape == (30, 10, 3)


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("HEIF", "heic"), ("AVIF", "avif")])
def test_exif_orientation_turns_the_right_way_once(tmp_path, fmt, ext):
    ramp = np.repeat(np.linspace(0, 255, 40).astype(np.uint8)[None, :, None], 16, axis=0).repeat(3, axis=2)
    image = Image.fromarray(ramp)  # 40 wide, 16 high, dark on the left.
    exif = image.getexif()
    exif[0x0112] = 6  # Rotate 90 degrees clockwise to display: the left edge becomes the top.
    path = tmp_path / f"phone.{ext}"
    image.save(path, fmt, exif=exif.tobytes(), quality=95)
    loaded = image_io.load_image(str(path)).astype(float)
    assert loaded.shape == (40, 16, 3)
    assert loaded[:4].mean() < 40 and loaded[-4:].mean() > 215


def test_heif_without_pillow_heif_is_skipped_with_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "IMG_0001.HEIC"
    Image.fromarray(class_image(0)).save(path, "HEIF")
    assert image_io.sniff_format(image_io.read_header(str(path))) == "HEIF"
    monkeypatch.setattr(image_io, "pillow_heif", None)
    with pytest.raises(image_io.UnusableImageError, match="pip install pillow-heif"):
        image_io.load_image(str(path))


def test_jpeg_draft_keeps_at_least_min_size(tmp_path):
    path = write_image(tmp_path / "big.jpg", class_image(0, size=(800, 600)), "JPEG")
    image = image_io.load_image(str(path), min_size=100)
    assert min(image.shape[:2]) >= 100 and image.shape[0] < 600


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
    (b"just some notes\n", "text"),
    (bytes(range(256)) * 4, "unrecognised"),
])
def test_non_images_are_refused_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(image_io.UnusableImageError, match=reason):
        image_io.load_image(str(path))


def test_truncated_jpeg_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(class_image(0, size=(64, 64))).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(image_io.UnusableImageError, match="truncated"):
        image_io.load_image(str(path))


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = write_image(tmp_path / "wide.png", np.zeros((10, 100, 3), np.uint8))
    with pytest.raises(image_io.UnusableImageError, match="above the limit of 999"):
        image_io.load_image(str(path), max_pixels=999)
    assert image_io.load_image(str(path), max_pixels=1000).shape == (10, 100, 3)


def test_junk_names():
    assert image_io.is_junk_name(".DS_Store") and image_io.is_junk_name("Thumbs.db")
    assert image_io.is_junk_name("._cat.jpg") and not image_io.is_junk_name("cat.jpg")


@pytest.mark.slow
def test_bomb_header_is_refused_before_decoding_and_scanning_stays_small(tmp_path):
    import subprocess
    import sys

    from helpers import make_class_folder, png_bomb_bytes

    bomb = tmp_path / "d" / "x" / "bomb.png"
    make_class_folder(tmp_path / "d", {"x": 3, "y": 3})
    bomb.write_bytes(png_bomb_bytes())
    with pytest.raises(image_io.UnusableImageError, match="50000x50000 = 2,500,000,000 pixels, above the limit"):
        image_io.load_image(str(bomb))
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak memory is read from /proc (Linux)")
    # VmHWM is the peak of this process's own address space (ru_maxrss would include the forking parent's).
    code = ("import re, sys; from imgclf_jax import folders; "
            "f = folders.load_folder_dataset(sys.argv[1], 0.34); "
            "peak_kib = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "print(len(f.skipped), peak_kib // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True, text=True,
                         check=True).stdout.split()
    skipped, peak_mib = int(out[0]), int(out[1])
    assert skipped == 1
    assert peak_mib < 1024  # Decoding the bomb would need 7,000+ MiB.
