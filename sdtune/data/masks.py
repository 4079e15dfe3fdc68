"""Subject masks from a text prompt (``mask_prompt``) with CLIPSeg, for masked-loss training.

CLIPSeg predicts a low-resolution probability map for "where is <prompt>"; it is upscaled to the image
and thresholded, so the mask is a plain black/white ``L`` PNG the trainer can read without the model.
"""

from __future__ import annotations

from PIL import Image

from sdtune.config import PreprocessConfig
from sdtune.data.hfmodels import load_pretrained


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
