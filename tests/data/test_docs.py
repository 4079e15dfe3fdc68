"""docs/data.md documents every reason code and every ingest limit."""

from __future__ import annotations

from pathlib import Path

from sdtune.config import IngestConfig
from sdtune.data.reasons import REASONS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text(encoding="utf-8")


def test_every_reason_code_is_in_the_table():
    missing = [code for code in REASONS if f"| `{code}` |" not in DOC]
    assert not missing


def test_every_ingest_setting_is_documented():
    missing = [name for name in IngestConfig.model_fields if name != "sources" and f"`{name}`" not in DOC]
    assert not missing


def test_every_preprocess_and_caption_setting_is_documented():
    from sdtune.config import CaptionConfig, PreprocessConfig

    fields = [*PreprocessConfig.model_fields, *CaptionConfig.model_fields]
    assert not [name for name in fields if f"`{name}`" not in DOC]


def test_every_transform_is_documented():
    import re

    package = Path(__file__).resolve().parents[2] / "sdtune" / "data"
    source = "".join(p.read_text(encoding="utf-8") for p in package.glob("*.py"))
    names = set(re.findall(r'"((?:upscale|resize|center|face|bucket|mask|caption)_[a-z0-9]+)"', source))
    names = {n for n in names if f"def {n}(" not in source and n != "caption_truncated"}  # not functions
    assert not [n for n in names if f"`{n}`" not in DOC]
