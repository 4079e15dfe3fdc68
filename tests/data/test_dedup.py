"""Near-duplicate detection (perceptual hash) and source ids without credentials."""

from __future__ import annotations

from data_helpers import encode, pattern
from PIL import ImageEnhance

from sdtune.config import IngestConfig
from sdtune.data.ingest import ingest
from sdtune.data.items import printable, strip_credentials


def test_near_duplicates_are_reported_and_distinct_images_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    base = pattern(160, 160, seed=1)
    (src / "a.png").write_bytes(encode(base, "PNG"))
    (src / "b_recompressed.jpg").write_bytes(encode(base, "JPEG", quality=60))
    (src / "c_resized.png").write_bytes(encode(base.resize((120, 120)), "PNG"))
    (src / "d_brighter.png").write_bytes(encode(ImageEnhance.Brightness(base).enhance(1.1), "PNG"))
    for seed in range(2, 6):
        (src / f"other{seed}.png").write_bytes(encode(pattern(160, 160, seed=seed), "PNG"))
    cfg = IngestConfig(min_images=1, min_side=16)
    result = ingest([str(src)], tmp_path / "out", cfg)
    assert len(result.records) == 5
    near = [i for i in result.report.items if i.reason == "near_duplicate"]
    assert len(near) == 3 and all("a.png" in i.detail for i in near)
    off = ingest([str(src)], tmp_path / "out2", cfg.model_copy(update={"near_duplicate_distance": None}))
    assert len(off.records) == 8


def test_source_ids_strip_credentials_and_control_characters():
    assert strip_credentials("https://user:pw@example.com:8443/a/b.zip?X-Amz-Signature=abc") == (
        "https://example.com:8443/a/b.zip"
    )
    assert strip_credentials("s3://bucket/key") == "s3://bucket/key"
    assert printable("evil\x1b[2J\nname") == "evil\\x1b[2J\\x0aname"
