"""``ingest``: sources (folders, zips, URLs, s3://, catalogues) → a stage directory of clean RGB PNGs.

Every input item gets one line in ``report.json`` (kept / normalised / skipped with a reason code); bad
items never stop the run. The dataset as a whole is refused (``DatasetError``, exit code 2) when fewer than
``min_images`` survive or more than ``max_reject_fraction`` of the real candidates were rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdtune.config import IngestConfig
from sdtune.data.dedup import Deduplicator
from sdtune.data.images import decode_image
from sdtune.data.items import Item, Skip
from sdtune.data.reasons import IGNORED, SkipItem
from sdtune.data.sources import iter_source
from sdtune.data.stagedir import prepare_out_dir, write_png
from sdtune.errors import DatasetError
from sdtune.manifest import ItemReport, Record, StageReport, StageResult, write_stage

Progress = Callable[[str], None]


def ingest(
    sources: list[str], out_dir: Path, cfg: IngestConfig, *, progress: Progress | None = None
) -> StageResult:
    """Read every source, keep the usable images as ``000000.png``… in ``out_dir``, report every item."""
    if not sources:
        raise DatasetError("no sources given: pass a folder, a zip, a URL, an s3:// prefix or a catalogue")
    out_dir = prepare_out_dir(Path(out_dir))
    report = StageReport(stage="ingest")
    records: list[Record] = []
    dedup = Deduplicator(cfg.near_duplicate_distance)
    for source in sources:
        for entry in iter_source(source, cfg):
            if isinstance(entry, Skip):
                report.add(
                    ItemReport(item=entry.id, status="skipped", reason=entry.reason, detail=entry.detail)
                )
            else:
                item_report, record = _ingest_item(entry, out_dir, cfg, dedup, len(records))
                report.add(item_report)
                if record is not None:
                    records.append(record)
            if progress:
                progress(entry.id)

    rejected = sum(1 for i in report.items if i.status == "skipped" and i.reason not in IGNORED)
    candidates = len(records) + rejected
    report.summary = {"kept": len(records), "rejected": rejected, "sources": len(sources)}
    result = write_stage(out_dir, records, report)  # written even when refusing: it explains why
    if len(records) < cfg.min_images:
        raise DatasetError(
            f"only {len(records)} usable image(s), at least {cfg.min_images} needed "
            f"({report.n_skipped} skipped; see {out_dir / 'report.json'})"
        )
    if candidates and rejected / candidates > cfg.max_reject_fraction:
        raise DatasetError(
            f"{rejected} of {candidates} images rejected ({rejected / candidates:.0%}), over "
            f"max_reject_fraction={cfg.max_reject_fraction:.0%}; see {out_dir / 'report.json'}"
        )
    return result


def _ingest_item(
    item: Item, out_dir: Path, cfg: IngestConfig, dedup: Deduplicator, index: int
) -> tuple[ItemReport, Record | None]:
    try:
        data = item.read()
        byte_digest, earlier = dedup.seen_bytes(data)
        if earlier is not None:
            raise SkipItem("duplicate", f"same bytes as {earlier}")
        decoded = decode_image(
            data,
            max_pixels=cfg.max_image_pixels,
            background=cfg.background,
            min_side=cfg.min_side,
            max_aspect=cfg.max_aspect_ratio,
        )
        del data
        pixel_digest, bits, reason, earlier = dedup.check_image(decoded.image)
        if reason is not None:
            raise SkipItem(reason, f"same picture as {earlier}")
    except SkipItem as skip:
        return ItemReport(item=item.id, status="skipped", reason=skip.reason, detail=skip.detail), None

    dedup.add(item.id, byte_digest, pixel_digest, bits)
    name = f"{index:06d}.png"
    image = decoded.image
    record = Record(
        file=name,
        caption=item.caption,
        width=image.width,
        height=image.height,
        sha256=write_png(image, out_dir / name),
        source=item.id,
        extra={"format": decoded.format, "pixel_sha256": pixel_digest},
    )
    status = "normalised" if decoded.transforms else "kept"
    return (
        ItemReport(item=item.id, status=status, transforms=decoded.transforms, output=name),
        record,
    )
