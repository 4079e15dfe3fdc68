"""Sharded ingest output, per-shard preprocessing and merging the shards back into one stage."""

from __future__ import annotations

import json

import pytest
from data_helpers import encode, pattern

from sdtune.config import IngestConfig, PreprocessConfig
from sdtune.data.ingest import ingest
from sdtune.data.preprocess import preprocess_dir
from sdtune.data.shards import merge_stages, read_shards
from sdtune.errors import DatasetError
from sdtune.manifest import iter_report_items, read_manifest, read_report


@pytest.fixture
def sharded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):
        (src / f"{i}.png").write_bytes(encode(pattern(64 + 8 * i, 64, seed=i), "PNG"))
    (src / "7.png").write_bytes(b"not an image")
    cfg = IngestConfig(min_images=1, min_side=16, shard_size=3)
    ingest([str(src)], tmp_path / "ingested", cfg)
    return tmp_path / "ingested"


def test_ingest_writes_shards(sharded, tmp_path):
    shards = json.loads((sharded / "shards.json").read_text())
    assert shards == {
        "shard_size": 3,
        "shards": [{"id": 0, "count": 3}, {"id": 1, "count": 3}, {"id": 2, "count": 1}],
    }
    assert [r.extra["shard"] for r in read_manifest(sharded)] == [0, 0, 0, 1, 1, 1, 2]
    assert read_shards(sharded) == [0, 1, 2]


def test_unsharded_ingest_is_one_shard(tmp_path, image_folder, cfg):
    ingest([str(image_folder)], tmp_path / "out", cfg)
    assert read_shards(tmp_path / "out") == [0]
    assert "shard" not in read_manifest(tmp_path / "out")[0].extra
    pre = preprocess_dir(tmp_path / "out", tmp_path / "pre", PreprocessConfig(resolution=32), shard=0)
    assert len(pre.records) == 6


def test_preprocess_shards_then_merge_equals_one_run(sharded, tmp_path):
    cfg = PreprocessConfig(resolution=64, workers=1)
    whole = preprocess_dir(sharded, tmp_path / "whole", cfg)
    parts = []
    for shard in reversed(read_shards(sharded)):  # fan-in order must not matter
        part = preprocess_dir(sharded, tmp_path / f"part{shard}", cfg, shard=shard)
        assert {r.extra["shard"] for r in part.records} == {shard}
        parts.append(tmp_path / f"part{shard}")
    merged = merge_stages(parts, tmp_path / "merged")
    assert [r.model_dump() for r in merged.records] == [r.model_dump() for r in whole.records]
    assert (tmp_path / "merged" / "manifest.jsonl").read_bytes() == (
        tmp_path / "whole" / "manifest.jsonl"
    ).read_bytes()
    for record in merged.records:
        assert (tmp_path / "merged" / record.file).read_bytes() == (
            tmp_path / "whole" / record.file
        ).read_bytes()
    report = read_report(tmp_path / "merged")
    assert report.stage == "preprocess" and report.counts == whole.report.counts
    assert report.summary["images"] == 7 and report.summary["upscaled"] == whole.report.summary["upscaled"]
    assert report.summary["resolution"] == 64 and report.summary["merged_from"] == 3
    assert [i.item for i in iter_report_items(tmp_path / "merged")] == [f"{i:06d}.png" for i in range(7)]


def test_merge_refuses_mixed_stages_and_overlaps(sharded, tmp_path):
    cfg = PreprocessConfig(resolution=64, workers=1)
    preprocess_dir(sharded, tmp_path / "a", cfg, shard=0)
    with pytest.raises(DatasetError, match="different stages"):
        merge_stages([tmp_path / "a", sharded], tmp_path / "m1")
    with pytest.raises(DatasetError, match="more than one shard"):
        merge_stages([tmp_path / "a", tmp_path / "a"], tmp_path / "m2")
    with pytest.raises(DatasetError, match="not a stage directory"):
        merge_stages([tmp_path / "nowhere"], tmp_path / "m3")
