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
    from sdtune.models.tiny import write_tokenizer

    return write_tokenizer(folder)


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


def _word_tokenizer(folder: Path, extra_words: list[str], **special):
    """A word-level BERT tokenizer over :data:`BLIP_WORDS` (+ extra words) with ``<image>`` as image token."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(BLIP_WORDS + ["<image>", *extra_words]) + "\n")
    return BertTokenizer.from_pretrained(folder, extra_special_tokens={"image_token": "<image>"}, **special)


def _scramble(model) -> None:
    """Widen the random weights: at the default 0.02 init a tiny model only ever generates special tokens."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.5)


def tiny_blip2(folder: Path) -> Path:
    """A randomly initialised BLIP-2 (32-px ViT, 1-layer Q-Former, 4 query tokens, 2-layer OPT) with its processor."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = _word_tokenizer(folder, [], bos_token="[DEC]", eos_token="[SEP]")
    text = dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16, bos_token_id=5,
                eos_token_id=3, pad_token_id=0)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)  # fmt: skip
    qformer = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, encoder_hidden_size=16, max_position_embeddings=64)  # fmt: skip
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                         image_token_index=tokenizer.image_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    _scramble(model)
    model.save_pretrained(folder)
    images = BlipImageProcessorPil(size={"height": 32, "width": 32})
    Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=4).save_pretrained(folder)
    return folder


def tiny_florence2(folder: Path) -> Path:
    """A randomly initialised Florence-2 (4-stage DaViT on 64 px: 2×2 patches + 1 pooled = 5 image tokens,
    1+1-layer BART) with its processor."""
    import torch
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _word_tokenizer(folder, ["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text = dict(model_type="bart", vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                max_position_embeddings=64, bos_token_id=bos, eos_token_id=eos, pad_token_id=0,
                decoder_start_token_id=eos, forced_eos_token_id=eos)  # fmt: skip
    vision = dict(depths=[1, 1, 1, 1], embed_dim=[8, 8, 16, 16], num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
                  window_size=2, projection_dim=16, drop_path_rate=0.0, max_position_embeddings=8)  # fmt: skip
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config)
    _scramble(model)
    model.save_pretrained(folder)
    images = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder
