"""Does an inpainting fine-tune paint the subject inside a mask and keep the rest of the picture?

:func:`sdtune.evaluate.evaluate` evaluates an inpainting model (a UNet with 9 input channels) on an
:class:`InpaintProbe`: the held-out views of the subject (on plain backdrops, as the sample dataset draws them)
with a rectangle around the subject masked in each (:func:`subject_box`). Its denoising losses give the UNet
those masks and masked views, its image metric inpaints the masks (base and tuned, same seeds), and it adds:

- ``inpaint_inside_{base,tuned}``: hue distance (:func:`sdtune.subject_metrics.hue_distance`) of the pixels
  painted inside the masks with the trigger prompt to the subject's own pixels in those views (0 = the
  subject's colours); ``inpaint_inside_closer`` = 1 − tuned / base (how much closer fine-tuning brought them).
- ``inpaint_outside_{base,tuned}``: mean absolute difference (0–255) between output and input outside the
  masks; ``inpaint_outside_vae``: the same for the VAE's own reconstruction of the inputs, the floor any
  latent inpainting model sits on (the 9-channel pipeline does not paste the kept pixels back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdtune.subject_metrics import hue_distance


def subject_box(image: Image.Image, tolerance: int = 20, margin: int = 1) -> Image.Image:
    """A white rectangle (``L``, white = repaint) around every pixel that differs from the plain backdrop by
    more than ``tolerance`` in some channel, grown by ``margin`` pixels; the backdrop colour is the median of
    the border pixels."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    backdrop = np.median(border, axis=0)
    ys, xs = np.nonzero((np.abs(rgb - backdrop) > tolerance).any(axis=-1))
    mask = np.zeros(rgb.shape[:2], np.uint8)
    if len(ys):
        h, w = mask.shape
        mask[
            max(0, ys.min() - margin) : min(h, ys.max() + margin + 1),
            max(0, xs.min() - margin) : min(w, xs.max() + margin + 1),
        ] = 255
    return Image.fromarray(mask)


def _pixels(image: Image.Image, where: np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)[where]


def outside_difference(outputs, inputs, masks) -> float:
    """Mean absolute pixel difference (0–255) between ``outputs`` and ``inputs`` where ``masks`` are black."""
    diffs = [
        np.abs(_pixels(o, np.asarray(m) < 128) - _pixels(i, np.asarray(m) < 128))
        for o, i, m in zip(outputs, inputs, masks, strict=True)
    ]
    return float(np.concatenate(diffs).mean())


def inside_distance(outputs, inputs, masks) -> float:
    """Hue distance of the pixels inside the masks of ``outputs`` to those of ``inputs`` (the subject's)."""

    def region(images):  # the masked pixels as one tall picture, so hue_distance pools them
        rows = [_pixels(im, np.asarray(m) >= 128) for im, m in zip(images, masks, strict=True)]
        flat = np.concatenate(rows).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(flat[:, None, :])

    return hue_distance([region(outputs)], [region(inputs)], size=None)


@torch.no_grad()
def inpaint(pipe, views, masks, prompt: str, seeds, steps: int, guidance: float) -> list[Image.Image]:
    """Every view inpainted once per seed (view ``i`` with seed ``s`` draws its noise from ``s·1000 + i``, so
    two models see the same noise)."""
    out: list[Image.Image] = []
    size = views[0].width
    for seed in seeds:
        out += pipe(
            [prompt] * len(views),
            image=list(views),
            mask_image=list(masks),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator(device="cpu").manual_seed(seed * 1000 + i) for i in range(len(views))],
            height=size,
            width=size,
        ).images
    return out


@torch.no_grad()
def vae_roundtrip(pipe, views) -> list[Image.Image]:
    """The views encoded (posterior mean) and decoded by the pipeline's VAE."""
    pixels = pipe.image_processor.preprocess(list(views)).to(pipe.device, pipe.vae.dtype)
    decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample
    return pipe.image_processor.postprocess(decoded)


def inpainting_metrics(base_outputs, tuned_outputs, views, masks, roundtrip) -> dict[str, float]:
    """The module's keys from the inpainted pictures (``len(seeds)`` rounds of ``views``, in order)."""
    rounds = len(base_outputs) // len(views)
    inputs, all_masks = list(views) * rounds, list(masks) * rounds
    metrics = {
        f"inpaint_{side}_{name}": fn(outputs, inputs, all_masks)
        for name, outputs in (("base", base_outputs), ("tuned", tuned_outputs))
        for side, fn in (("inside", inside_distance), ("outside", outside_difference))
    }
    base = metrics["inpaint_inside_base"]
    metrics["inpaint_inside_closer"] = 1.0 - metrics["inpaint_inside_tuned"] / base if base else 0.0
    metrics["inpaint_outside_vae"] = outside_difference(roundtrip, list(views), list(masks))
    return metrics


def is_inpainting(pipe) -> bool:
    """A pipeline whose UNet takes the 9 inpainting input channels (SD3's has no UNet)."""
    unet = getattr(pipe, "unet", None)
    return unet is not None and unet.config.in_channels == 9


@dataclass
class InpaintProbe:
    """The views an inpainting model is evaluated on, each with the box around its subject to repaint, and
    ``rounds`` seeds per view for the pictures."""

    views: list[Image.Image]
    masks: list[Image.Image]
    rounds: int

    @classmethod
    def of(cls, views: list[Image.Image], samples: int) -> InpaintProbe:
        """``samples`` pictures in all, at least one round."""
        return cls(list(views), [subject_box(v) for v in views], max(1, math.ceil(samples / len(views))))

    @torch.no_grad()
    def unet_channels(self, pipe, device) -> torch.Tensor:
        """``[mask, masked-view latents]`` per view: what the 9-channel UNet takes after the noisy latents,
        built by the inpainting recipe's own :func:`sdtune.train.masks.unet_mask_inputs`."""
        from sdtune.train.masks import masked_image, unet_mask_inputs

        pixels = pipe.image_processor.preprocess(self.views).float()
        masks = torch.stack([torch.from_numpy(np.asarray(m) >= 128) for m in self.masks])[:, None].float()
        small, latents = unet_mask_inputs(pipe.vae, masked_image(pixels, masks), masks, device)
        return torch.cat([small, latents], dim=1)

    def shown_input(self) -> Image.Image:
        """The grid's first row: the first view with the region to repaint tinted red (the ``samples`` rows
        show that view repainted)."""
        view = self.views[0].convert("RGB")
        red = Image.new("RGB", view.size, (255, 0, 0))
        tint = self.masks[0].convert("L").point(lambda v: 96 if v >= 128 else 0)
        return Image.composite(red, view, tint)

    def paint(self, pipe, prompt: str, steps: int, guidance: float) -> list[Image.Image]:
        return inpaint(pipe, self.views, self.masks, prompt, range(self.rounds), steps, guidance)

    def inside_distance(self, outputs) -> float:
        return inside_distance(outputs, self.views * self.rounds, self.masks * self.rounds)

    def metrics(self, base_outputs, tuned_outputs, roundtrip) -> dict[str, float]:
        return inpainting_metrics(base_outputs, tuned_outputs, self.views, self.masks, roundtrip)
