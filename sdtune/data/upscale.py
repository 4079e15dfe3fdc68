"""``upscaler: swin2sr``: a super-resolution model for images below the training resolution.

Lanczos only interpolates; Swin2SR restores detail, which matters when a user's photos are small. The
model enlarges by its fixed factor (×2 or ×4), then Lanczos makes the exact target size. It runs on the
crop, after cropping, so no pixels are enlarged only to be thrown away.
"""

from __future__ import annotations

from PIL import Image

from sdtune.config import PreprocessConfig
from sdtune.data.hfmodels import load_pretrained


class Swin2SRUpscaler:
    def __init__(self, cfg: PreprocessConfig) -> None:
        from transformers import Swin2SRForImageSuperResolution

        self.model = load_pretrained(
            Swin2SRForImageSuperResolution, cfg.upscaler_model, "preprocess.upscaler_model", cfg.cache_dir
        )
        self.window = self.model.config.window_size
        self.scale = self.model.config.upscale

    def __call__(self, image: Image.Image) -> Image.Image:
        import numpy as np
        import torch
        import torch.nn.functional as F

        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        h, w = pixels.shape[-2:]
        # The windowed attention needs sides that are multiples of the window: pad by repeating edges.
        pad_h, pad_w = -h % self.window, -w % self.window
        pixels = F.pad(pixels, (0, pad_w, 0, pad_h), mode="replicate")
        with torch.inference_mode():
            out = self.model(pixel_values=pixels).reconstruction
        out = out[0, :, : h * self.scale, : w * self.scale].clamp(0, 1)
        array = (out.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        return Image.fromarray(array, "RGB")
