"""What every source yields: an :class:`Item` to read and decode, or a :class:`Skip` decided while listing."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO
from urllib.parse import urlsplit

from sdtune.data.reasons import SkipItem

JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db"})
CAPTION_MAX_BYTES = 4096


@dataclass(frozen=True)
class Item:
    id: str  # shown in the report and kept as Record.source: credentials stripped, printable
    read: Callable[[], bytes]  # the item's bytes, capped; raises SkipItem
    caption: str | None = None  # from a sidecar .txt or a catalogue column


@dataclass(frozen=True)
class Skip:
    id: str
    reason: str
    detail: str = ""


def is_junk_name(name: str) -> bool:
    """OS metadata that rides along in user archives and folders (Finder, Explorer)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if any(p == "__MACOSX" for p in parts):
        return True
    base = parts[-1] if parts else ""
    return base.lower() in JUNK_NAMES or base.startswith(".")


def read_capped(fh: IO[bytes], cap: int) -> bytes:
    """Read at most ``cap`` bytes; more means the item is skipped, whatever its declared size said."""
    data = fh.read(cap + 1)
    if len(data) > cap:
        raise SkipItem("too_large_file", f"more than max_image_bytes={cap} bytes")
    return data


def sidecar_text(fh: IO[bytes]) -> str | None:
    """A caption from a sidecar file: bounded, decoded leniently, whitespace collapsed; None when empty."""
    text = fh.read(CAPTION_MAX_BYTES).decode("utf-8", errors="replace")
    text = " ".join(text.replace("\ufeff", "").split())
    return text or None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(label: str) -> str:
    """Escape control characters so a hostile name cannot rewrite the terminal or the Markdown report."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", label)


def strip_credentials(uri: str) -> str:
    """``https://user:pw@host/a?X-Amz-Signature=…`` → ``https://host/a``: ids end up in reports and logs."""
    if "://" not in uri:
        return printable(uri)
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:  # "[bad" or a port out of range: show the scheme only, never the rest
        return printable(uri.split("://", 1)[0][:20]) + "://<unparsable address>"
    # Not urlunsplit: it drops the "//" of an address without a host ("s3://" would read "s3:").
    return printable(f"{parts.scheme}://{host}{parts.path}")


def stem(name: str) -> str:
    return posixpath.splitext(name)[0]
