"""Reading local files for ingest: what kind of file a path is, and a capped reader that never blocks on a FIFO.

Shared by folder sources and catalogue rows (kept apart from both so neither imports the other)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sdtune.data.items import read_capped
from sdtune.data.reasons import SkipItem


def file_kind(path: Path) -> str:
    """``file``, ``symlink``, ``folder``, or what a special file is (``FIFO``, ``socket``, ``device``)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "file"  # vanished since listing: the reader reports it as unreadable
    if stat.S_ISLNK(mode):
        return "symlink"
    return kind_of_mode(mode)


def kind_of_mode(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def file_reader(path: Path, cap: int):
    def read() -> bytes:
        # O_NONBLOCK: opening a named pipe must not wait for a writer; only regular files are read.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise SkipItem("unreadable", exc.strerror or type(exc).__name__) from None
        with os.fdopen(fd, "rb") as fh:
            kind = kind_of_mode(os.fstat(fd).st_mode)
            if kind != "file":
                raise SkipItem("special_file", f"{kind}, not a regular file")
            os.set_blocking(fd, True)
            try:
                return read_capped(fh, cap)
            except OSError as exc:
                raise SkipItem("unreadable", exc.strerror or type(exc).__name__) from None

    return read
