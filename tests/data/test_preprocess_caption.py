"""preprocess_dir (crop, resize, Lanczos upscale) and caption_dir (sidecars, template, holdout split)."""

from __future__ import annotations

import pytest
from data_helpers import encode, pattern
from PIL import Image
from pydantic import ValidationError

from sdtune.config import CaptionConfig, PreprocessConfig
from sdtune.data.caption import caption_dir, holdout_count
from sdtune.data.ingest import ingest
from sdtune.data.preprocess import bucket_size, preprocess_dir
from sdtune.manifest import read_manifest


@pytest.fixture
def ingested(tmp_path, cfg):
    src = tmp_path / "src"
    src.mkdir()
    sizes = [(40, 30), (200, 100), (64, 64), (128, 160), (90, 90), (300, 300)]
    for i, (w, h) in enumerate(sizes):
        (src / f"{i}.png").write_bytes(encode(pattern(w, h, seed=i), "PNG"))
    (src / "0.txt").write_text("a photo of zwx dog, sidecar")
    ingest([str(src)], tmp_path / "ingested", cfg)
    return tmp_path / "ingested"


def test_preprocess_crops_resizes_and_reports_upscaling(ingested, tmp_path):
    result = preprocess_dir(ingested, tmp_path / "pre", PreprocessConfig(resolution=96))
    by_file = {r.file: r for r in result.records}
    for record in result.records:
        with Image.open(tmp_path / "pre" / record.file) as im:
            assert im.size == (96, 96) and im.mode == "RGB"
    assert by_file["000000.png"].extra["upscaled_from"] == [40, 30]
    assert "upscaled_from" not in by_file["000005.png"].extra
    items = {i.item: i for i in result.report.items}
    assert items["000000.png"].status == "normalised"
    assert items["000000.png"].transforms == ["center_crop", "upscale_lanczos"]
    assert items["000005.png"].status == "kept" and items["000005.png"].transforms == ["resize_lanczos"]
    assert result.report.summary["upscaled"] == 3  # 40x30, 64x64, 90x90
    assert by_file["000000.png"].caption == "a photo of zwx dog, sidecar"  # carried through


def test_preprocess_without_crop_uses_buckets(ingested, tmp_path):
    result = preprocess_dir(ingested, tmp_path / "pre", PreprocessConfig(resolution=128, crop="none"))
    wide = next(r for r in result.records if r.file == "000001.png")
    assert wide.extra["bucket"] == [wide.width, wide.height] == [128, 64]
    assert all(r.width % 64 == 0 and r.height % 64 == 0 for r in result.records)
    assert bucket_size(1024, 1024, 512) == (512, 512)


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(5, 0.15, 1), (20, 0.15, 3), (4, 0.15, 0), (2, 0.9, 1), (1, 0.5, 0), (6, 0.0, 0), (10, 0.99, 9)],
)
def test_holdout_count(n, fraction, expected):
    assert holdout_count(n, fraction) == expected


def test_caption_sidecars_win_template_fills_the_rest_and_split_is_deterministic(ingested, tmp_path):
    cfg = CaptionConfig(trigger="zwx", class_noun="dog", holdout_fraction=0.2)
    result = caption_dir(ingested, tmp_path / "cap", cfg)
    captions = [r.caption for r in result.records]
    assert captions[0] == "a photo of zwx dog, sidecar"
    assert set(captions[1:]) == {"a photo of zwx dog"}
    assert [r.split for r in result.records].count("holdout") == 1
    for record in result.records:
        assert (tmp_path / "cap" / record.file).read_bytes() == (ingested / record.file).read_bytes()
    again = caption_dir(ingested, tmp_path / "cap2", cfg)
    assert [r.split for r in again.records] == [r.split for r in result.records]
    no_sidecars = caption_dir(ingested, tmp_path / "cap3", cfg.model_copy(update={"use_sidecars": False}))
    assert read_manifest(tmp_path / "cap3")[0].caption == "a photo of zwx dog"
    assert no_sidecars.report.summary["from_sidecar"] == 0


def test_bad_template_is_refused_with_the_config():
    # Refused when the config is built (the CLI and load_config turn this into one ConfigError line).
    with pytest.raises(ValidationError, match="template field '{subject}' is not allowed"):
        CaptionConfig(template="a photo of {subject}")
