"""Inpainting masks: seeded random rectangles and brush strokes, supplied masks, masked images.

A mask is a ``[1, H, W]`` float tensor, 1 where the model must paint (the StableDiffusionInpaintPipeline
convention: white = repaint), 0 where the image is kept.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def random_mask(size: int, seed: int) -> torch.Tensor:
    """A rectangle (half the time) or 1–4 thick brush strokes, drawn from ``seed`` alone."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        w, h = (rng.uniform(0.25, 0.75, 2) * size).astype(int)
        x, y = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
        draw.rectangle((x, y, x + w, y + h), fill=255)
    else:
        for _ in range(rng.integers(1, 5)):
            points = [tuple(rng.integers(0, size, 2).tolist())]
            for _ in range(rng.integers(2, 6)):
                angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.4) * size
                x, y = points[-1]
                points.append(
                    (
                        int(np.clip(x + length * np.cos(angle), 0, size - 1)),
                        int(np.clip(y + length * np.sin(angle), 0, size - 1)),
                    )
                )
            width = max(1, int(rng.uniform(0.05, 0.15) * size))
            draw.line(points, fill=255, width=width, joint="curve")
            for x, y in points:
                draw.ellipse((x - width // 2, y - width // 2, x + width // 2, y + width // 2), fill=255)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def mask_seed(train_seed: int, image_sha256: str, k: int) -> int:
    """Per image and variant, independent of rank count and order: the same masks for the same data."""
    digest = hashlib.sha256(f"{train_seed}:{image_sha256}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def load_mask(path: Path, size: int) -> torch.Tensor:
    """A supplied mask (white = repaint), resized like the image (shorter side, centre crop), binarised."""
    from .data import load_image

    gray = load_image(path, size)[0:1]  # [-1, 1] → the first channel is enough for a grey mask
    return (gray > 0.0).float()


def masked_image(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the region to paint blanked (0 in [-1, 1] pixel space, as the pipeline does)."""
    return pixels * (mask < 0.5)
