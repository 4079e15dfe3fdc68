"""``ingest``: sources (folders, zips, URLs, s3://, catalogues) → a stage directory of clean RGB PNGs.

Every input item gets one line in ``report.items.jsonl`` (kept / normalised / skipped with a reason code;
``report.json`` holds the counts and the first items); bad items never stop the run. Records and reports
are streamed to disk (:class:`~sdtune.manifest.StageWriter`), so a million-row catalogue runs in flat
memory. The dataset as a whole is refused (``DatasetError``, exit code 2) when fewer than ``min_images``
survive or more than ``max_reject_fraction`` of the real candidates were rejected.

With ``shard_size`` > 0 every record gets ``extra.shard`` (``index // shard_size``) so preprocessing can
fan out over shards; ``shards.json`` lists them (always written: unsharded output is one shard, id 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sdtune.config import IngestConfig
from sdtune.data.dedup import Deduplicator
from sdtune.data.images import decode_image
from sdtune.data.items import Item, Skip
from sdtune.data.reasons import IGNORED, SkipItem
from sdtune.data.shards import write_shards
from sdtune.data.sources import iter_source, s3_source_buckets
from sdtune.data.stagedir import prepare_out_dir, write_png
from sdtune.errors import DatasetError
from sdtune.manifest import ItemReport, Record, StageResult, StageWriter

Progress = Callable[[str], None]


def ingest(
    sources: list[str], out_dir: Path, cfg: IngestConfig, *, progress: Progress | None = None
) -> StageResult:
    """Read every source, keep the usable images as ``000000.png``… in ``out_dir``, report every item."""
    if not sources:
        raise DatasetError("no sources given: pass a folder, a zip, a URL, an s3:// prefix or a catalogue")
    # Local sources (folders, zips, catalogues; ``@path`` too) must not overlap the output folder.
    local = [s.removeprefix("@") for s in sources if "://" not in s]
    out_dir = prepare_out_dir(Path(out_dir), inputs=local)
    dedup = Deduplicator(cfg.near_duplicate_distance)
    rejected = 0
    buckets = s3_source_buckets(sources)
    with StageWriter(out_dir, "ingest") as writer:
        for source in sources:
            for entry in iter_source(source, cfg, buckets):
                if isinstance(entry, Skip):
                    item_report = ItemReport(
                        item=entry.id, status="skipped", reason=entry.reason, detail=entry.detail
                    )
                else:
                    item_report, record = _ingest_item(entry, out_dir, cfg, dedup, len(writer.records))
                    if record is not None:
                        writer.add_record(record)
                writer.add_item(item_report)
                rejected += item_report.status == "skipped" and item_report.reason not in IGNORED
                if progress:
                    progress(entry.id)
        kept = len(writer.records)
        write_shards(out_dir, kept, cfg.shard_size)
        # Written even when refusing below: the report explains why.
        result = writer.close({"kept": kept, "rejected": rejected, "sources": len(sources)})

    candidates = kept + rejected
    skipped = result.report.counts.get("skipped", 0)
    if kept < cfg.min_images:
        raise DatasetError(
            f"only {kept} usable image(s), at least {cfg.min_images} needed "
            f"({skipped} skipped; see {out_dir / 'report.json'})"
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
    extra = {"format": decoded.format, "pixel_sha256": pixel_digest}
    if cfg.shard_size:
        extra["shard"] = index // cfg.shard_size
    record = Record(
        file=name,
        caption=item.caption,
        width=image.width,
        height=image.height,
        sha256=write_png(image, out_dir / name),
        source=item.id,
        extra=extra,
    )
    status = "normalised" if decoded.transforms else "kept"
    return (
        ItemReport(item=item.id, status=status, transforms=decoded.transforms, output=name),
        record,
    )
