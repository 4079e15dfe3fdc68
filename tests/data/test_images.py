"""decode_image: sniffing, bombs, truncation and every normalisation, on images built here."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from data_helpers import encode, pattern
from PIL import Image, ImageCms

from sdtune.data.images import decode_image, sniff_format
from sdtune.data.reasons import SkipItem

LIMIT = 10_000_000


def decode(data: bytes, **kwargs):
    return decode_image(data, max_pixels=kwargs.pop("max_pixels", LIMIT), **kwargs)


def skip_reason(data: bytes, **kwargs) -> str:
    with pytest.raises(SkipItem) as info:
        decode(data, **kwargs)
    return info.value.reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats_sniffed_from_bytes(fmt):
    decoded = decode(encode(pattern(), fmt))
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB" and decoded.image.size == (96, 96)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"hello, not an image at all", "not_an_image"),
        (b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00", "unsupported_format"),  # HEIC: test_heif.py
        (b"PK\x03\x04" + b"\x00" * 40, "nested_archive"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "corrupt"),
    ],
)
def test_bad_bytes_are_skipped_with_a_reason(data, reason):
    assert skip_reason(data) == reason


def test_truncated_files_are_skipped():
    for fmt in ("JPEG", "PNG"):
        data = encode(pattern(256, 256), fmt)
        assert skip_reason(data[: len(data) // 2]) in ("truncated", "corrupt")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming huge dimensions (a few bytes on disk): the pixel-bomb shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\x00" * 10)
    chunk += struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_pixel_bomb_refused_before_decoding():
    assert skip_reason(_png_header_only(100_000, 100_000)) == "pixel_bomb"
    # Between 1x and 2x of the limit Pillow only warns; that warning is an error here.
    assert skip_reason(encode(pattern(120, 100)), max_pixels=10_000) == "pixel_bomb"
    assert Image.MAX_IMAGE_PIXELS != 10_000  # the limit is restored afterwards


def test_sixteen_bit_grey_is_scaled_not_clamped():
    ramp = (np.linspace(0, 65535, 128 * 128).reshape(128, 128)).astype(np.uint16)
    decoded = decode(encode(Image.fromarray(ramp), "PNG"))
    assert "scale_16bit" in decoded.transforms
    grey = np.asarray(decoded.image)[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    assert 100 < grey.mean() < 155  # clamping would make nearly everything 255


def test_rgba_is_composited_on_the_background():
    im = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 32, 64))
    white = decode(encode(im, "PNG")).image
    assert white.getpixel((48, 10)) == (255, 255, 255) and white.getpixel((10, 10)) == (0, 0, 255)
    black = decode(encode(im, "PNG"), background="black")
    assert black.image.getpixel((48, 10)) == (0, 0, 0)
    assert "alpha_composite" in black.transforms


def test_opaque_rgba_is_not_reported_as_composited():
    decoded = decode(encode(pattern().convert("RGBA"), "PNG"))
    assert "alpha_composite" not in decoded.transforms


@pytest.mark.parametrize("mode", ["P", "LA", "L", "1"])
def test_other_modes_become_rgb(mode):
    im = pattern().convert(mode)
    if mode == "P":
        im.info["transparency"] = 0
    decoded = decode(encode(im, "PNG"))
    assert decoded.image.mode == "RGB"


def test_cmyk_jpeg_with_and_without_icc():
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # pure red ink
    plain = decode(encode(cmyk, "JPEG", quality=95))
    assert "cmyk_to_rgb" in plain.transforms
    r, g, b = plain.image.getpixel((32, 32))
    assert r > 200 and g < 60 and b < 60


def test_icc_profile_is_applied_unless_already_srgb():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert "icc_to_srgb" not in decode(encode(pattern(), "PNG", icc_profile=srgb)).transforms
    # Pillow cannot build a wide-gamut profile, so rename the built-in one: the transform path then runs.
    renamed = srgb.replace("sRGB".encode("utf-16-be"), "oRGB".encode("utf-16-be"))
    decoded = decode(encode(pattern(), "PNG", icc_profile=renamed))
    assert "icc_to_srgb" in decoded.transforms
    diff = np.abs(np.asarray(decoded.image, dtype=int) - np.asarray(pattern(), dtype=int))
    assert diff.max() <= 2  # same colour space in, same colours out


def test_broken_icc_profile_does_not_lose_the_image():
    decoded = decode(encode(pattern(), "PNG", icc_profile=b"not a profile"))
    assert "icc_ignored" in decoded.transforms


_TRANSPOSE_FOR = {  # what a camera did to the pixels for each EXIF orientation; exif_transpose undoes it
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_come_out_upright(orientation):
    upright = pattern(96, 64)
    op = _TRANSPOSE_FOR[orientation]
    stored = upright.transpose(op) if op is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode(encode(stored, "PNG", exif=exif))
    assert decoded.image.tobytes() == upright.tobytes()
    assert ("exif_transpose" in decoded.transforms) == (orientation != 1)


def test_animated_gif_keeps_the_first_frame():
    frames = [pattern(seed=s).convert("P") for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    decoded = decode(buf.getvalue())
    assert "first_frame" in decoded.transforms
    assert decoded.image.tobytes() == frames[0].convert("RGB").tobytes()


def test_size_rules():
    assert skip_reason(encode(pattern(400, 40)), max_aspect=4.0) == "extreme_aspect"
    assert skip_reason(encode(pattern(30, 30)), min_side=64) == "too_small"


def test_sniff_ignores_extensions_and_knows_archives():
    assert sniff_format(encode(pattern(), "PNG")[:16]) == "PNG"
    assert sniff_format(b"Rar!\x1a\x07\x00") == "ARCHIVE"
    assert sniff_format(b"GIF89a....") == "GIF"
