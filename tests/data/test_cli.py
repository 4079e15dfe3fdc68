"""The data commands through ``sdtune.cli.main``: exit codes, one-line errors, options over --config."""

from __future__ import annotations

import pytest

from sdtune.cli import main
from sdtune.manifest import read_manifest


@pytest.fixture
def sample(tmp_path):
    assert main(["sample-data", "--out", str(tmp_path / "raw"), "--count", "8"]) == 0
    return tmp_path / "raw"


def test_data_chain_through_the_cli(sample, tmp_path, capsys):
    assert main(["ingest", str(sample), "--out", str(tmp_path / "i"), "--min-images", "8"]) == 0
    assert "8 image(s) kept" in capsys.readouterr().out
    assert main(["preprocess", str(tmp_path / "i"), "--out", str(tmp_path / "p"), "--resolution", "64"]) == 0
    assert (
        main(
            [
                "caption",
                str(tmp_path / "p"),
                "--out",
                str(tmp_path / "c"),
                "--trigger",
                "zwx",
                "--class-noun",
                "robot",
            ]
        )
        == 0
    )
    records = read_manifest(tmp_path / "c")
    assert records[1].caption == "a photo of zwx robot" and records[0].width == 64


def test_config_file_section_with_option_overrides(sample, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("ingest:\n  min_images: 50\ncaption:\n  class_noun: toy\n  trigger: abc\n")
    assert main(["ingest", str(sample), "--out", str(tmp_path / "i"), "--config", str(config)]) == 2
    assert (
        main(
            [
                "ingest",
                str(sample),
                "--out",
                str(tmp_path / "j"),
                "--config",
                str(config),
                "--min-images",
                "3",
            ]
        )
        == 0
    )
    assert main(["preprocess", str(tmp_path / "j"), "--out", str(tmp_path / "p"), "--resolution", "64"]) == 0
    assert main(["caption", str(tmp_path / "p"), "--out", str(tmp_path / "c"), "--config", str(config)]) == 0
    assert read_manifest(tmp_path / "c")[1].caption == "a photo of abc toy"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "{tmp}/missing", "--out", "{tmp}/o"], "source not found"),
        (["ingest", "{tmp}/fake.zip", "--out", "{tmp}/o"], "not a readable zip"),
        (["ingest", "{tmp}/few", "--out", "{tmp}/o"], "only 1 usable image"),
        (["preprocess", "{tmp}/few", "--out", "{tmp}/o"], "manifest.jsonl is missing"),
        (["preprocess", "{tmp}/few", "--out", "{tmp}/o", "--resolution", "2"], "--resolution"),
        (["preprocess", "{tmp}/few", "--out", "{tmp}/o", "--resolution", "33"], "multiple of 8"),
        (["ingest", "{tmp}/few", "--out", "{tmp}/o", "--config", "{tmp}/nope.yaml"], "config file not found"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path, capsys, args, message):
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    from data_helpers import encode, pattern

    (tmp_path / "few" / "b.png").write_bytes(encode(pattern(), "PNG"))
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and message in " ".join(err.split())
    assert "Traceback" not in err


def test_sharded_preprocess_and_merge_through_the_cli(sample, tmp_path, capsys):
    import json

    assert main(["ingest", str(sample), "--out", str(tmp_path / "i"), "--shard-size", "3"]) == 0
    shards = [s["id"] for s in json.loads((tmp_path / "i" / "shards.json").read_text())["shards"]]
    assert shards == [0, 1, 2]
    parts = []
    for shard in shards:
        out = str(tmp_path / f"p{shard}")
        args = ["preprocess", str(tmp_path / "i"), "--out", out, "--resolution", "64", "--shard", str(shard)]
        assert main(args + ["--crop", "none", "--workers", "1"]) == 0
        parts.append(out)
    capsys.readouterr()
    assert main(["merge", *parts, "--out", str(tmp_path / "m")]) == 0
    assert "8 image(s) kept" in capsys.readouterr().out
    assert len(read_manifest(tmp_path / "m")) == 8
    assert main(["preprocess", str(tmp_path / "i"), "--out", str(tmp_path / "x"), "--crop", "diagonal"]) == 2
    assert "--crop" in capsys.readouterr().err
