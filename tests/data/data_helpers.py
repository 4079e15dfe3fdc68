"""Helpers for the data tests: tiny images and zips built in memory (no assets, no downloads)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(width: int = 96, height: int = 96, seed: int = 0) -> Image.Image:
    """A distinct, asymmetric RGB picture per seed (random blocks, so no two seeds are near-duplicates)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((width, height), Image.Resampling.NEAREST)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tiny_swin2sr(folder: Path) -> Path:
    """A randomly initialised ×2 Swin2SR (~160 k parameters), saved like a real checkpoint."""
    import torch
    from transformers import Swin2SRConfig, Swin2SRForImageSuperResolution

    torch.manual_seed(0)
    config = Swin2SRConfig(image_size=16, embed_dim=8, depths=[1], num_heads=[1], window_size=4, upscale=2)
    Swin2SRForImageSuperResolution(config).save_pretrained(folder)
    return folder


def tiny_clip_tokenizer(folder: Path):
    from sdtune.models.tiny import _write_tokenizer

    return _write_tokenizer(folder)


def tiny_clipseg(folder: Path) -> Path:
    """A randomly initialised CLIPSeg (32-px input) plus its processor, with the tiny CLIP tokenizer."""
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    tokenizer = tiny_clip_tokenizer(folder / "_tokenizer")
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)  # fmt: skip
    config = CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=16, reduce_dim=8,
                           extract_layers=[1], decoder_num_attention_heads=2, decoder_intermediate_size=16)  # fmt: skip
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    images = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    CLIPSegProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "dog", "cat", "on",
              "the", "grass", "red", "blue"]  # fmt: skip


def tiny_blip(folder: Path) -> Path:
    """A randomly initialised BLIP captioner (32-px input, 16-word vocabulary) with its processor."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(BLIP_WORDS) + "\n")
    tokenizer = BertTokenizer.from_pretrained(folder, bos_token="[DEC]")
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=5, eos_token_id=3,
                sep_token_id=3, pad_token_id=0, encoder_hidden_size=16)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=16)
    )
    model.save_pretrained(folder)
    images = BlipImageProcessorPil(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder
