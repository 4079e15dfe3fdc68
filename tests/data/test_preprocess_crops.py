"""Face-aware crops, JPEG draft decoding and parallel workers in preprocess."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import encode, pattern
from PIL import Image, ImageDraw, ImageFilter

from sdtune.config import PreprocessConfig
from sdtune.data import preprocess as P
from sdtune.data.crop import face_box
from sdtune.data.preprocess import preprocess_dir
from sdtune.manifest import Record, StageReport, write_stage


def drawn_face(width=600, height=300, cx=450, cy=150, r=50) -> Image.Image:
    """A cartoon face (skin oval, hair, eyes, brows, nose, mouth) that OpenCV's Haar cascade detects."""
    im = Image.new("RGB", (width, height), (90, 120, 160))
    d = ImageDraw.Draw(im)
    d.ellipse((cx - r, cy - 1.3 * r, cx + r, cy + 1.3 * r), fill=(225, 185, 150))
    d.rectangle((cx - r, cy - 1.35 * r, cx + r, cy - 0.8 * r), fill=(60, 40, 30))
    for ex in (cx - 0.4 * r, cx + 0.4 * r):
        d.ellipse((ex - 0.22 * r, cy - 0.35 * r, ex + 0.22 * r, cy - 0.12 * r), fill=(250, 250, 250))
        d.ellipse((ex - 0.1 * r, cy - 0.32 * r, ex + 0.1 * r, cy - 0.14 * r), fill=(30, 20, 20))
        d.rectangle((ex - 0.28 * r, cy - 0.55 * r, ex + 0.28 * r, cy - 0.47 * r), fill=(70, 50, 40))
    d.polygon(
        [(cx, cy - 0.1 * r), (cx - 0.15 * r, cy + 0.3 * r), (cx + 0.15 * r, cy + 0.3 * r)],
        fill=(190, 140, 115),
    )
    d.ellipse((cx - 0.35 * r, cy + 0.5 * r, cx + 0.35 * r, cy + 0.7 * r), fill=(150, 60, 60))
    return im.filter(ImageFilter.GaussianBlur(2))


def stage_of(folder, images: list[Image.Image], fmt="PNG", **save) -> None:
    """A stage directory written directly (no ingest), so inputs can be JPEGs."""
    folder.mkdir()
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    records = []
    for i, image in enumerate(images):
        name = f"{i:06d}.{ext}"
        image.save(folder / name, format=fmt, **save)
        records.append(Record(file=name, width=image.width, height=image.height, sha256="-", source=name))
    write_stage(folder, records, StageReport(stage="ingest"))


@pytest.mark.parametrize(
    ("faces", "expected"),
    [
        ([(400, 100, 500, 200)], (300, 0, 600, 300)),  # off to the right: square shifted, clamped at the edge
        ([(200, 100, 260, 160)], (80, 0, 380, 300)),  # centred on the face
        ([(10, 10, 70, 70), (500, 10, 550, 60)], (0, 0, 300, 300)),  # too far apart: the larger wins
        ([], None),
    ],
)
def test_face_box_arithmetic(faces, expected):
    assert face_box(600, 300, faces) == expected


def test_face_crop_follows_an_injected_detector(tmp_path, monkeypatch):
    monkeypatch.setattr("sdtune.data.faces.load_detector", lambda: lambda image: [(400, 100, 500, 200)])
    stage_of(tmp_path / "in", [pattern(600, 300, seed=1), pattern(300, 300, seed=2)])
    result = preprocess_dir(tmp_path / "in", tmp_path / "out", PreprocessConfig(resolution=104, crop="face"))
    items = result.report.items
    assert items[0].transforms == ["face_crop", "resize_lanczos"]
    assert items[1].transforms == ["resize_lanczos"]  # square already: nothing to choose
    with Image.open(tmp_path / "out" / "000000.png") as im:
        expected = (
            pattern(600, 300, seed=1).crop((300, 0, 600, 300)).resize((104, 104), Image.Resampling.LANCZOS)
        )
        assert np.array_equal(np.asarray(im), np.asarray(expected))


def test_face_crop_falls_back_without_opencv_or_faces(tmp_path, monkeypatch):
    stage_of(tmp_path / "in", [pattern(200, 100, seed=1)])
    monkeypatch.setattr("sdtune.data.faces.load_detector", lambda: None)
    result = preprocess_dir(tmp_path / "in", tmp_path / "o1", PreprocessConfig(resolution=64, crop="face"))
    assert result.report.items[0].transforms == ["center_crop", "resize_lanczos"]
    assert "sdtune[faces]" in result.report.summary["notes"][0]
    monkeypatch.setattr("sdtune.data.faces.load_detector", lambda: lambda image: [])
    result = preprocess_dir(tmp_path / "in", tmp_path / "o2", PreprocessConfig(resolution=64, crop="face"))
    assert result.report.items[0].detail == "no face found: centre crop"


def test_haar_cascade_finds_an_off_centre_drawn_face(tmp_path):
    pytest.importorskip("cv2")
    stage_of(tmp_path / "in", [drawn_face()])
    result = preprocess_dir(tmp_path / "in", tmp_path / "out", PreprocessConfig(resolution=104, crop="face"))
    assert result.report.items[0].transforms == ["face_crop", "resize_lanczos"]
    with Image.open(tmp_path / "out" / "000000.png") as im:
        # The face at x≈450 pulls the square to the right edge; a centre crop (150–450) would halve it.
        right = drawn_face().crop((300, 0, 600, 300)).resize((104, 104), Image.Resampling.LANCZOS)
        assert np.abs(np.asarray(im, dtype=int) - np.asarray(right, dtype=int)).mean() < 2


