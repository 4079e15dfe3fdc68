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


class ModelCaptioner:
    """A transformers captioning model with its processor, captioning a batch of images at a time.

    Subclasses name the model class; the weights come from ``caption.captioner_model`` (a local folder, a
    hub id or ``s3://``). The model runs on the GPU when there is one.
    """

    model_class = ""  # a transformers class name

    def __init__(self, cfg: CaptionConfig) -> None:
        import torch
        import transformers

        setting = "caption.captioner_model"
        model_cls = getattr(transformers, self.model_class)
        self.model = load_pretrained(model_cls, cfg.captioner_model, setting, cfg.cache_dir)
        self.processor = load_pretrained(
            transformers.AutoProcessor, cfg.captioner_model, setting, cfg.cache_dir
        )
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.max_new_tokens = cfg.max_new_tokens
        self.cfg = cfg

    def inputs(self, images: list[Image.Image]) -> dict:
        return dict(self.processor(images=images, return_tensors="pt"))

    def __call__(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = {k: v.to(self.device) for k, v in self.inputs(images).items()}
        inputs.pop("token_type_ids", None)  # BERT-style tokenizers add them; generate() rejects them
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [clean_caption(text) for text in texts]


class BlipCaptioner(ModelCaptioner):
    """BLIP (``BlipForConditionalGeneration``), e.g. ``Salesforce/blip-image-captioning-base``."""

    model_class = "BlipForConditionalGeneration"


class Blip2Captioner(ModelCaptioner):
    """BLIP-2 (``Blip2ForConditionalGeneration``), e.g. ``Salesforce/blip2-opt-2.7b``.

    With images only, the model's ``generate`` starts the text from its query tokens and BOS; the decoded
    output of a decoder-only language model repeats that prompt, which ``skip_special_tokens`` removes.
    """

    model_class = "Blip2ForConditionalGeneration"


class Florence2Captioner(ModelCaptioner):
    """Florence-2 (``Florence2ForConditionalGeneration``, a native transformers class), asked the
    ``florence2_task`` (``<CAPTION>`` …). It needs weights in the native format, e.g.
    ``florence-community/Florence-2-base``: ``microsoft/Florence-2-*`` hold remote code, which is never run."""

    model_class = "Florence2ForConditionalGeneration"

    def inputs(self, images: list[Image.Image]) -> dict:
        task = [self.cfg.florence2_task] * len(images)
        return dict(self.processor(text=task, images=images, return_tensors="pt"))


CAPTIONERS: dict[str, type[ModelCaptioner]] = {
    "blip": BlipCaptioner,
    "blip2": Blip2Captioner,
    "florence2": Florence2Captioner,
}


def load_captioner(cfg: CaptionConfig) -> ModelCaptioner:
    return CAPTIONERS[cfg.captioner](cfg)


def clean_caption(text: str) -> str:
    """One line of printable text: whitespace runs become one space, control characters go."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


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
