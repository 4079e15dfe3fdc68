"""CSV/JSONL catalogues: image + caption columns, relative paths kept inside the catalogue's folder."""

from __future__ import annotations

import json

import pytest
from data_helpers import encode, pattern

from sdtune.config import IngestConfig
from sdtune.data.ingest import ingest
from sdtune.errors import DatasetError


@pytest.fixture
def shop(tmp_path):
    folder = tmp_path / "shop"
    (folder / "img").mkdir(parents=True)
    for i in range(4):
        (folder / "img" / f"sku{i}.png").write_bytes(encode(pattern(seed=i), "PNG"))
    (tmp_path / "outside.png").write_bytes(encode(pattern(seed=9), "PNG"))
    return folder


def test_csv_catalogue_with_captions(shop, tmp_path):
    (shop / "catalogue.csv").write_text(
        "sku,picture,title\n"
        '1,img/sku0.png,"red shoe, side view"\n'
        "2,img/sku1.png,\n"
        "3,img/missing.png,gone\n"
        "4,../outside.png,sneaky\n"
        "5,,no image\n"
        "6,ftp://example.com/a.png,x\n"
        "7,img/sku2.png,  blue   shoe \n"
    )
    cfg = IngestConfig(
        min_images=1, min_side=16, image_column="picture", caption_column="title", max_reject_fraction=1
    )
    result = ingest([str(shop / "catalogue.csv")], tmp_path / "out", cfg)
    assert [r.caption for r in result.records] == ["red shoe, side view", None, "blue shoe"]
    assert result.report.reasons == {"missing_file": 1, "bad_row": 3}


def test_jsonl_catalogue_and_missing_column(shop, tmp_path):
    rows = [{"image": "img/sku3.png", "caption": "a bag"}, "not an object", {"image": "img/sku0.png"}]
    (shop / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    cfg = IngestConfig(min_images=1, min_side=16, max_reject_fraction=1)
    result = ingest([str(shop / "c.jsonl")], tmp_path / "out", cfg)
    assert [r.caption for r in result.records] == ["a bag", None]
    assert result.report.reasons == {"bad_row": 2}
    (shop / "bad.csv").write_text("file,text\na.png,x\n")
    with pytest.raises(DatasetError, match="no 'image' column"):
        ingest([str(shop / "bad.csv")], tmp_path / "out2", cfg)


def test_catalogue_rows_can_name_urls(shop, tmp_path):
    (shop / "urls.csv").write_text("image\nhttp://127.0.0.1:9/x.png\n")
    cfg = IngestConfig(min_images=1, max_reject_fraction=1)
    with pytest.raises(DatasetError, match="only 0 usable"):
        ingest([str(shop / "urls.csv")], tmp_path / "out", cfg)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["items"][0]["reason"] == "blocked_address"  # the default policy refuses loopback


def test_parquet_catalogue_streams_row_groups(shop, tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from sdtune.data import catalogue

    monkeypatch.setattr(catalogue, "PARQUET_BATCH_ROWS", 2)  # several batches from a 5-row file
    table = pa.table(
        {
            "sku": [1, 2, 3, 4, 5],
            "picture": ["img/sku0.png", None, "img/sku1.png", "img/nope.png", "img/sku2.png"],
            "title": ["red shoe", "x", None, "y", "  blue  shoe "],
        }
    )
    pq.write_table(table, shop / "c.parquet", row_group_size=2)
    cfg = IngestConfig(min_images=1, min_side=16, image_column="picture", caption_column="title")
    result = ingest([str(shop / "c.parquet")], tmp_path / "out", cfg)
    assert [r.caption for r in result.records] == ["red shoe", None, "blue shoe"]
    assert result.report.reasons == {"bad_row": 1, "missing_file": 1}
    assert any(i.item.endswith("c.parquet:2") for i in result.report.items)  # row numbers from 1
    pq.write_table(pa.table({"file": ["a.png"]}), shop / "bad.parquet")
    with pytest.raises(DatasetError, match="no 'image' column"):
        ingest([str(shop / "bad.parquet")], tmp_path / "out2", IngestConfig())
    (shop / "fake.parquet").write_text("image\na.png\n")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        ingest([str(shop / "fake.parquet")], tmp_path / "out3", IngestConfig())


def test_rows_the_readers_refuse_are_bad_rows(shop, tmp_path):
    """A CSV cell over the 1 MiB field limit and a JSON row nested past the recursion limit: those rows are
    skipped with a reason, the others ingested (was a csv.Error / RecursionError ending the run)."""
    big = "x" * ((1 << 20) + 10)
    (shop / "big.csv").write_text(f"image,caption\nimg/sku0.png,a\nimg/sku1.png,{big}\nimg/sku2.png,b\n")
    deep = '{"image": "img/sku1.png", "d": ' + "[" * 100_000 + "]" * 100_000 + "}"
    lines = [json.dumps({"image": "img/sku0.png"}), deep, json.dumps({"image": "img/sku2.png"})]
    (shop / "deep.jsonl").write_text("\n".join(lines) + "\n")
    cfg = IngestConfig(min_images=1, min_side=16, max_reject_fraction=1)
    for name, detail in (("big.csv", "field larger than field limit"), ("deep.jsonl", "nested too deeply")):
        result = ingest([str(shop / name)], tmp_path / name, cfg)
        assert [r.source for r in result.records] == ["img/sku0.png", "img/sku2.png"]
        assert result.report.reasons == {"bad_row": 1}
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert any(detail in i["detail"] for i in report["items"] if i["reason"] == "bad_row")


def test_an_s3_row_with_s3_unreachable_is_skipped(shop, tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    rows = [{"image": "img/sku0.png"}, {"image": "s3://bkt/x.png"}]
    (shop / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = IngestConfig(min_images=1, min_side=16, max_reject_fraction=1, catalogue_buckets=["bkt"])
    result = ingest([str(shop / "c.jsonl")], tmp_path / "out", cfg)  # was urllib3's MaxRetryError
    assert [r.source for r in result.records] == ["img/sku0.png"]
    assert result.report.reasons == {"fetch_failed": 1}
