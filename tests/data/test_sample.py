"""The synthetic sample dataset: deterministic, varied, and it runs through all three stages."""

from __future__ import annotations

import hashlib

from PIL import Image

from sdtune.config import CaptionConfig, IngestConfig, PreprocessConfig
from sdtune.data import caption_dir, ingest, preprocess_dir, write_sample_dataset


def _digests(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_sample_is_deterministic_and_varied(tmp_path):
    first = write_sample_dataset(tmp_path / "a")
    second = write_sample_dataset(tmp_path / "b")
    assert len(first) >= 8 and _digests(first) == _digests(second)
    assert _digests(write_sample_dataset(tmp_path / "c", seed=1)) != _digests(first)
    sizes, formats, oriented = set(), set(), 0
    for path in first:
        with Image.open(path) as im:
            sizes.add(im.size)
            formats.add(im.format)
            oriented += im.getexif().get(0x0112, 1) != 1
    assert {"JPEG", "PNG"} <= formats and oriented == 1
    assert any(min(s) < 512 for s in sizes) and any(min(s) >= 512 for s in sizes)
    assert len(list((tmp_path / "a").glob("*.txt"))) == 1


def test_sample_runs_through_every_stage(tmp_path):
    write_sample_dataset(tmp_path / "raw")
    ingested = ingest([str(tmp_path / "raw")], tmp_path / "ingest", IngestConfig())
    assert len(ingested.records) == 12, ingested.report.reasons  # no false near-duplicates
    pre = preprocess_dir(tmp_path / "ingest", tmp_path / "pre", PreprocessConfig(resolution=128))
    cap = caption_dir(tmp_path / "pre", tmp_path / "cap", CaptionConfig(class_noun="robot"))
    assert pre.report.summary["upscaled"] == 0
    assert cap.report.summary["from_sidecar"] == 1 and cap.report.summary["holdout"] == 1
    upscaled = preprocess_dir(tmp_path / "ingest", tmp_path / "pre512", PreprocessConfig(resolution=512))
    assert upscaled.report.summary["upscaled"] >= 3
