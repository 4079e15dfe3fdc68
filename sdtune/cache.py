"""Content-addressed step cache: a step is skipped when the *content* of everything it depends on is
unchanged — its input stage's manifest (which lists every image's sha256 and caption), the source files,
the resolved config section, the base model's identity and the code version — never a path or a prefix
string. So a scheduled retrain with unchanged data re-uses the earlier outputs, and new images under the
same folder or ``s3://`` prefix always miss.

The store is a directory (``$SDTUNE_CACHE_DIR``, default ``$SDTUNE_HOME/cache/steps``): on a cluster, a
shared PVC mounted on every step. Entries are written to a temporary folder and renamed into place, so a
step killed mid-store never leaves a half entry that a later run would use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from sdtune import __version__

COMPLETE = ".complete"


def cache_root() -> Path:
    from sdtune.tracking import sdtune_home

    return Path(os.environ.get("SDTUNE_CACHE_DIR") or sdtune_home() / "cache" / "steps")


def step_key(step: str, **parts: Any) -> str:
    payload = json.dumps({"step": step, "code": __version__, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(root: Path, sample_bytes: int | None = None) -> str:
    """Digest of a folder's files (relative names, sizes, content). With ``sample_bytes``, only the first
    and last ``sample_bytes`` of each file are read: enough to tell model weight files apart cheaply."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        if sample_bytes is None or size <= 2 * sample_bytes:
            digest.update(_sha256(path).encode())
        else:
            with open(path, "rb") as fh:
                digest.update(fh.read(sample_bytes))
                fh.seek(-sample_bytes, os.SEEK_END)
                digest.update(fh.read(sample_bytes))
    return digest.hexdigest()


def source_digest(source: str) -> str | None:
    """Content digest of an ingest source, or None when it cannot be known without fetching it (URLs)."""
    if source.startswith("s3://"):
        return _s3_digest(source)
    if "://" in source:
        return None
    path = Path(source.removeprefix("@"))
    if path.is_dir():
        return tree_digest(path)
    if path.is_file():
        return _sha256(path)
    return None


def _s3_digest(uri: str) -> str | None:
    """ETags and sizes of every object under the prefix: changes whenever an object is added or replaced."""
    from sdtune.data.s3 import client_from_env, split_s3_uri

    try:
        bucket, prefix = split_s3_uri(uri)
        objects = client_from_env().list_objects(bucket, prefix=prefix, recursive=True)
        entries = [(o.object_name, o.etag, o.size) for o in objects]
    except Exception:  # unreachable store: no cache decision possible, the step will report the error
        return None
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def model_identity(base: str, revision: str | None) -> str:
    """A local model folder is identified by its content, a hub id or s3 URI by name and revision."""
    path = Path(base)
    if path.is_dir():
        return "dir:" + tree_digest(path, sample_bytes=1 << 20)
    return f"ref:{base}@{revision or 'main'}"


class StepCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else cache_root()

    def _entry(self, step: str, key: str) -> Path:
        return self.root / step / key

    def restore(self, step: str, key: str, out_dir: Path) -> dict[str, Any] | None:
        """Copy a cached output into ``out_dir`` and return its summary, or None on a miss."""
        entry = self._entry(step, key)
        if not (entry / COMPLETE).is_file():
            return None
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(entry / "output", out_dir, dirs_exist_ok=True, copy_function=_link_or_copy)
        return json.loads((entry / "summary.json").read_text())

    def store(self, step: str, key: str, out_dir: Path, summary: dict[str, Any]) -> Path:
        entry = self._entry(step, key)
        if (entry / COMPLETE).is_file():
            return entry
        tmp = entry.with_name(f".{key}.{uuid.uuid4().hex}.tmp")
        shutil.copytree(out_dir, tmp / "output", copy_function=_link_or_copy)
        (tmp / "summary.json").write_text(json.dumps(summary, default=str))
        (tmp / COMPLETE).write_text(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, entry)
        except OSError:  # another run stored the same key first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        return entry


def _link_or_copy(src: str, dst: str) -> None:
    # Outputs are never modified in place after a step ends, so hard links are safe and free.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
