"""``preprocess_dir``: an ingest (or any stage) directory → training crops at ``cfg.resolution``.

Crops: ``center`` (largest centred square), ``face`` (largest square around the faces OpenCV finds; a
centre crop, noted in the report, when it finds none or is not installed) and ``none`` (keep the aspect
ratio, resize into a bucket: sides multiples of 64, area about ``resolution²``, as kohya/SimpleTuner do).

Images whose crop is smaller than the resolution are *upscaled* (Lanczos, or Swin2SR with
``upscaler: swin2sr``): the record keeps ``upscaled_from: [w, h]`` and the report marks the item
``normalised``, because upscaled images train worse and users should know which ones they are. With
``mask_prompt`` set, CLIPSeg writes a subject mask ``NNNNNN.mask.png`` beside each image (``extra.mask``);
with ``mask_source: face`` the mask is a feathered ellipse over each face OpenCV finds (no face: no mask).

Speed: JPEG inputs are decoded with ``Image.draft`` (the decoder's own 1/2–1/8 downscale, several times
faster) when the picture is at least twice the size needed; images are processed in ``workers``
processes. Model steps (Swin2SR, CLIPSeg) run in this process: torch already uses the cores, and one
model copy per worker would multiply the memory. Face masks are cheap and run in the workers.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from sdtune.config import PreprocessConfig
from sdtune.data.crop import bucket_box, bucket_size, center_box, face_box
from sdtune.data.shards import read_shards, record_shard
from sdtune.data.stagedir import prepare_out_dir, safe_child, write_png
from sdtune.errors import DatasetError
from sdtune.manifest import ItemReport, Record, StageResult, StageWriter, iter_manifest

__all__ = ["bucket_size", "preprocess_dir", "preprocess_image"]


@dataclass
class Tools:
    """What one process needs beyond Pillow, loaded once per process."""

    detector: Callable | None = None
    upscaler: Callable | None = None
    masker: Callable | None = None
    mask_transform: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def has_model(self) -> bool:
        """Whether a torch model runs (then everything runs in this one process)."""
        return self.upscaler is not None or self.mask_transform == "mask_clipseg"


def build_tools(cfg: PreprocessConfig) -> Tools:
    tools = Tools()
    if cfg.crop == "face":
        from sdtune.data.faces import load_detector

        tools.detector = load_detector()
        if tools.detector is None:
            tools.notes.append("face crop unavailable (pip install 'sdtune[faces]'): centre crop used")
    if cfg.upscaler == "swin2sr":
        from sdtune.data.upscale import Swin2SRUpscaler

        tools.upscaler = Swin2SRUpscaler(cfg)
    if cfg.mask_source == "face":
        from sdtune.data.masks import FaceMasker

        tools.masker, tools.mask_transform = FaceMasker(), "mask_face"
    elif cfg.mask_prompt:
        from sdtune.data.masks import ClipSegMasker

        tools.masker, tools.mask_transform = ClipSegMasker(cfg), "mask_clipseg"
    return tools


@dataclass
class Processed:
    image: Image.Image
    transforms: list[str]
    upscaled: bool
    notes: list[str]


def preprocess_image(image: Image.Image, cfg: PreprocessConfig, tools: Tools | None = None) -> Processed:
    """Crop and resize one RGB image (already drafted, if it was a JPEG)."""
    tools = tools or Tools()
    transforms: list[str] = []
    notes: list[str] = []
    w, h = image.size
    if cfg.crop == "none":
        target = bucket_size(w, h, cfg.resolution)
        box, name = bucket_box(w, h, target), "bucket_crop"
    else:
        target = (cfg.resolution, cfg.resolution)
        box, name = center_box(w, h), "center_crop"
        if cfg.crop == "face" and tools.detector is not None and w != h:
            found = face_box(w, h, tools.detector(image))
            box, name = (found, "face_crop") if found else (box, "center_crop")
            if not found:
                notes.append("no face found: centre crop")
    if box != (0, 0, w, h):
        image = image.crop(box)
        transforms.append(name)
    upscaled = image.width < target[0] or image.height < target[1]
    if upscaled and tools.upscaler is not None:
        image = tools.upscaler(image)
        transforms.append("upscale_swin2sr")
    if image.size != target:
        image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=None)
        transforms.append("upscale_lanczos" if upscaled and tools.upscaler is None else "resize_lanczos")
    return Processed(image, transforms, upscaled, notes)


def open_for(path: Path, cfg: PreprocessConfig) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, original size), decoding a JPEG at the smallest draft scale that keeps the crop ≥ target."""
    with Image.open(path) as im:
        size = im.size
        if im.format == "JPEG" and USE_DRAFT:
            w, h = size
            scale = cfg.resolution / (min(w, h) if cfg.crop != "none" else (w * h) ** 0.5)
            if scale <= 0.5:  # draft only ever reduces by 2, 4 or 8 and keeps at least the requested size
                im.draft("RGB", (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
        im.load()
        return im.convert("RGB"), size


def process_record(
    in_dir: Path, out_dir: Path, record: Record, cfg: PreprocessConfig, tools: Tools
) -> tuple[Record, ItemReport]:
    image, original = open_for(safe_child(in_dir, record.file), cfg)
    done = preprocess_image(image, cfg, tools)
    name = Path(record.file).with_suffix(".png").name
    extra = dict(record.extra)
    if done.upscaled:
        extra["upscaled_from"] = list(original)
    if cfg.crop == "none":
        extra["bucket"] = list(done.image.size)
    transforms = list(done.transforms)
    notes = ([f"upscaled from {original[0]}x{original[1]}"] if done.upscaled else []) + done.notes
    if tools.masker is not None:
        mask = tools.masker(done.image)
        if mask is None:
            notes.append("no face found: no mask")
        else:
            extra["mask"] = f"{Path(name).stem}.mask.png"
            write_png(mask, out_dir / extra["mask"])
            transforms.append(tools.mask_transform)
    sha = write_png(done.image, out_dir / name)
    out = record.model_copy(
        update={
            "file": name,
            "width": done.image.width,
            "height": done.image.height,
            "sha256": sha,
            "extra": extra,
        }
    )
    item = ItemReport(
        item=record.file,
        status="normalised" if done.upscaled else "kept",
        detail="; ".join(notes),
        transforms=transforms,
        output=name,
    )
    return out, item


MIN_PER_WORKER = 8
USE_DRAFT = True  # off only to measure what draft saves (sdtune.bench.data)


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def preprocess_dir(
    in_dir: Path,
    out_dir: Path,
    cfg: PreprocessConfig,
    shard: int | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> StageResult:
    """Process every record of ``in_dir`` (or of one ``shard`` of it, see :mod:`sdtune.data.shards`)."""
    in_dir = Path(in_dir)
    records = [r for r in iter_manifest(in_dir) if shard is None or record_shard(r) == shard]
    if shard is not None and shard not in (shards := read_shards(in_dir)):
        # an empty stage from a mistyped shard would pass as done (and merge into a smaller dataset)
        raise DatasetError(f"{in_dir} has no shard {shard}: its shards are {shards[0]}-{shards[-1]}")
    out_dir = prepare_out_dir(Path(out_dir), inputs=[in_dir])
    tools = build_tools(cfg)
    workers = cfg.workers or default_workers()
    # Starting a process costs about a second of imports: not worth it for a handful of images.
    if tools.has_model or len(records) < MIN_PER_WORKER * workers:
        workers = 1
    summary = {"resolution": cfg.resolution, "crop": cfg.crop, "upscaler": cfg.upscaler, "workers": workers}
    if tools.masker is not None:
        summary["mask_source"] = cfg.mask_source
    if shard is not None:
        summary["shard"] = shard
    n_upscaled = n_masks = 0
    with StageWriter(out_dir, "preprocess") as writer:
        for record, item in _run(records, in_dir, out_dir, cfg, tools, workers):
            writer.add_record(record)
            writer.add_item(item)
            n_upscaled += "upscaled_from" in record.extra
            n_masks += "mask" in record.extra
            if progress:
                progress(record.file)
        if tools.notes:
            summary["notes"] = tools.notes
        if tools.masker is not None:
            summary["masks"] = n_masks
        return writer.close({"images": len(writer.records), "upscaled": n_upscaled, **summary})


def _run(
    records: list[Record], in_dir: Path, out_dir: Path, cfg: PreprocessConfig, tools: Tools, workers: int
) -> Iterator[tuple[Record, ItemReport]]:
    """Results in manifest order. A bounded window of jobs keeps memory flat on a huge manifest."""
    if workers == 1:
        for record in records:
            yield _guarded(in_dir, out_dir, record, cfg, tools)
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads, which a forked child can deadlock on.
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=_init, initargs=(cfg,)
    ) as pool:
        window: deque[Future] = deque()
        for record in records:
            window.append(pool.submit(_job, in_dir, out_dir, record))
            if len(window) >= workers * 4:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


_TOOLS: tuple[PreprocessConfig, Tools] | None = None


def _init(cfg: PreprocessConfig) -> None:
    global _TOOLS
    _TOOLS = (cfg, build_tools(cfg))


def _job(in_dir: Path, out_dir: Path, record: Record) -> tuple[Record, ItemReport]:
    assert _TOOLS is not None
    cfg, tools = _TOOLS
    return _guarded(in_dir, out_dir, record, cfg, tools)


def _guarded(
    in_dir: Path, out_dir: Path, record: Record, cfg: PreprocessConfig, tools: Tools
) -> tuple[Record, ItemReport]:
    try:
        return process_record(in_dir, out_dir, record, cfg, tools)
    except (OSError, Image.DecompressionBombError) as exc:
        # A stage directory is written by ingest; a file that fails here was changed or removed since.
        raise DatasetError(f"{in_dir}: cannot read {record.file} ({type(exc).__name__}: {exc})") from None
