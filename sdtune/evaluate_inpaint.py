"""Does an inpainting fine-tune paint the subject inside a mask and keep the rest of the picture?

``evaluate_inpainting(cfg, base_model, tuned_dir, data_dir)`` takes the held-out views of the subject (on
plain backdrops, as the sample dataset draws them), masks a rectangle around the subject in each
(:func:`subject_box`), and inpaints it with the trigger prompt, base and tuned, with the same seeds. Keys:

- ``inpaint_inside_{base,tuned}``: hue distance (:func:`sdtune.subject_metrics.hue_distance`) of the pixels
  painted inside the masks to the subject's own pixels in those views (0 = the subject's colours);
  ``inpaint_inside_closer`` = 1 − tuned / base (how much closer fine-tuning brought the painted region).
- ``inpaint_outside_{base,tuned}``: mean absolute difference (0–255) between output and input outside the
  masks; ``inpaint_outside_vae``: the same for the VAE's own reconstruction of the inputs, the floor any
  latent inpainting model sits on (the 9-channel pipeline does not paste the kept pixels back).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.config import RunConfig
from sdtune.manifest import read_manifest
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


def evaluate_inpainting(
    cfg: RunConfig,
    base_model: str,
    tuned_dir: Path,
    data_dir: Path,
    seeds=(0, 1),
) -> dict[str, float]:
    """The module's keys for the held-out views of ``data_dir`` (the train views when none is held out),
    inpainted with the trigger prompt at ``evaluate.num_inference_steps`` and ``evaluate.guidance_scale``."""
    from sdtune.evaluate import TRIGGER_PROMPT, training_view
    from sdtune.models.loading import load_pipeline
    from sdtune.registry import load_trained_pipeline

    records = read_manifest(data_dir)
    records = [r for r in records if r.split == "holdout"] or records
    views = [training_view(Path(data_dir) / r.file, cfg.preprocess.resolution) for r in records]
    masks = [subject_box(v) for v in views]
    ev = cfg.evaluate
    args = (views, masks, cfg.format_prompt(TRIGGER_PROMPT), seeds, ev.num_inference_steps, ev.guidance_scale)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = load_pipeline(cfg, base_model).to(device)
    base_outputs, roundtrip = inpaint(base, *args), vae_roundtrip(base, views)
    del base
    tuned_outputs = inpaint(load_trained_pipeline(cfg, Path(tuned_dir)).to(device), *args)
    return inpainting_metrics(base_outputs, tuned_outputs, views, masks, roundtrip)
