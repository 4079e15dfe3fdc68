"""Inpainting masks: seeded random rectangles and brush strokes, supplied masks, masked images, and each
record's mask variants encoded once for the inpainting recipe.

A mask is a ``[1, H, W]`` float tensor, 1 where the model must paint (the StableDiffusionInpaintPipeline
convention: white = repaint), 0 where the image is kept.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from sdtune.config import RunConfig
from sdtune.errors import DatasetError

from . import data as D


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
    gray = D.load_image(path, size)[0:1]  # [-1, 1] → the first channel is enough for a grey mask
    return (gray > 0.0).float()


def masked_image(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the region to paint blanked (0 in [-1, 1] pixel space, as the pipeline does)."""
    return pixels * (mask < 0.5)


@torch.no_grad()
def encode_mask_variants(parts, records, data_dir: Path, cfg: RunConfig, device):
    """For each record, ``inpaint_masks_per_image`` masks (supplied first, then seeded random ones) at latent
    size ``[N, K, 1, h, w]`` and the VAE latents of the masked images ``[N, K, 4, h, w]`` (scaled). Also returns
    how many supplied masks were used."""
    tc, res = cfg.train, cfg.preprocess.resolution
    k = tc.inpaint_masks_per_image
    all_masks, all_pixels, supplied = [], [], 0
    for record in records:
        pixels = D.load_image(Path(data_dir) / record.file, res)
        masks = []
        if tc.inpaint_masks in ("supplied", "both") and record.extra.get("mask"):
            masks.append(load_mask(Path(data_dir) / record.extra["mask"], res))
            supplied += 1
        elif tc.inpaint_masks == "supplied":
            raise DatasetError(
                f"{record.file}: train.inpaint_masks=supplied but the record has no mask (run preprocess with "
                "preprocess.mask_prompt, or use inpaint_masks=both)"
            )
        if tc.inpaint_masks != "supplied":
            masks += [random_mask(res, mask_seed(tc.seed, record.sha256, j)) for j in range(k - len(masks))]
        masks = (masks * k)[:k]  # supplied only: the one mask, repeated
        all_masks.append(torch.stack(masks))
        all_pixels.append(torch.stack([masked_image(pixels, m) for m in masks]))
    masks = torch.stack(all_masks)  # [N, K, 1, H, W]
    n = masks.shape[0]
    small, masked_latents = unet_mask_inputs(parts.vae, torch.cat(all_pixels), masks.flatten(0, 1), device)
    return (
        small.reshape(n, k, *small.shape[1:]),
        masked_latents.reshape(n, k, *masked_latents.shape[1:]),
        supplied,
    )


@torch.no_grad()
def unet_mask_inputs(vae, masked_pixels: torch.Tensor, masks: torch.Tensor, device):
    """What a 9-channel UNet takes after the noisy latents, for masked images ``[N, 3, H, W]`` and their masks
    ``[N, 1, H, W]``: the masks at latent size (nearest) and the masked images' scaled latents (posterior mean,
    fp32), both on ``device``. Training and evaluation build them here, so they match."""
    mean, _ = D.encode_images(vae, masked_pixels.to(vae.dtype), device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = (mean.float() - shift) * vae.config.scaling_factor
    return F.interpolate(masks.float(), size=mean.shape[-2:]).to(device), latents


def validation_inputs(record, data_dir: Path, cfg: RunConfig) -> dict:
    """The first training image with a centred square (half the side) to fill."""
    from PIL import Image

    res = cfg.preprocess.resolution
    with Image.open(Path(data_dir) / record.file) as im:
        image = im.convert("RGB").resize((res, res))
    mask = Image.new("L", (res, res), 0)
    mask.paste(255, (res // 4, res // 4, 3 * res // 4, 3 * res // 4))
    return {"image": image, "mask_image": mask}
