"""HEIC/HEIF (iPhone photos): decoded through the optional pillow-heif plugin (extra ``heif``), else a
clear per-item skip naming the extra."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from data_helpers import encode, pattern

from sdtune.config import IngestConfig
from sdtune.data import images
from sdtune.data.images import decode_image
from sdtune.data.ingest import ingest
from sdtune.data.reasons import SkipItem

FAKE_HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00" + b"\x00" * 40


def heic(image) -> bytes:
    pillow_heif = pytest.importorskip("pillow_heif")
    buf = io.BytesIO()
    pillow_heif.from_pillow(image).save(buf, quality=-1)  # lossless (up to the YUV round trip)
    return buf.getvalue()


@pytest.fixture
def without_plugin(monkeypatch):
    monkeypatch.setattr(images, "_heif_ready", None)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # `import pillow_heif` raises ImportError


def test_heic_without_the_plugin_is_a_clear_skip(tmp_path, without_plugin):
    with pytest.raises(SkipItem) as info:
        decode_image(FAKE_HEIC, max_pixels=10**6)
    assert info.value.reason == "unsupported_format" and "sdtune[heif]" in str(info.value)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(encode(pattern(seed=1)))
    (src / "IMG_0001.HEIC").write_bytes(FAKE_HEIC)
    result = ingest([str(src)], tmp_path / "out", IngestConfig(min_images=1, min_side=16))
    skipped = [i for i in result.report.items if i.status == "skipped"]
    assert [(i.reason, "pip install 'sdtune[heif]'" in i.detail) for i in skipped] == [
        ("unsupported_format", True)
    ]
    assert len(result.records) == 1


def test_heic_decodes_with_the_plugin(tmp_path):
    picture = pattern(64, 48, seed=3)
    data = heic(picture)
    decoded = decode_image(data, max_pixels=10**6)
    assert decoded.format == "HEIF" and decoded.image.mode == "RGB" and decoded.image.size == (64, 48)
    assert np.abs(np.asarray(decoded.image, dtype=int) - np.asarray(picture, dtype=int)).mean() < 2
    with pytest.raises(SkipItem, match="exceeds limit"):  # the bomb check holds for plugin formats too
        decode_image(data, max_pixels=1000)
    see_through = picture.convert("RGBA")
    see_through.putalpha(100)
    assert decode_image(heic(see_through), max_pixels=10**6).transforms == ["alpha_composite"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "IMG_0001.HEIC").write_bytes(data)
    (src / "IMG_0002.heic").write_bytes(data[: len(data) // 2])  # cut short: skipped, not fatal
    result = ingest([str(src)], tmp_path / "out", IngestConfig(min_images=1, min_side=16))
    assert [(i.status, i.reason) for i in result.report.items] == [("kept", "ok"), ("skipped", "corrupt")]
    assert result.records[0].file.endswith(".png") and (
        result.records[0].width,
        result.records[0].height,
    ) == (
        64,
        48,
    )
