"""CSV and JSONL catalogues: one row per image (a relative path, an http(s) URL or an s3:// URI) with an
optional caption column. Rows are streamed, never loaded whole, so a million-row e-commerce export reads in
flat memory; each row's image is fetched lazily when ingest reaches it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from sdtune.config import IngestConfig
from sdtune.data.items import Item, Skip, printable, strip_credentials
from sdtune.errors import DatasetError

csv.field_size_limit(1 << 20)  # a caption cell, not a whole file: bounded, but above the 128 KiB default


def iter_catalogue(path: Path, cfg: IngestConfig) -> Iterator[Item | Skip]:
    label = printable(str(path))
    rows = _csv_rows(path, label, cfg.image_column) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    for line, row in rows:
        if row is None:
            yield Skip(f"{label}:{line}", "bad_row", "not a JSON object")
            continue
        value = row.get(cfg.image_column)
        if not isinstance(value, str) or not value.strip():
            yield Skip(f"{label}:{line}", "bad_row", f"no {cfg.image_column!r} value")
            continue
        value = value.strip()
        caption = row.get(cfg.caption_column)
        caption = (" ".join(caption.split()) or None) if isinstance(caption, str) else None
        yield _item_for(value, path.parent, cfg, caption)


def _item_for(value: str, base: Path, cfg: IngestConfig, caption: str | None) -> Item | Skip:
    if value.startswith(("http://", "https://")):
        from sdtune.data.fetch import url_reader

        return Item(strip_credentials(value), url_reader(value, cfg), caption=caption)
    if value.startswith("s3://"):
        from sdtune.data.s3 import s3_uri_reader

        return Item(strip_credentials(value), s3_uri_reader(value, cfg), caption=caption)
    if "://" in value:
        return Skip(strip_credentials(value), "bad_row", "unsupported URL scheme")
    from sdtune.data.sources import file_reader

    # Relative paths resolve inside the catalogue's folder only: a shared catalogue must not read /etc.
    path = (base / value).resolve()
    label = printable(value)
    if not path.is_relative_to(base.resolve()):
        return Skip(label, "bad_row", "path leaves the catalogue's folder")
    if not path.is_file():
        return Skip(label, "missing_file", "no such file")
    return Item(label, file_reader(path, cfg.max_image_bytes), caption=caption)


def _csv_rows(path: Path, label: str, image_column: str) -> Iterator[tuple[int, dict | None]]:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        if image_column not in columns:
            raise DatasetError(
                f"{label}: no {image_column!r} column (has: {', '.join(columns)[:200]}); set ingest.image_column"
            )
        for row in reader:
            yield reader.line_num, row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | None]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            yield line_no, row if isinstance(row, dict) else None