def test_jpeg_draft_decodes_large_inputs_at_a_reduced_scale(tmp_path, monkeypatch):
    big = pattern(1024, 768, seed=3)
    stage_of(tmp_path / "in", [big, pattern(200, 200, seed=4)], fmt="JPEG", quality=95)
    drafted = []
    real_draft = Image.Image.draft

    def spy(self, mode, size):
        drafted.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr("PIL.JpegImagePlugin.JpegImageFile.draft", spy)
    result = preprocess_dir(tmp_path / "in", tmp_path / "out", PreprocessConfig(resolution=128, workers=1))
    assert len(drafted) == 1  # only the 1024×768: 200 px is not twice 128
    assert [r.file for r in result.records] == ["000000.png", "000001.png"]  # PNG outputs
    with Image.open(tmp_path / "out" / "000000.png") as im:
        plain = big.crop((128, 0, 896, 768)).resize((128, 128), Image.Resampling.LANCZOS)
        assert np.abs(np.asarray(im, dtype=int) - np.asarray(plain, dtype=int)).mean() < 8


def test_two_workers_give_the_same_bytes_as_one(tmp_path):
    stage_of(tmp_path / "in", [pattern(96 + i, 80, seed=i) for i in range(P.MIN_PER_WORKER * 2)])
    one = preprocess_dir(tmp_path / "in", tmp_path / "one", PreprocessConfig(resolution=64, workers=1))
    two = preprocess_dir(tmp_path / "in", tmp_path / "two", PreprocessConfig(resolution=64, workers=2))
    assert two.report.summary["workers"] == 2
    assert (tmp_path / "one" / "manifest.jsonl").read_bytes() == (
        tmp_path / "two" / "manifest.jsonl"
    ).read_bytes()
    assert [i.model_dump() for i in one.report.items] == [i.model_dump() for i in two.report.items]
    small = preprocess_dir(tmp_path / "in", tmp_path / "three", PreprocessConfig(resolution=64, workers=8))
    assert small.report.summary["workers"] == 1  # 16 images do not pay for 8 process starts


def test_jpeg_in_png_out_keeps_generated_names(tmp_path):
    stage_of(tmp_path / "in", [pattern(seed=1)], fmt="JPEG")
    result = preprocess_dir(tmp_path / "in", tmp_path / "out", PreprocessConfig(resolution=64))
    assert (tmp_path / "out" / result.records[0].file).read_bytes().startswith(b"\x89PNG")
    assert encode(pattern(seed=1))  # helper sanity


def test_face_masks_are_feathered_ellipses_over_the_faces(tmp_path, monkeypatch):
    from sdtune.data.shards import merge_stages

    answers = [[(100, 100, 200, 200)], []]  # an injected detector: a face on the first image only
    monkeypatch.setattr("sdtune.data.faces.load_detector", lambda: lambda image: answers.pop(0))
    stage_of(tmp_path / "in", [pattern(256, 256, seed=1), pattern(200, 200, seed=2)])
    cfg = PreprocessConfig(resolution=256, mask_source="face", mask_prompt="ignored with face")
    result = preprocess_dir(tmp_path / "in", tmp_path / "out", cfg)
    first, second = result.records
    assert first.extra["mask"] == "000000.mask.png" and "mask" not in second.extra
    assert result.report.items[0].transforms[-1] == "mask_face"
    assert "no face found: no mask" in result.report.items[1].detail
    assert result.report.summary["masks"] == 1 and result.report.summary["mask_source"] == "face"
    with Image.open(tmp_path / "out" / "000000.mask.png") as im:
        mask = np.asarray(im)
        assert im.mode == "L" and im.size == (first.width, first.height)
    assert mask[150, 150] == 255 and mask[10, 10] == 0 and mask[150, 250] == 0
    assert mask[150, 100] not in (0, 255)  # feathered at the ellipse's edge, not a hard step
    assert mask[95, 150] > 0  # the ellipse is taller than the detector's box (forehead)
    merged = merge_stages([tmp_path / "out"], tmp_path / "merged")  # face masks travel like CLIPSeg ones
    assert (tmp_path / "merged" / merged.records[0].extra["mask"]).is_file()


def test_face_masks_need_opencv(tmp_path, monkeypatch):
    from sdtune.errors import ConfigError

    monkeypatch.setattr("sdtune.data.faces.load_detector", lambda: None)
    stage_of(tmp_path / "in", [pattern(seed=1)])
    with pytest.raises(ConfigError, match=r"mask_source=face needs OpenCV.*sdtune\[faces\]"):
        preprocess_dir(tmp_path / "in", tmp_path / "out", PreprocessConfig(resolution=64, mask_source="face"))


def test_haar_face_mask_covers_the_drawn_face(tmp_path):
    pytest.importorskip("cv2")
    stage_of(tmp_path / "in", [drawn_face()])
    cfg = PreprocessConfig(resolution=296, crop="face", mask_source="face")
    result = preprocess_dir(tmp_path / "in", tmp_path / "out", cfg)
    assert result.report.items[0].transforms == ["face_crop", "resize_lanczos", "mask_face"]
    with Image.open(tmp_path / "out" / result.records[0].extra["mask"]) as im:
        mask = np.asarray(im)
    # face_crop keeps x 300–600, so the face (centre 450,150; r 50) sits at (148, 148) in the 296 px output
    assert mask[150, 150] == 255 and mask[150, 20] == 0 and mask[20, 280] == 0
    assert set(np.unique(mask)) - {0, 255}  # feathered
