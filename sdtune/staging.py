"""Folders to and from an S3-compatible store (through the ``minio`` client), for steps whose work runs in
other pods: a multi-node training job reads its dataset from, and writes its outputs to, a staging prefix."""

from __future__ import annotations

from pathlib import Path

from sdtune.data.s3 import client_from_env, split_s3_uri


def upload_dir(local: Path, uri: str) -> int:
    """Upload every file under ``local`` to ``uri`` (keys keep the relative layout); returns the count."""
    client = client_from_env()
    bucket, prefix = split_s3_uri(uri)
    count = 0
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}".lstrip("/")
        client.fput_object(bucket, key, str(path))
        count += 1
    return count


def download_prefix(uri: str, local: Path) -> int:
    """Download every object under ``uri`` into ``local``; object names never escape ``local``."""
    client = client_from_env()
    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    local = Path(local).resolve()
    count = 0
    for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
        relative = obj.object_name[len(prefix) :]
        target = (local / relative).resolve()
        if not relative or not target.is_relative_to(local):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        client.fget_object(bucket, obj.object_name, str(target))
        count += 1
    return count


def prefix_size(uri: str) -> int:
    """Total bytes of the objects under ``uri`` (0 when there are none)."""
    client = client_from_env()
    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    return sum(obj.size or 0 for obj in client.list_objects(bucket, prefix=prefix, recursive=True))


def delete_prefix(uri: str) -> int:
    """Delete every object under ``uri``; returns the count."""
    from minio.deleteobjects import DeleteObject

    client = client_from_env()
    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    names = [o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True)]
    errors = list(client.remove_objects(bucket, (DeleteObject(n) for n in names)))
    if errors:
        raise OSError(f"could not delete {len(errors)} object(s) under {uri}: {errors[0]}")
    return len(names)
