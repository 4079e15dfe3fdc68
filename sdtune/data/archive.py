"""Read images out of an untrusted zip without ever touching the filesystem with its member names.

The central directory is checked as a whole before any member is read (entry count, total declared size,
per-member compression ratio); member data is then read into memory with a byte cap, because declared sizes
can lie. Member names are only labels: output files get generated names in ``ingest``.
"""

from __future__ import annotations

import posixpath
import stat
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from sdtune.config import IngestConfig
from sdtune.data.items import Item, Skip, is_junk_name, read_capped, sidecar_text
from sdtune.data.reasons import SkipItem
from sdtune.errors import DatasetError

NESTED_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst")
CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class ZipLimits:
    max_entries: int = 10_000
    max_total_bytes: int = 4 << 30
    max_ratio: float = 200.0  # uncompressed / compressed, per member
    max_member_bytes: int = 64 << 20


def iter_zip(fileobj: IO[bytes], label: str, limits: ZipLimits) -> Iterator[Item | Skip]:
    """Yield one :class:`Item` per image member (with its sidecar caption) and a :class:`Skip` per odd member."""
    try:
        zf = zipfile.ZipFile(fileobj)
        infos = zf.infolist()
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        ValueError,
        EOFError,
        IndexError,
        struct.error,
    ) as exc:
        # zipfile raises more than BadZipFile on a hostile central directory.
        raise DatasetError(f"{label}: not a readable zip archive ({exc})") from None
    with zf:
        check_limits(infos, label, limits)
        # Not ZipInfo.is_dir(): it crashes on an empty name (zipfile cuts names at a NUL byte).
        files = [i for i in infos if not i.filename.endswith("/")]
        captions = {
            posixpath.splitext(i.filename)[0]: i
            for i in files
            if i.filename.lower().endswith(CAPTION_SUFFIX) and not _skip_reason(i)
        }
        for info in infos:  # a "folder" entry holding data is hidden payload: reported, never read
            if info.filename.endswith("/") and info.file_size:
                yield Skip(
                    f"{label}!{info.filename}",
                    "not_an_image",
                    f"a folder entry holding {info.file_size} bytes",
                )
        for info in sorted(files, key=lambda i: i.filename):
            member_label = f"{label}!{info.filename}"
            reason = _skip_reason(info)
            if reason:
                yield Skip(member_label, *reason)
                continue
            if info.filename.lower().endswith(CAPTION_SUFFIX):
                continue  # a sidecar caption (read with its image) or a stray note: never an item
            caption_info = captions.get(posixpath.splitext(info.filename)[0])
            yield Item(
                member_label,
                _member_reader(zf, info, limits.max_member_bytes),
                caption=_read_caption(zf, caption_info) if caption_info else None,
            )


def check_limits(infos: list[zipfile.ZipInfo], label: str, limits: ZipLimits) -> None:
    """Refuse the whole archive (one clear line) before reading a byte of member data."""
    if len(infos) > limits.max_entries:
        raise DatasetError(
            f"{label}: {len(infos)} entries is over the limit of {limits.max_entries} (zip_max_entries)"
        )
    total = sum(i.file_size for i in infos)
    if total > limits.max_total_bytes:
        raise DatasetError(
            f"{label}: {total} uncompressed bytes is over the limit of {limits.max_total_bytes} (zip_max_total_bytes)"
        )
    for info in infos:
        # Tiny members compress absurdly well legitimately (a blank caption); only big ones can be bombs.
        if info.file_size > 1 << 20 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            ratio = info.file_size / max(info.compress_size, 1)
            raise DatasetError(
                f"{label}: member {_printable(info.filename)!r} expands {ratio:.0f}x, over the limit of "
                f"{limits.max_ratio:.0f}x (zip_max_ratio): refusing a likely zip bomb"
            )


def _skip_reason(info: zipfile.ZipInfo) -> tuple[str, str] | None:
    name = info.filename
    if is_junk_name(name):
        return ("junk_member", "OS metadata file")
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_ISLNK(mode):  # 3 = Unix: only there do the high bits mean st_mode
        return ("symlink", "symbolic link member, not followed")
    if info.flag_bits & 0x1:
        return ("encrypted", "encrypted member")
    if name.lower().endswith(NESTED_ARCHIVE_SUFFIXES):
        return ("nested_archive", "archives inside archives are not unpacked")
    return None


def _member_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int):
    def read() -> bytes:
        if info.file_size > cap:
            raise SkipItem("too_large_file", f"{info.file_size} bytes is over max_image_bytes={cap}")
        try:
            with zf.open(info) as fh:
                return read_capped(fh, cap)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
            # Bad CRC, unsupported compression method, truncated member data, a password needed …
            raise SkipItem("corrupt", f"cannot read zip member: {exc}") from None

    return read


def _read_caption(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    try:
        with zf.open(info) as fh:
            return sidecar_text(fh)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return None


def _printable(name: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in name)


def zip_limits(cfg: IngestConfig) -> ZipLimits:
    return ZipLimits(
        max_entries=cfg.zip_max_entries,
        max_total_bytes=cfg.zip_max_total_bytes,
        max_ratio=cfg.zip_max_ratio,
        max_member_bytes=cfg.max_image_bytes,
    )
