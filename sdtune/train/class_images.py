"""Class images for DreamBooth's prior preservation: supplied, or generated once with the base model and cached
by content (``<model.cache_dir>/../class-images/<key>``, the key hashing everything that determines them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.models.loading import load_pipeline

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def class_prompt(cfg: RunConfig) -> str:
    return cfg.format_prompt(cfg.train.class_prompt)


def class_images_key(cfg: RunConfig) -> str:
    """Everything that determines the generated class images, hashed."""
    from sdtune.models.families import family_of
    from sdtune.models.loading import resolve_base

    source = resolve_base(cfg.model.base, cfg.model.cache_dir, cfg.model.revision)
    weights = Path(source) / family_of(cfg).denoiser
    fingerprint = source
    if weights.is_dir():  # a local folder: its UNet bytes, not its path, name the model
        fingerprint = hashlib.sha256(
            b"".join(p.read_bytes() for p in sorted(weights.glob("*.safetensors")))
        ).hexdigest()
    spec = {
        "model": fingerprint,
        "revision": cfg.model.revision,
        "arch": cfg.model.arch,
        "prompt": class_prompt(cfg),
        "n": cfg.train.num_class_images,
        "res": cfg.preprocess.resolution,
        "steps": cfg.train.class_image_steps,
        "guidance": cfg.train.class_image_guidance,
        "seed": cfg.train.seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def class_images(cfg: RunConfig, accelerator) -> list[Path]:
    """Supplied class images, or generated ones (each rank makes its share; cached by content)."""
    tc = cfg.train
    if tc.class_data_dir:
        supplied = supplied_images(Path(tc.class_data_dir))
        if len(supplied) >= tc.num_class_images:
            return supplied[: tc.num_class_images]
    folder = Path(cfg.model.cache_dir).parent / "class-images" / class_images_key(cfg)
    names = [folder / f"class_{i:05d}.png" for i in range(tc.num_class_images)]
    if not (folder / ".complete").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        todo = [
            i
            for i in range(accelerator.process_index, tc.num_class_images, accelerator.num_processes)
            if not names[i].is_file()
        ]
        if todo:
            _generate(cfg, accelerator.device, [(i, names[i]) for i in todo])
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (folder / ".complete").write_text(
                json.dumps({"prompt": class_prompt(cfg), "n": len(names)}) + "\n"
            )
        accelerator.wait_for_everyone()
    return names


def supplied_images(folder: Path) -> list[Path]:
    """The readable images in ``train.class_data_dir``; an unreadable one is skipped with a warning naming it."""
    import warnings

    from PIL import Image

    from sdtune.errors import ConfigError

    if not folder.is_dir():
        raise ConfigError(f"train.class_data_dir {folder}: not found (or not a folder)")
    readable = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a broken file
            warnings.warn(f"class image {path.name} skipped: unreadable ({type(exc).__name__})", stacklevel=2)
            continue
        readable.append(path)
    return readable


@torch.no_grad()
def _generate(cfg: RunConfig, device, jobs: list[tuple[int, Path]], batch: int = 4) -> None:
    dtype = torch.float32 if device.type != "cuda" else torch.float16
    pipe = load_pipeline(cfg, torch_dtype=dtype).to(device)
    prompt = class_prompt(cfg)
    res = cfg.preprocess.resolution
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        images = pipe(
            [prompt] * len(chunk),
            num_inference_steps=cfg.train.class_image_steps,
            guidance_scale=cfg.train.class_image_guidance,
            generator=[torch.Generator("cpu").manual_seed(cfg.train.seed * 100003 + i) for i, _ in chunk],
            height=res,
            width=res,
        ).images
        for (_, path), image in zip(chunk, images, strict=True):
            tmp = path.with_suffix(".tmp.png")
            image.save(tmp)
            tmp.replace(path)
    del pipe
