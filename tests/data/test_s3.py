"""s3:// sources through minio against a real moto server on 127.0.0.1; credentials never leak."""

from __future__ import annotations

import io

import pytest
from data_helpers import encode, pattern

from sdtune.config import IngestConfig
from sdtune.data.ingest import ingest
from sdtune.errors import DatasetError

SECRET = "s3cr3t-never-logged"


@pytest.fixture
def bucket(moto_endpoint, monkeypatch):
    from minio import Minio

    monkeypatch.setenv("S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    client = Minio(moto_endpoint.split("://")[1], "AKIATESTKEY", SECRET, secure=False, region="us-east-1")
    name = "photos"
    if not client.bucket_exists(name):
        client.make_bucket(name)
    objects = {
        "set/a.png": encode(pattern(seed=1), "PNG"),
        "set/a.txt": b"a photo of sks dog on s3",
        "set/sub/b.jpg": encode(pattern(seed=2), "JPEG"),
        "set/c.webp": encode(pattern(seed=3), "WEBP"),
        "set/.DS_Store": b"junk",
        "set/more.zip": b"PK\x03\x04",
        "other/x.png": encode(pattern(seed=4), "PNG"),
    }
    for key, data in objects.items():
        client.put_object(name, key, io.BytesIO(data), len(data))
    return name


def test_s3_prefix_ingest(bucket, tmp_path):
    result = ingest([f"s3://{bucket}/set/"], tmp_path / "out", IngestConfig(min_images=3, min_side=16))
    assert [r.source for r in result.records] == [
        "s3://photos/set/a.png",
        "s3://photos/set/c.webp",
        "s3://photos/set/sub/b.jpg",
    ]
    assert result.records[0].caption == "a photo of sks dog on s3"
    assert result.report.reasons == {"junk_member": 1, "nested_archive": 1}
    assert SECRET not in (tmp_path / "out" / "report.json").read_text()


def test_s3_errors_are_one_line_without_secrets(bucket, tmp_path):
    with pytest.raises(DatasetError) as info:
        ingest(["s3://no-such-bucket/x/"], tmp_path / "out", IngestConfig(min_images=1))
    assert "no-such-bucket" in str(info.value) and SECRET not in str(info.value)
    with pytest.raises(DatasetError, match="no objects"):
        ingest([f"s3://{bucket}/empty/"], tmp_path / "out2", IngestConfig(min_images=1))
