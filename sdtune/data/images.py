"""Decode untrusted image bytes into an upright 8-bit sRGB ``PIL.Image``, or raise :class:`SkipItem`.

Everything Pillow can be tricked with is handled here, in this order: sniff the format from the bytes
(never the extension), refuse decompression bombs before any pixel is decoded, force a full decode (a
lazy decode would let a truncated file through to training), then normalise what can be normalised:
first frame of an animation, EXIF orientation, ICC/CMYK → sRGB, 16-bit → 8-bit, transparency composited
onto a background colour.

HEIC/HEIF (iPhone photos) decode through the optional ``pillow-heif`` plugin (``pip install
'sdtune[heif]'``), registered with Pillow the first time a HEIF file is seen; without it they are skipped
with ``unsupported_format`` and a detail naming the extra.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageCms, ImageColor, ImageFile, ImageOps

from sdtune.data.reasons import SkipItem

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
PLUGIN_FORMATS = ("HEIF",)  # allowed when their optional plugin imports
HEIF_MISSING = "HEIC/HEIF needs the optional plugin: pip install 'sdtune[heif]' (or convert to JPEG or PNG)"
_heif_ready: bool | None = None  # None: not tried yet


def heif_available() -> bool:
    """Whether HEIF decodes here: registers ``pillow_heif``'s Pillow opener once, on first use."""
    global _heif_ready
    if _heif_ready is None:
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            _heif_ready = False
        else:
            register_heif_opener()
            _heif_ready = True
    return _heif_ready


@dataclass
class Decoded:
    image: Image.Image  # mode "RGB", upright
    format: str
    transforms: list[str] = field(default_factory=list)


def sniff_format(head: bytes) -> str | None:
    """The container format named by the first bytes, or None. ``HEIF``/``AVIF``/``ARCHIVE`` are known but refused."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 26:
        return "BMP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "AVIF" if brand in (b"avif", b"avis") else "HEIF"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!", b"BZh")):
        return "ARCHIVE"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "ARCHIVE"
    return None


CONVERT_BLOCK_PIXELS = 1 << 20


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb check with our limit, and its *warning* (between 1x and 2x the limit) made an error."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode_image(
    data: bytes, *, max_pixels: int, background: str = "white", min_side: int = 1, max_aspect: float = 0.0
) -> Decoded:
    """Fully decode ``data`` and normalise it to upright RGB; raise :class:`SkipItem` on anything bad."""
    if not data:
        raise SkipItem("empty_file", "0 bytes")
    fmt = sniff_format(data[:512])
    if fmt is None:
        raise SkipItem("not_an_image", "unknown file signature")
    if fmt == "ARCHIVE":
        raise SkipItem("nested_archive", "an archive, not an image")
    if fmt == "HEIF" and not heif_available():
        raise SkipItem("unsupported_format", HEIF_MISSING)
    if fmt not in ALLOWED_FORMATS + PLUGIN_FORMATS:
        raise SkipItem("unsupported_format", f"{fmt} is not supported; convert to JPEG or PNG")
    # A process-wide flag some libraries flip; with it set, truncated files would decode as grey.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with pixel_limit(max_pixels):
            # Pillow checks the declared size here, before decoding a pixel.
            im = Image.open(io.BytesIO(data), formats=[fmt])
            transforms = []
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
                transforms.append("first_frame")
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipItem("pixel_bomb", _one_line(exc)) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise SkipItem(reason, _one_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - decoders raise anything (SyntaxError, struct.error, …) on bad input
        raise SkipItem("corrupt", f"{type(exc).__name__}: {_one_line(exc)}") from None

    try:
        image = _normalise(im, background, transforms)
    except Exception as exc:  # noqa: BLE001 - same reason: hostile pixel data can break any conversion
        raise SkipItem("corrupt", f"cannot convert mode {im.mode}: {_one_line(exc)}") from None
    short, long = sorted(image.size)
    if short < min_side:
        raise SkipItem("too_small", f"{image.width}x{image.height}, shorter side below min_side={min_side}")
    if max_aspect and long / short > max_aspect:
        raise SkipItem(
            "extreme_aspect", f"{image.width}x{image.height} is over max_aspect_ratio={max_aspect}"
        )
    return Decoded(image=image, format=fmt, transforms=transforms)


def _normalise(im: Image.Image, background: str, transforms: list[str]) -> Image.Image:
    icc = im.info.get("icc_profile")
    orientation = im.getexif().get(0x0112)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        im = ImageOps.exif_transpose(im)
        transforms.append("exif_transpose")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _to_8bit(im)
        transforms.append("scale_16bit")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        transforms.append("palette_to_rgb")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    alpha = None
    if im.mode == "RGBA":
        alpha = im.getchannel("A")
        im = im.convert("RGB")
    if im.mode == "1":
        im = im.convert("L")
    im = _to_srgb(im, icc, transforms)
    if alpha is not None and alpha.getextrema()[0] < 255:
        canvas = Image.new("RGB", im.size, ImageColor.getrgb(background))
        canvas.paste(im, mask=alpha)
        im = canvas
        transforms.append("alpha_composite")
    return im


def _to_srgb(im: Image.Image, icc: bytes | None, transforms: list[str]) -> Image.Image:
    """Apply an embedded ICC profile (CMYK catalogue JPEGs, Display-P3 phone photos), else convert plainly."""
    if icc and im.mode in ("RGB", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            if "srgb" not in ImageCms.getProfileDescription(src).lower():
                out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
                transforms.append("icc_to_srgb")
                return out
        except (ImageCms.PyCMSError, OSError, ValueError):
            transforms.append("icc_ignored")  # a broken profile is not worth losing the image over
    if im.mode == "RGB":
        return im
    transforms.append("cmyk_to_rgb" if im.mode == "CMYK" else f"{im.mode.lower()}_to_rgb")
    return im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale high-bit-depth greys to 0..255 (Pillow's own convert("L") clamps, turning most photos white).

    Row blocks of float32: converting a whole 60-megapixel 16-bit image in float64 at once held ~20 bytes
    per pixel (1.2 GB for a 123 KB PNG); this holds the 8-bit result plus one block."""
    arr = np.asarray(im)
    peak = float(arr.max(initial=0))
    top = 65535.0 if im.mode != "F" or peak > 1.0 else 1.0
    if peak > top:  # 32-bit data: fall back to the image's own range
        top = peak
    out = np.empty(arr.shape, dtype=np.uint8)
    rows = max(1, CONVERT_BLOCK_PIXELS // max(1, arr.shape[1] if arr.ndim > 1 else 1))
    for start in range(0, arr.shape[0], rows):
        block = arr[start : start + rows].astype(np.float32)
        np.clip(block, 0, None, out=block)
        block *= np.float32(255.0 / top)
        out[start : start + rows] = np.rint(block, out=block)
    return Image.fromarray(out)


def pixel_digest_bytes(image: Image.Image) -> bytes:
    """What exact pixel dedup hashes: size and RGB bytes, independent of the file format."""
    return f"{image.width}x{image.height}:".encode() + image.tobytes()


def _one_line(exc: BaseException) -> str:
    # Pillow names the stream it was given ("cannot identify image file <_io.BytesIO object at 0x…>").
    text = re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-f]+>", "", str(exc))
    return " ".join(text.split())[:200]
