"""ingest on folders and zips: generated names, sidecars, dedup, dataset rules, re-runs."""

from __future__ import annotations

import json

import pytest
from data_helpers import encode, make_zip, pattern

from sdtune.config import IngestConfig
from sdtune.data.ingest import ingest
from sdtune.errors import DatasetError
from sdtune.manifest import read_manifest, read_report, sha256_file


def test_folder_ingest_writes_generated_pngs_with_sources_and_sidecars(image_folder, tmp_path, cfg):
    result = ingest([str(image_folder)], tmp_path / "out", cfg)
    records = read_manifest(tmp_path / "out")
    assert [r.file for r in records] == [f"{i:06d}.png" for i in range(6)]
    assert records[0].source.endswith("img0.png")
    assert records[0].caption == "a photo of sks dog in the snow"
    assert all(r.caption is None for r in records[1:])
    for record in records:
        path = tmp_path / "out" / record.file
        assert path.read_bytes().startswith(b"\x89PNG") and sha256_file(path) == record.sha256
    assert result.report.counts == {"kept": 6}
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names >= {"manifest.jsonl", "report.json", "report.items.jsonl", "shards.json"}


def test_format_is_sniffed_not_taken_from_the_extension(tmp_path, cfg):
    src = tmp_path / "src"
    src.mkdir()
    (src / "really_a_png.jpg").write_bytes(encode(pattern(seed=1), "PNG"))
    (src / "really_a_jpeg.png").write_bytes(encode(pattern(seed=2), "JPEG"))
    (src / "notes.jpg").write_bytes(b"just some text")
    result = ingest([str(src)], tmp_path / "out", cfg.model_copy(update={"max_reject_fraction": 0.9}))
    assert [r.extra["format"] for r in result.records] == ["JPEG", "PNG"]
    skipped = [i for i in result.report.items if i.status == "skipped"]
    assert [(i.reason, i.item.endswith("notes.jpg")) for i in skipped] == [("not_an_image", True)]


def test_exact_duplicates_by_bytes_and_by_pixels(tmp_path, cfg):
    src = tmp_path / "src"
    src.mkdir()
    png = encode(pattern(seed=7), "PNG")
    (src / "a.png").write_bytes(png)
    (src / "b.png").write_bytes(png)  # same bytes
    (src / "c.webp").write_bytes(encode(pattern(seed=7), "WEBP", lossless=True))  # same pixels
    (src / "d.png").write_bytes(encode(pattern(seed=8), "PNG"))
    result = ingest([str(src)], tmp_path / "out", cfg)
    assert len(result.records) == 2
    reasons = {i.item.rsplit("/", 1)[-1]: (i.reason, i.detail) for i in result.report.items}
    assert reasons["b.png"][0] == "duplicate" and "a.png" in reasons["b.png"][1]
    assert reasons["c.webp"][0] == "duplicate"


def test_zip_source_as_path_and_at_path_with_sidecar(tmp_path, cfg):
    archive = make_zip(
        tmp_path / "upload.zip",
        {
            "pics/one.png": encode(pattern(seed=1), "PNG"),
            "pics/one.txt": b"a photo of sks cat",
            "two.jpg": encode(pattern(seed=2), "JPEG"),
            "__MACOSX/pics/._one.png": b"\x00\x05\x16\x07",
        },
    )
    for i, source in enumerate([str(archive), f"@{archive}"]):
        result = ingest([source], tmp_path / f"out{i}", cfg)
        assert [r.caption for r in result.records] == ["a photo of sks cat", None]
        assert result.records[0].source.endswith("upload.zip!pics/one.png")
        assert result.report.reasons == {"junk_member": 1}


def test_not_a_zip_and_missing_source_are_dataset_errors(tmp_path, cfg):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DatasetError, match="not a readable zip"):
        ingest([str(bad)], tmp_path / "out", cfg)
    with pytest.raises(DatasetError, match="source not found"):
        ingest([str(tmp_path / "nope")], tmp_path / "out2", cfg)
    with pytest.raises(DatasetError, match="no sources"):
        ingest([], tmp_path / "out3", cfg)


def test_too_few_images_names_the_number_and_still_writes_the_report(image_folder, tmp_path):
    with pytest.raises(DatasetError, match=r"only 6 usable image\(s\), at least 10 needed"):
        ingest([str(image_folder)], tmp_path / "out", IngestConfig(min_images=10, min_side=16))
    assert read_report(tmp_path / "out").summary["kept"] == 6


def test_reject_fraction(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"ok{i}.png").write_bytes(encode(pattern(seed=i), "PNG"))
        (src / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (src / ".DS_Store").write_bytes(b"junk")  # ignored: does not count as a rejection
    with pytest.raises(DatasetError, match=r"3 of 6 images rejected \(50%\)"):
        ingest([str(src)], tmp_path / "out", IngestConfig(min_images=1, min_side=16, max_reject_fraction=0.4))
    result = ingest(
        [str(src)], tmp_path / "out2", IngestConfig(min_images=1, min_side=16, max_reject_fraction=0.5)
    )
    assert result.report.reasons == {"truncated": 3, "junk_member": 1}


def test_rerun_replaces_previous_output_but_foreign_folders_are_refused(image_folder, tmp_path, cfg):
    out = tmp_path / "out"
    ingest([str(image_folder)], out, cfg)
    first = (out / "manifest.jsonl").read_bytes()
    ingest([str(image_folder)], out, cfg)
    assert (out / "manifest.jsonl").read_bytes() == first  # deterministic
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    (foreign / "000001.png").write_bytes(b"someone's frame")
    with pytest.raises(DatasetError, match="not empty"):
        ingest([str(image_folder)], foreign, cfg)
    assert (foreign / "thesis.docx").read_text() == "precious"
    assert (foreign / "000001.png").read_bytes() == b"someone's frame"


def test_a_failed_run_can_be_rerun_into_the_same_folder(image_folder, tmp_path, cfg):
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match="source not found"):
        ingest([str(image_folder), str(tmp_path / "typo")], out, cfg)  # fails after writing 6 images
    assert (out / "000005.png").exists()
    result = ingest([str(image_folder)], out, cfg)
    assert len(result.records) == 6


def test_report_json_has_one_entry_per_input_item(image_folder, tmp_path, cfg):
    (image_folder / "Thumbs.db").write_bytes(b"x")
    ingest([str(image_folder)], tmp_path / "out", cfg)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["items"]) == 7
    assert report["counts"] == {"kept": 6, "skipped": 1}
    assert {"item", "status", "reason", "detail", "transforms", "output"} <= report["items"][0].keys()
