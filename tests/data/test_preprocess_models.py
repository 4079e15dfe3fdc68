"""Model steps of preprocess, with tiny randomly initialised models built from configs (offline):
Swin2SR upscaling and CLIPSeg subject masks. The pictures they make are noise; the plumbing is tested."""

from __future__ import annotations

import pytest
from data_helpers import encode, pattern, tiny_clipseg, tiny_swin2sr
from PIL import Image

from sdtune.config import IngestConfig, PreprocessConfig
from sdtune.data.ingest import ingest
from sdtune.data.preprocess import preprocess_dir
from sdtune.data.shards import merge_stages
from sdtune.errors import ConfigError

pytest.importorskip("transformers")


@pytest.fixture
def small_and_large(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(encode(pattern(40, 30, seed=1), "PNG"))  # below 64: upscaled
    (src / "b.png").write_bytes(encode(pattern(128, 96, seed=2), "PNG"))  # above: only resized
    ingest([str(src)], tmp_path / "ingested", IngestConfig(min_images=1, min_side=16))
    return tmp_path / "ingested"


def test_swin2sr_upscales_small_images(small_and_large, tmp_path):
    cfg = PreprocessConfig(
        resolution=64, upscaler="swin2sr", upscaler_model=str(tiny_swin2sr(tmp_path / "sr"))
    )
    result = preprocess_dir(small_and_large, tmp_path / "pre", cfg)
    small, large = result.records
    assert small.extra["upscaled_from"] == [40, 30] and "upscaled_from" not in large.extra
    items = {i.item: i for i in result.report.items}
    # 30×30 crop → ×2 by the model (60×60) → Lanczos to exactly 64×64
    assert items["000000.png"].transforms == ["center_crop", "upscale_swin2sr", "resize_lanczos"]
    assert items["000000.png"].status == "normalised"
    assert items["000001.png"].transforms == ["center_crop", "resize_lanczos"]
    for record in result.records:
        with Image.open(tmp_path / "pre" / record.file) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    assert result.report.summary["upscaler"] == "swin2sr" and result.report.summary["workers"] == 1


def test_missing_model_is_one_config_error(small_and_large, tmp_path):
    with pytest.raises(ConfigError, match="upscaler_model is not set"):
        preprocess_dir(small_and_large, tmp_path / "p1", PreprocessConfig(upscaler="swin2sr"))
    cfg = PreprocessConfig(upscaler="swin2sr", upscaler_model=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="folder not found"):
        preprocess_dir(small_and_large, tmp_path / "p2", cfg)
    (tmp_path / "empty").mkdir()
    cfg = PreprocessConfig(upscaler="swin2sr", upscaler_model=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot load Swin2SRForImageSuperResolution"):
        preprocess_dir(small_and_large, tmp_path / "p3", cfg)


def test_clipseg_masks_are_saved_beside_the_images(small_and_large, tmp_path):
    model = tiny_clipseg(tmp_path / "seg")
    cfg = PreprocessConfig(resolution=64, mask_prompt="a dog", mask_model=str(model), mask_threshold=0.5)
    result = preprocess_dir(small_and_large, tmp_path / "pre", cfg)
    for record in result.records:
        assert record.extra["mask"] == record.file.replace(".png", ".mask.png")
        with Image.open(tmp_path / "pre" / record.extra["mask"]) as mask:
            assert mask.mode == "L" and mask.size == (record.width, record.height)
            assert set(mask.getdata()) <= {0, 255}
    assert all("mask_clipseg" in i.transforms for i in result.report.items)
    merged = merge_stages([tmp_path / "pre"], tmp_path / "merged")  # masks travel with their images
    assert all((tmp_path / "merged" / r.extra["mask"]).is_file() for r in merged.records)
    again = preprocess_dir(small_and_large, tmp_path / "pre", cfg)  # a re-run replaces masks too
    assert len(again.records) == 2
