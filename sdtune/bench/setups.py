"""The benchmark's models, data and configs, built offline in a scratch folder.

- ``tiny``: :func:`sdtune.models.tiny.build_tiny` (UNet (32, 64), cross-attention 32, 2-block VAE), 64 px.
- ``medium``: the same folder layout with an SD-1.5-shaped model at a fraction of its width: UNet
  block_out_channels (32, 64, 128, 128), 2 layers per block, cross-attention 128; a 4-block VAE
  (32, 64, 128, 128; 8× downsampling like SD's); a 4-layer CLIP text encoder (hidden 128). 256 px images
  → 32×32 latents. Random weights, seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from sdtune.manifest import Record, StageReport, sha256_file, write_stage


@dataclass(frozen=True)
class Setup:
    name: str
    resolution: int
    window: int  # steps per timing window
    describe: str


SETUPS = {
    "tiny": Setup("tiny", 64, 10, "UNet (32,64) xattn 32, 2-block VAE, 64 px (configs/debug/tiny_cpu.yaml)"),
    "medium": Setup("medium", 256, 4, "UNet (32,64,128,128) xattn 128, 4-block VAE, 256 px"),
}


def build_medium(out_dir: Path, seed: int = 0) -> Path:
    """The tiny folder (tokenizer, scheduler, model_index.json) with medium UNet, VAE and text encoder."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdtune.models.tiny import build_tiny, clip_text_config, small_vae

    build_tiny("sd15", out_dir, seed=seed)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 128, 128),
            layers_per_block=2,
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = small_vae(seed, (32, 64, 128, 128), layers_per_block=2, norm_num_groups=32, sample_size=256)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            clip_text_config(len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4)
        )
    for sub, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        module.save_pretrained(out_dir / sub, safe_serialization=True)
    return out_dir


def build_model(name: str, out_dir: Path) -> Path:
    if name == "tiny":
        from sdtune.models.tiny import build_tiny

        return build_tiny("sd15", out_dir)
    return build_medium(out_dir)


def make_stage(out: Path, size: int, n_train: int = 5) -> Path:
    """A captioned stage directory of ``n_train`` training images (smooth colour fields, like photos)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n_train):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        path = out / f"img_{i:03d}.png"
        img.save(path)
        records.append(
            Record(
                file=path.name,
                caption="a photo of sks toy robot",
                width=size,
                height=size,
                sha256=sha256_file(path),
                source=f"bench://{i}",
                split="train",
            )
        )
    write_stage(out, records, StageReport(stage="caption"))
    return out


def write_config(path: Path, base: Path, resolution: int) -> Path:
    """A plain UNet LoRA on ``base`` (rank 4, AdamW lr 3e-3, constant after 10 warm-up steps, batch 4, fp32,
    seed 0): the demo preset's settings before it took a text-encoder LoRA and prior preservation, which the
    reference loop (diffusers' ``train_dreambooth_lora.py`` without its options) does not do."""
    data = {
        "name": f"bench-{resolution}",
        "model": {"base": str(base), "arch": "sd15"},
        "preprocess": {"resolution": resolution},
        "caption": {"trigger": "sks", "class_noun": "toy robot"},
        "train": {
            "method": "lora",
            "max_steps": 200,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "lr_scheduler": "constant",
            "lr_warmup_steps": 10,
            "rank": 4,
            "mixed_precision": "no",
            "seed": 0,
            "log_every": 20,
            "export_kohya": False,
        },
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
