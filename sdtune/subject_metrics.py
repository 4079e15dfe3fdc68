"""Subject-specific numbers for :mod:`sdtune.evaluate`: model-free loss references and an image-space distance.

- :func:`reference_losses`: what two predictors that never look at the picture score on the same noise as the
  models: ``zero`` (always predicts 0; for ε-prediction ≈ 1) and ``variance`` (the best predictor that knows
  only each latent channel's variance: the Gaussian posterior mean of the target given the noisy latent).
  A model's loss near ``zero`` has learned nothing; a drop toward ``variance`` can come from the latent
  statistics alone, so it is no evidence of a subject being learned.
- :func:`colour_histogram` / :func:`histogram_distance`: an image-space distance between two sets of pictures:
  1 − the intersection of their pooled, normalised joint RGB histograms (``bins``³ cells). 0 = same colour
  make-up, 1 = no colour in common. Cheap, model-free, and blind to shape: it sees a subject's palette.
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


def colour_histogram(images: list[Image.Image], bins: int = 6, size: int = 32) -> np.ndarray:
    """Pooled joint RGB histogram of ``images`` (each resized to ``size``² so each counts the same), sum 1."""
    counts = np.zeros(bins**3)
    for image in images:
        arr = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.int64)
        cells = (arr * bins // 256).reshape(-1, 3)
        index = (cells[:, 0] * bins + cells[:, 1]) * bins + cells[:, 2]
        counts += np.bincount(index, minlength=bins**3)
    return counts / max(counts.sum(), 1)


def histogram_distance(images: list[Image.Image], references: list[Image.Image], bins: int = 6) -> float:
    """1 − histogram intersection of the two sets' pooled colour histograms (0 = same colours)."""
    return float(1.0 - np.minimum(colour_histogram(images, bins), colour_histogram(references, bins)).sum())
