"""Subject-specific numbers for :mod:`sdtune.evaluate`: model-free loss references and an image-space distance.

- :func:`reference_losses`: what two predictors that never look at the picture score on the same noise as the
  models: ``zero`` (always predicts 0; for ε-prediction ≈ 1) and ``variance`` (the best predictor that knows
  only each latent channel's variance: the Gaussian posterior mean of the target given the noisy latent).
  A model's loss near ``zero`` has learned nothing; a drop toward ``variance`` can come from the latent
  statistics alone, so it is no evidence of a subject being learned.
- :func:`hue_histogram` / :func:`hue_distance`: an image-space distance between two sets of pictures: 1 − the
  intersection of the pooled hue histograms of their *saturated* pixels (grey, white, black and muted pixels do
  not count). 0 = the same colourful make-up, 1 = no hue in common. Cheap, model-free and blind to shape: it
  sees a subject's palette. Greyish backgrounds and a sampler's muddy scenery do not vote, so a sample that
  draws the subject's colours on another background still scores close (a joint RGB histogram is ruled by
  the background: it scored tuned samples that plainly showed the orange robot *farther* than the base's).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def reference_losses(
    latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps, prediction_type: str
) -> dict[str, float]:
    """Mean MSE over ``timesteps`` of the two model-free predictors for ``x_t = √ᾱ·x0 + √(1-ᾱ)·ε``."""
    var = latents.var(dim=(0, 2, 3), keepdim=True)  # per channel, over the held-out latents
    zero = variance = 0.0
    for t in timesteps:
        abar = float(alphas_cumprod[int(t)])
        c, d = abar**0.5, (1 - abar) ** 0.5
        # target = a·x0 + b·ε: ε-prediction, v-prediction (v = √ᾱ·ε − √(1-ᾱ)·x0) or the clean sample
        a, b = {"epsilon": (0.0, 1.0), "v_prediction": (-d, c), "sample": (1.0, 0.0)}[prediction_type]
        target = a * latents + b * noise
        noisy = c * latents + d * noise
        # Gaussian x0 ~ N(0, var), ε ~ N(0, 1): E[a·x0 + b·ε | x_t] = (a·c·var + b·d) / (c²·var + d²) · x_t
        best = (a * c * var + b * d) / (c * c * var + d * d) * noisy
        zero += float((target**2).mean())
        variance += float(((target - best) ** 2).mean())
    n = len(timesteps)
    return {"zero": zero / n, "variance": variance / n}


def flow_reference_losses(latents: torch.Tensor, noise: torch.Tensor, sigmas) -> dict[str, float]:
    """The same two references for flow matching: ``x_σ = (1-σ)·x0 + σ·n``, target ``n − x0``."""
    var = latents.var(dim=(0, 2, 3), keepdim=True)
    zero = variance = 0.0
    for s in sigmas:
        a, b, c, d = -1.0, 1.0, 1.0 - s, s
        target = a * latents + b * noise
        best = (a * c * var + b * d) / (c * c * var + d * d) * (c * latents + d * noise)
        zero += float((target**2).mean())
        variance += float(((target - best) ** 2).mean())
    n = len(sigmas)
    return {"zero": zero / n, "variance": variance / n}


def hue_histogram(
    images: list[Image.Image],
    bins: int = 12,
    min_saturation: float = 0.35,
    min_value: float = 0.25,
    size: int | None = 32,
) -> tuple[np.ndarray, float]:
    """Pooled hue histogram of the saturated pixels of ``images`` (each resized to ``size``² so each counts the
    same, or taken as it is with ``size=None``; a pixel's vote split between its two nearest bin centres, so a
    hue on a bin edge does not flip), sum 1 (all zeros when no pixel is saturated), and the share of pixels
    that voted."""
    counts = np.zeros(bins)
    voters = pixels = 0
    for image in images:
        small = image.convert("RGB")
        if size is not None:
            small = small.resize((size, size), Image.Resampling.BILINEAR)
        pixels += small.width * small.height
        hsv = np.asarray(small.convert("HSV"), dtype=np.float64) / 255.0
        vivid = (hsv[..., 1] >= min_saturation) & (hsv[..., 2] >= min_value)
        position = hsv[..., 0][vivid] * bins - 0.5  # bin centres at (i + 0.5) / bins
        low = np.floor(position)
        upper_share = position - low
        np.add.at(counts, low.astype(int) % bins, 1.0 - upper_share)
        np.add.at(counts, (low.astype(int) + 1) % bins, upper_share)
        voters += int(vivid.sum())
    total = counts.sum()
    return (counts / total if total else counts), voters / max(1, pixels)


def hue_distance(
    images: list[Image.Image], references: list[Image.Image], bins: int = 12, size: int | None = 32
) -> float:
    """1 − intersection of the two sets' saturated-pixel hue histograms (0 = same colours; 1 = none shared, or
    one set has no colourful pixel at all); ``size`` as in :func:`hue_histogram`."""
    mine, _ = hue_histogram(images, bins, size=size)
    theirs, _ = hue_histogram(references, bins, size=size)
    if not mine.any() and not theirs.any():
        return 0.0
    return float(1.0 - np.minimum(mine, theirs).sum())
