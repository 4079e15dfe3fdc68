"""Turn a source string into a stream of items: folder, zip (path or ``@path``), single image, URL, ``s3://``.

Sources are streamed (generators), so a huge folder or catalogue never sits in memory; listing decides
what is obviously not an image (junk, symlinks, nested archives) and reading is deferred to ``Item.read``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from sdtune.config import IngestConfig
from sdtune.data.archive import NESTED_ARCHIVE_SUFFIXES, iter_zip, zip_limits
from sdtune.data.items import (
    Item,
    Skip,
    is_junk_name,
    printable,
    sidecar_text,
    strip_credentials,
)
from sdtune.data.localfiles import file_kind, file_reader
from sdtune.errors import DatasetError

CATALOGUE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")


def s3_source_buckets(sources: list[str]) -> frozenset[str]:
    """The buckets a run's ``s3://`` sources read: catalogue rows may read these too."""
    return frozenset(urlsplit(s).netloc for s in sources if s.startswith("s3://"))


def iter_source(
    source: str, cfg: IngestConfig, source_buckets: frozenset[str] = frozenset()
) -> Iterator[Item | Skip]:
    """Every item of one source, in a stable order. Raises :class:`DatasetError` if the source itself is bad.

    ``source_buckets``: the buckets of the run's own ``s3://`` sources, which catalogue rows may also read."""
    if source.startswith(("http://", "https://")):
        from sdtune.data.fetch import iter_url

        yield from iter_url(source, cfg)
        return
    if source.startswith("s3://"):
        from sdtune.data.s3 import iter_s3

        yield from iter_s3(source, cfg)
        return
    if "://" in source:
        raise DatasetError(
            f"{strip_credentials(source)}: unsupported source scheme (use a path, http(s):// or s3://)"
        )
    path = Path(source[1:] if source.startswith("@") else source)
    if path.is_dir():
        yield from iter_folder(path, cfg)
    elif not path.is_file():
        kind = file_kind(path) if os.path.lexists(path) else None
        if kind:
            raise DatasetError(f"source {printable(str(path))} is a {kind}, not a file or folder")
        raise DatasetError(f"source not found: {printable(str(path))}")
    elif path.suffix.lower() in CATALOGUE_SUFFIXES:
        from sdtune.data.catalogue import iter_catalogue

        yield from iter_catalogue(path, cfg, source_buckets)
    elif _is_zip(path):
        with open(path, "rb") as fh:
            yield from iter_zip(fh, printable(str(path)), zip_limits(cfg))
    elif path.suffix.lower() == ".zip":
        raise DatasetError(f"{printable(str(path))}: not a readable zip archive")
    else:
        yield Item(printable(str(path)), file_reader(path, cfg.max_image_bytes), caption=_sidecar(path))


SDTUNE_MARKERS = frozenset({".complete", ".sdtune-stage"})


def iter_folder(root: Path, cfg: IngestConfig) -> Iterator[Item | Skip]:
    """Files under ``root`` in sorted order; symlinks are reported and never followed."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        # Prune metadata folders (__MACOSX, .git) whole: one report line, not one per file inside.
        pruned = sorted(d for d in dirnames if is_junk_name(d) or (here / d).is_symlink())
        dirnames[:] = sorted(d for d in dirnames if d not in pruned)
        for name in sorted(filenames + pruned):
            path = here / name
            label = printable(str(path))
            kind = file_kind(path)
            if kind == "symlink":
                yield Skip(label, "symlink", "symbolic link, not followed")
            elif kind != "file" and name not in pruned:
                yield Skip(label, "special_file", f"{kind}, not a regular file")
            elif name in SDTUNE_MARKERS:
                continue  # sdtune's own bookkeeping (sample-data's .complete)
            elif is_junk_name(name):
                yield Skip(label, "junk_member", "OS metadata")
            elif name.lower().endswith(".txt"):
                stem = Path(name).stem
                if not any(Path(f).stem == stem and f != name for f in filenames):
                    yield Skip(label, "junk_member", "a text file with no image of the same name")
                continue  # sidecar captions travel with their image
            elif name.lower().endswith(NESTED_ARCHIVE_SUFFIXES):
                yield Skip(label, "nested_archive", "archives inside a folder source are not unpacked")
            else:
                yield Item(label, file_reader(path, cfg.max_image_bytes), caption=_sidecar(path))


def _sidecar(path: Path) -> str | None:
    for candidate in (path.with_suffix(".txt"), path.with_suffix(path.suffix + ".txt")):
        if candidate.is_file() and not candidate.is_symlink():
            with open(candidate, "rb") as fh:
                return sidecar_text(fh)
    return None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in (b"PK\x03\x04", b"PK\x05\x06")
