"""``preprocess_dir``: an ingest (or any stage) directory → square training crops at ``cfg.resolution``.

``crop="center"`` takes the largest centred square, then resizes it with Lanczos. Images whose crop is
smaller than the resolution are *upscaled* (Lanczos): the record keeps ``upscaled_from: [w, h]`` (the
original size) and the report marks the item ``normalised`` with ``upscale_lanczos``, because upscaled
images train worse and users should know which ones they are. ``crop="none"`` keeps the aspect ratio and
resizes into a bucket (sides multiples of 64, area about ``resolution²``), as kohya/SimpleTuner do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

from sdtune.config import PreprocessConfig
from sdtune.data.stagedir import load_record_image, prepare_out_dir, write_png
from sdtune.manifest import ItemReport, Record, StageReport, StageResult, read_manifest, write_stage

BUCKET_STEP = 64


def center_crop(image: Image.Image) -> Image.Image:
    side = min(image.size)
    left = (image.width - side) // 2
    top = (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket for an aspect ratio: sides multiples of 64, area at most about resolution²."""
    scale = (resolution * resolution / (width * height)) ** 0.5
    w = max(BUCKET_STEP, int(width * scale) // BUCKET_STEP * BUCKET_STEP)
    h = max(BUCKET_STEP, int(height * scale) // BUCKET_STEP * BUCKET_STEP)
    return w, h


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> tuple[Image.Image, list[str], bool]:
    """(processed image, transforms, upscaled?) for one RGB image."""
    transforms: list[str] = []
    if cfg.crop == "center":
        if image.width != image.height:
            image = center_crop(image)
            transforms.append("center_crop")
        target = (cfg.resolution, cfg.resolution)
    else:
        target = bucket_size(image.width, image.height, cfg.resolution)
        # Crop the few pixels that do not fit the bucket's aspect ratio, then resize.
        ratio = target[0] / target[1]
        w, h = image.size
        cw, ch = (min(w, round(h * ratio)), min(h, round(w / ratio)))
        if (cw, ch) != (w, h):
            left, top = (w - cw) // 2, (h - ch) // 2
            image = image.crop((left, top, left + cw, top + ch))
            transforms.append("bucket_crop")
    upscaled = image.width < target[0] or image.height < target[1]
    if image.size != target:
        image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=None)
        transforms.append("upscale_lanczos" if upscaled else "resize_lanczos")
    return image, transforms, upscaled


def preprocess_dir(
    in_dir: Path, out_dir: Path, cfg: PreprocessConfig, *, progress: Callable[[str], None] | None = None
) -> StageResult:
    in_dir = Path(in_dir)
    records_in = read_manifest(in_dir)
    out_dir = prepare_out_dir(Path(out_dir))
    report = StageReport(stage="preprocess")
    records: list[Record] = []
    n_upscaled = 0
    for record in records_in:
        original = load_record_image(in_dir, record)
        image, transforms, upscaled = preprocess_image(original, cfg)
        extra = dict(record.extra)
        if upscaled:
            extra["upscaled_from"] = [original.width, original.height]
            n_upscaled += 1
        if cfg.crop == "none":
            extra["bucket"] = [image.width, image.height]
        sha = write_png(image, out_dir / record.file)
        records.append(
            record.model_copy(
                update={"width": image.width, "height": image.height, "sha256": sha, "extra": extra}
            )
        )
        report.add(
            ItemReport(
                item=record.file,
                status="normalised" if upscaled else "kept",
                detail=f"upscaled from {original.width}x{original.height}" if upscaled else "",
                transforms=transforms,
                output=record.file,
            )
        )
        if progress:
            progress(record.file)
    report.summary = {
        "images": len(records),
        "upscaled": n_upscaled,
        "resolution": cfg.resolution,
        "crop": cfg.crop,
    }
    return write_stage(out_dir, records, report)
