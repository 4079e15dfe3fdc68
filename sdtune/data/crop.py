"""Crop boxes: centred square, square around faces, aspect-ratio buckets. Pure arithmetic on sizes."""

from __future__ import annotations

from collections.abc import Sequence

Box = tuple[int, int, int, int]  # left, top, right, bottom
BUCKET_STEP = 64


def center_box(width: int, height: int) -> Box:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def face_box(width: int, height: int, faces: Sequence[Box]) -> Box | None:
    """The largest square that keeps the faces as central as the image allows; None without faces.

    The square is centred on the box around all faces, or on the largest face when they do not all fit
    (a group photo cropped to a square keeps its main subject), then shifted back inside the image.
    """
    if not faces:
        return None
    side = min(width, height)
    union = (
        min(f[0] for f in faces),
        min(f[1] for f in faces),
        max(f[2] for f in faces),
        max(f[3] for f in faces),
    )
    if union[2] - union[0] > side or union[3] - union[1] > side:
        union = max(faces, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
    cx, cy = (union[0] + union[2]) / 2, (union[1] + union[3]) / 2
    left = min(max(round(cx - side / 2), 0), width - side)
    top = min(max(round(cy - side / 2), 0), height - side)
    return left, top, left + side, top + side


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket for an aspect ratio: sides multiples of 64, area at most about resolution²."""
    scale = (resolution * resolution / (width * height)) ** 0.5
    w = max(BUCKET_STEP, int(width * scale) // BUCKET_STEP * BUCKET_STEP)
    h = max(BUCKET_STEP, int(height * scale) // BUCKET_STEP * BUCKET_STEP)
    return w, h


def bucket_box(width: int, height: int, target: tuple[int, int]) -> Box:
    """The centred box with the bucket's aspect ratio (crops the few pixels that do not fit)."""
    ratio = target[0] / target[1]
    cw, ch = min(width, round(height * ratio)), min(height, round(width / ratio))
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch
