"""CSV, JSONL and Parquet catalogues: one row per image (a relative path, an http(s) URL or an s3:// URI)
with an optional caption column. Rows are streamed (CSV/JSONL line by line, Parquet one row-group batch at
a time, only the two columns read), never loaded whole, so a million-row e-commerce export reads in flat
memory; each row's image is fetched lazily when ingest reaches it.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from sdtune.config import IngestConfig
from sdtune.data.items import CAPTION_MAX_BYTES, Item, Skip, printable, strip_credentials
from sdtune.errors import DatasetError

csv.field_size_limit(1 << 20)  # a caption cell, not a whole file: bounded, but above the 128 KiB default


def iter_catalogue(
    path: Path, cfg: IngestConfig, source_buckets: frozenset[str] = frozenset()
) -> Iterator[Item | Skip]:
    """Rows as items. An ``s3://`` row is fetched with the pipeline's own keys, so it may name only a bucket
    in ``cfg.catalogue_buckets`` or ``source_buckets`` (those of the run's own ``s3://`` sources): a shared
    catalogue must not read another tenant's bucket."""
    label = printable(str(path))
    allowed_buckets = frozenset(cfg.catalogue_buckets) | source_buckets
    base = os.path.realpath(path.parent)  # once per catalogue: resolving per row dominated the run time
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(path, label, cfg.image_column)
    elif suffix == ".parquet":
        rows = _parquet_rows(path, label, cfg.image_column, cfg.caption_column)
    else:
        rows = _jsonl_rows(path)
    for line, row in rows:
        if isinstance(row, str):  # the reason the row could not be read
            yield Skip(f"{label}:{line}", "bad_row", row)
            continue
        value = row.get(cfg.image_column)
        if not isinstance(value, str) or not value.strip():
            yield Skip(f"{label}:{line}", "bad_row", f"no {cfg.image_column!r} value")
            continue
        value = value.strip()
        caption = row.get(cfg.caption_column)
        caption = (" ".join(caption.split()) or None) if isinstance(caption, str) else None
        if caption is not None and len(caption) * 4 > CAPTION_MAX_BYTES:  # maybe over the sidecar cap
            caption = _cap_caption(caption)
        yield _item_for(value, base, cfg, caption, allowed_buckets)


def _cap_caption(caption: str) -> str | None:
    """A caption cell cut to the bytes a sidecar file may hold (a 1 MB cell would ride into every prompt)."""
    return caption.encode("utf-8")[:CAPTION_MAX_BYTES].decode("utf-8", errors="ignore").strip() or None


def _item_for(
    value: str, base: str, cfg: IngestConfig, caption: str | None, allowed_buckets: frozenset[str]
) -> Item | Skip:
    if value.startswith(("http://", "https://")):
        from sdtune.data.fetch import url_reader

        return Item(strip_credentials(value), url_reader(value, cfg), caption=caption)
    if value.startswith("s3://"):
        from sdtune.config import s3_reference_problem
        from sdtune.data.s3 import s3_uri_reader

        problem = s3_reference_problem(value)
        if problem:
            return Skip(strip_credentials(value), "bad_row", problem)
        if urlsplit(value).netloc not in allowed_buckets:
            return Skip(
                strip_credentials(value), "bad_row", "bucket not allowed (see ingest.catalogue_buckets)"
            )
        return Item(strip_credentials(value), s3_uri_reader(value, cfg), caption=caption)
    if "://" in value:
        return Skip(strip_credentials(value), "bad_row", "unsupported URL scheme")
    from sdtune.data.localfiles import file_reader

    # Relative paths resolve inside the catalogue's folder only: a shared catalogue must not read /etc.
    label = printable(value)
    path = _resolve_row_path(base, value)
    if path is None:
        return Skip(label, "bad_row", "path leaves the catalogue's folder")
    if not os.path.isfile(path):
        if os.path.lexists(path):  # a FIFO or device: opening it could block the whole ingest
            return Skip(label, "special_file", "not a regular file")
        return Skip(label, "missing_file", "no such file")
    return Item(label, file_reader(Path(path), cfg.max_image_bytes), caption=caption)


def _resolve_row_path(base: str, value: str) -> str | None:
    """The real path of a row's file, or None when it (or a symlink on the way) leaves ``base``.

    Runs once per row, so it avoids a full ``realpath`` (an lstat per path component): the folder part is
    resolved once per distinct folder (cached), then only the file itself is checked for a symlink.
    """
    lexical = os.path.normpath(os.path.join(base, value))
    if not lexical.startswith(base + os.sep):
        return None
    folder = _real_folder(os.path.dirname(lexical))
    path = os.path.join(folder, os.path.basename(lexical))
    if os.path.islink(path):
        path = os.path.realpath(path)
    return path if path.startswith(base + os.sep) else None


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


# Row generators yield (line, row): a dict, or a str saying why that row cannot be read (a ``bad_row`` skip).


def _csv_rows(path: Path, label: str, image_column: str) -> Iterator[tuple[int, dict | str]]:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.DictReader(fh)
        try:
            columns = reader.fieldnames or []
        except csv.Error as exc:
            raise DatasetError(f"{label}: unreadable CSV header ({exc})") from None
        if image_column not in columns:
            raise DatasetError(
                f"{label}: no {image_column!r} column (has: {', '.join(columns)[:200]}); set ingest.image_column"
            )
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # e.g. a cell over the field limit: the reader goes on at the next line
                yield reader.line_num, f"unreadable CSV row ({exc})"
                continue
            yield reader.line_num, row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict | str]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except RecursionError:  # arrays or objects nested thousands deep
                yield line_no, "JSON nested too deeply"
                continue
            except ValueError:  # not JSON, or an integer over Python's digit limit
                row = None
            yield line_no, row if isinstance(row, dict) else "not a JSON object"


PARQUET_BATCH_ROWS = 8192


def _parquet_rows(
    path: Path, label: str, image_column: str, caption_column: str
) -> Iterator[tuple[int, dict | str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{label}: Parquet catalogues need pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise DatasetError(f"{label}: not a readable Parquet file ({type(exc).__name__})") from None
    columns = parquet.schema_arrow.names
    if image_column not in columns:
        raise DatasetError(
            f"{label}: no {image_column!r} column (has: {', '.join(columns)[:200]}); set ingest.image_column"
        )
    wanted = [image_column] + ([caption_column] if caption_column in columns else [])
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
        for values in batch.to_pylist():
            row += 1  # 1-based, like CSV/JSONL line numbers, so ids read the same
            yield row, values
