import json

import pytest

from sdtune.errors import DatasetError
from sdtune.manifest import (
    ItemReport,
    Record,
    StageReport,
    manifest_digest,
    read_manifest,
    read_report,
    report_markdown,
    write_stage,
)


def _record(i: int) -> Record:
    return Record(
        file=f"{i:06d}.png", caption=f"c{i}", width=8, height=8, sha256=f"{i:064x}", source=f"src/{i}.jpg"
    )


def test_write_and_read_back(tmp_path):
    report = StageReport(stage="ingest")
    report.add(ItemReport(item="a.jpg", status="kept", output="000000.png"))
    report.add(ItemReport(item="b.txt", status="skipped", reason="not_an_image", detail="plain text"))
    report.add(ItemReport(item="c.gif", status="normalised", transforms=["first_frame"]))
    result = write_stage(tmp_path, [_record(0), _record(1)], report)

    assert read_manifest(tmp_path) == result.records
    back = read_report(tmp_path)
    assert back.counts == {"kept": 1, "skipped": 1, "normalised": 1}
    assert back.reasons == {"not_an_image": 1}
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines] == ["000000.png", "000001.png"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_digest_follows_content(tmp_path):
    write_stage(tmp_path / "a", [_record(0)], StageReport(stage="s"))
    write_stage(tmp_path / "b", [_record(0)], StageReport(stage="s"))
    write_stage(tmp_path / "c", [_record(1)], StageReport(stage="s"))
    assert manifest_digest(tmp_path / "a") == manifest_digest(tmp_path / "b")
    assert manifest_digest(tmp_path / "a") != manifest_digest(tmp_path / "c")


def test_missing_manifest_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="manifest.jsonl"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    ("line", "where"),
    [("{not json", "the line: Invalid JSON"), ('{"file": "x.png", "width": "wide"}', "width")],
)
def test_a_hand_edited_manifest_line_is_one_error_naming_it(tmp_path, line, where):
    """Was a pydantic ValidationError traceback from every stage reading the folder."""
    write_stage(tmp_path, [_record(0), _record(1)], StageReport(stage="ingest"))
    lines = (tmp_path / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "manifest.jsonl").write_text(f"{lines[0]}\n{line}\n")
    with pytest.raises(
        DatasetError, match=rf"manifest.jsonl line 2 is not a manifest record \({where}"
    ) as info:
        read_manifest(tmp_path)
    assert "\n" not in str(info.value)


def test_markdown_escapes_table_cells():
    report = StageReport(stage="ingest")
    report.add(ItemReport(item="x", status="skipped", reason="corrupt", detail="a|b"))
    md = report_markdown(report.finalise())
    assert "a\\|b" in md and "| `corrupt` | 1 |" in md
