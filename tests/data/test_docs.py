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
