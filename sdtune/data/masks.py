"""Masks for masked-loss training: subject masks from a text prompt (``mask_prompt``) with CLIPSeg, or
face masks (``mask_source: face``) from OpenCV's Haar cascade, the detector ``crop: face`` uses.

CLIPSeg predicts a low-resolution probability map for "where is <prompt>"; it is upscaled to the image
and thresholded, so the mask is a plain black/white ``L`` PNG the trainer can read without the model.
A face mask is an ellipse over each detected face (a little taller than the detector's box, which stops
at the brows and the chin), feathered with a Gaussian blur so the loss fades out at the edge.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageChops, ImageDraw, ImageFilter

from sdtune.config import PreprocessConfig
from sdtune.data.crop import Box
from sdtune.data.hfmodels import load_pretrained
from sdtune.errors import ConfigError

FACE_HEIGHT_SCALE = 1.3  # the ellipse's height / the detector box's (forehead and chin included)
FACE_FEATHER = 0.08  # blur radius as a fraction of the face's width


class ClipSegMasker:
    def __init__(self, cfg: PreprocessConfig) -> None:
        from transformers import AutoProcessor, CLIPSegForImageSegmentation

        setting = "preprocess.mask_model"
        self.model = load_pretrained(CLIPSegForImageSegmentation, cfg.mask_model, setting, cfg.cache_dir)
        self.processor = load_pretrained(AutoProcessor, cfg.mask_model, setting, cfg.cache_dir)
        self.prompt = cfg.mask_prompt
        self.threshold = cfg.mask_threshold

    def __call__(self, image: Image.Image) -> Image.Image:
        import numpy as np
        import torch

        inputs = self.processor(text=[self.prompt], images=[image], padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**inputs).logits
        probs = torch.sigmoid(logits.reshape(logits.shape[-2:])).numpy()
        low = Image.fromarray((probs * 255).astype(np.uint8), "L")
        full = np.asarray(low.resize(image.size, Image.Resampling.BILINEAR))
        return Image.fromarray(np.where(full >= self.threshold * 255, 255, 0).astype(np.uint8), "L")


def face_ellipse_mask(size: tuple[int, int], faces: Sequence[Box]) -> Image.Image:
    """An ``L`` mask of ``size``: a feathered white ellipse over each face box, black elsewhere."""
    mask = Image.new("L", size, 0)
    for left, top, right, bottom in faces:
        w, h = right - left, (bottom - top) * FACE_HEIGHT_SCALE
        cx, cy = (left + right) / 2, (top + bottom) / 2
        one = Image.new("L", size, 0)
        ImageDraw.Draw(one).ellipse((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=255)
        mask = ImageChops.lighter(mask, one.filter(ImageFilter.GaussianBlur(max(1.0, FACE_FEATHER * w))))
    return mask


class FaceMasker:
    """Face masks from the Haar cascade; None for an image without a face (then no mask is written)."""

    def __init__(self) -> None:
        from sdtune.data.faces import load_detector

        self.detector = load_detector()
        if self.detector is None:
            raise ConfigError("preprocess.mask_source=face needs OpenCV: pip install 'sdtune[faces]'")

    def __call__(self, image: Image.Image) -> Image.Image | None:
        faces = self.detector(image)
        return face_ellipse_mask(image.size, faces) if faces else None
