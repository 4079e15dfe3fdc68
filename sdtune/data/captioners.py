"""Captioning models and the training tokenizer's length check, for ``caption_dir``.

A model caption describes the picture ("a dog sitting on grass"); ``model_template`` wraps it with the
trigger ("a photo of sks dog, a dog sitting on grass") so the fine-tune still binds the trigger token.
The text encoder reads a fixed number of tokens (77 for CLIP) and silently drops the rest, so captions are
checked against the *training* tokenizer and cut at a word boundary, and the report says so.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sdtune.config import CaptionConfig
from sdtune.data.hfmodels import load_pretrained, resolve_weights
from sdtune.errors import ConfigError


class BlipCaptioner:
    """BLIP (``BlipForConditionalGeneration``) with its processor, captioning a batch of images at a time."""

    def __init__(self, cfg: CaptionConfig) -> None:
        from transformers import AutoProcessor, BlipForConditionalGeneration

        setting = "caption.captioner_model"
        self.model = load_pretrained(
            BlipForConditionalGeneration, cfg.captioner_model, setting, cfg.cache_dir
        )
        self.processor = load_pretrained(AutoProcessor, cfg.captioner_model, setting, cfg.cache_dir)
        self.max_new_tokens = cfg.max_new_tokens

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = self.processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [" ".join(text.split()) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


class TokenLimit:
    """Counts tokens with the training tokenizer and trims captions that do not fit."""

    def __init__(self, cfg: CaptionConfig) -> None:
        from transformers import AutoTokenizer

        where = Path(resolve_weights(cfg.tokenizer, "caption.tokenizer", cfg.cache_dir))
        if (where / "tokenizer").is_dir():  # a diffusers model folder: use its (first) tokenizer
            where = where / "tokenizer"
        self.tokenizer = load_pretrained(AutoTokenizer, str(where), "caption.tokenizer", cfg.cache_dir)
        self.max_tokens = cfg.max_tokens

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"])  # with special tokens

    def fit(self, text: str) -> tuple[str, int]:
        """(caption that fits, its original token count): whole words are dropped from the end."""
        n = self.count(text)
        if n <= self.max_tokens:
            return text, n
        words = text.split()
        lo, hi = 0, len(words)  # binary search on the number of words kept
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count(" ".join(words[:mid])) <= self.max_tokens:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise ConfigError(f"caption.max_tokens={self.max_tokens} cannot hold even one word of {text!r}")
        return " ".join(words[:lo]).rstrip(",;:"), n


def wrap_model_caption(cfg: CaptionConfig, caption: str) -> str:
    try:
        return cfg.model_template.format(trigger=cfg.trigger, class_noun=cfg.class_noun, caption=caption)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"caption.model_template {cfg.model_template!r}: only {{trigger}}, {{class_noun}} and "
            f"{{caption}} may be used ({exc})"
        ) from None
