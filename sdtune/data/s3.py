"""``s3://bucket/prefix`` sources through the ``minio`` client, against AWS or any S3-compatible endpoint.

Endpoint and keys come from the environment (``S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, optional ``AWS_REGION``), as a KFP task receives them from a Kubernetes Secret;
they are never put into item ids, reports or error messages. Keys are listed first (names only, so memory
stays small) so each image can find its sidecar ``.txt``; objects are read lazily under a byte cap.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from sdtune.config import IngestConfig
from sdtune.data.archive import NESTED_ARCHIVE_SUFFIXES
from sdtune.data.items import CAPTION_MAX_BYTES, Item, Skip, is_junk_name, printable, strip_credentials
from sdtune.data.reasons import SkipItem
from sdtune.errors import DatasetError, ServiceError


def client_from_env():
    """A minio client for ``S3_ENDPOINT_URL`` (default AWS), keys from the environment."""
    from minio import Minio

    endpoint = os.environ.get("S3_ENDPOINT_URL", "https://s3.amazonaws.com")
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DatasetError(f"S3_ENDPOINT_URL {strip_credentials(endpoint)!r} is not an http(s) URL")
    host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    return Minio(
        host,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
        secure=parts.scheme == "https",
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


def unreachable_errors() -> tuple[type[Exception], ...]:
    """What the client raises when S3 cannot be reached or fails on its own side: urllib3 gives up after the
    client's retries with MaxRetryError (an urllib3 HTTPError, neither an OSError nor a MinioException);
    a 5xx reply is a ServerError, a reply that is not S3's XML an InvalidResponseError."""
    from minio.error import InvalidResponseError, ServerError
    from urllib3.exceptions import HTTPError

    return (HTTPError, ServerError, InvalidResponseError)


@contextmanager
def unreachable_is_service_error(what: str) -> Iterator[None]:
    """Turn an unreachable S3 into :class:`ServiceError` (exit 4, retryable) that names ``what``."""
    try:
        yield
    except unreachable_errors() as exc:
        raise ServiceError(f"{what}: cannot reach S3 ({_describe(exc)})") from None


def split_s3_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise DatasetError(f"{strip_credentials(uri)}: expected s3://bucket/prefix")
    return parts.netloc, parts.path.lstrip("/")


def iter_s3(uri: str, cfg: IngestConfig, client=None) -> Iterator[Item | Skip]:
    from minio.error import MinioException

    bucket, prefix = split_s3_uri(uri)
    client = client or client_from_env()
    try:
        with unreachable_is_service_error(f"s3://{bucket}/{printable(prefix)}"):
            objects = [
                (o.object_name, o.size) for o in client.list_objects(bucket, prefix=prefix, recursive=True)
            ]
    except (MinioException, OSError, ValueError) as exc:  # an answer: no such bucket, access denied
        raise DatasetError(f"s3://{bucket}/{printable(prefix)}: cannot list ({_describe(exc)})") from None
    if not objects:
        raise DatasetError(f"s3://{bucket}/{printable(prefix)}: no objects under this prefix")
    captions = {posixpath.splitext(name)[0]: name for name, _ in objects if name.lower().endswith(".txt")}
    for name, size in objects:
        label = f"s3://{bucket}/{printable(name)}"
        if is_junk_name(name):
            yield Skip(label, "junk_member", "OS metadata")
        elif name.lower().endswith(".txt") or name.endswith("/"):
            continue
        elif name.lower().endswith(NESTED_ARCHIVE_SUFFIXES):
            yield Skip(label, "nested_archive", "archives under an s3:// prefix are not unpacked")
        elif size is not None and size > cfg.max_image_bytes:
            yield Skip(label, "too_large_file", f"{size} bytes is over max_image_bytes={cfg.max_image_bytes}")
        else:
            caption_key = captions.get(posixpath.splitext(name)[0])
            caption = None
            if caption_key:
                raw = _get(client, bucket, caption_key, CAPTION_MAX_BYTES, truncate=True)
                caption = " ".join(raw.decode("utf-8", errors="replace").split()) or None
            yield Item(label, object_reader(client, bucket, name, cfg.max_image_bytes), caption=caption)


def object_reader(client, bucket: str, key: str, cap: int) -> Callable[[], bytes]:
    def read() -> bytes:
        return _get(client, bucket, key, cap)

    return read


def s3_uri_reader(uri: str, cfg: IngestConfig, client=None) -> Callable[[], bytes]:
    """A lazy reader for one ``s3://bucket/key`` object (catalogue rows); the client is made on first use."""
    bucket, key = split_s3_uri(uri)
    state = {"client": client}

    def read() -> bytes:
        if state["client"] is None:
            state["client"] = client_from_env()
        return _get(state["client"], bucket, key, cfg.max_image_bytes)

    return read


def _get(client, bucket: str, key: str, cap: int, truncate: bool = False) -> bytes:
    from minio.error import MinioException

    response = None
    try:
        response = client.get_object(bucket, key)
        data = response.read(cap + 1)
    except (MinioException, OSError, ValueError, *unreachable_errors()) as exc:  # this item only
        raise SkipItem("fetch_failed", _describe(exc)) from None
    finally:
        if response is not None:
            response.close()
            response.release_conn()
    if len(data) > cap and not truncate:
        raise SkipItem("too_large_file", f"more than max_image_bytes={cap} bytes")
    return data[:cap]


def _describe(exc: Exception) -> str:
    """An S3 error without request signatures or endpoint credentials: just the code or the type (for
    urllib3's MaxRetryError the cause's: NewConnectionError, NameResolutionError …)."""
    code = getattr(exc, "code", None)
    reason = getattr(exc, "reason", None)
    return f"{code}" if code else type(reason if isinstance(reason, Exception) else exc).__name__
