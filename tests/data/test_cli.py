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
    # A shard the stage does not have: an empty "done" stage before, which merged into a smaller dataset.
    args = ["preprocess", str(tmp_path / "i"), "--out", str(tmp_path / "p9"), "--shard", "5"]
    assert main(args) == 2
    assert "has no shard 5: its shards are 0-2" in capsys.readouterr().err and not (tmp_path / "p9").exists()


def _snapshot(folder):
    """Every file under ``folder`` with its bytes: what a refused command must leave exactly as it was."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    ("command", "where", "problem"),
    [
        ("preprocess", "same", "is the input folder"),
        ("caption", "same", "is the input folder"),
        ("merge", "same", "is the input folder"),
        ("ingest", "same", "is the input folder"),
        ("preprocess", "inside", "lies inside the input"),
        ("ingest", "inside", "lies inside the input"),
        ("caption", "holding", "holds the input"),
    ],
)
def test_a_stage_refuses_an_out_that_overlaps_its_input(sample, tmp_path, capsys, command, where, problem):
    """`preprocess ing --out ing` used to empty ``ing`` (a stage folder is cleaned before it is read) and
    then fail on the missing images: now it is refused before anything is touched, and no FAILED is left."""
    assert main(["ingest", str(sample), "--out", str(tmp_path / "i")]) == 0
    assert (
        main(["preprocess", str(tmp_path / "i"), "--out", str(tmp_path / "data" / "p"), "--resolution", "64"])
        == 0
    )
    given = {"ingest": sample, "preprocess": tmp_path / "i"}.get(command, tmp_path / "data" / "p")
    out = {"same": given, "inside": given / "sub", "holding": given.parent}[where]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    extra = ["--trigger", "sks", "--class-noun", "robot"] if command == "caption" else []
    assert main([command, str(given), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert problem in err and "choose a new folder outside it" in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before  # the input intact, no FAILED, no .sdtune-stage, no sub folder
    assert not (given / "sub").exists()


def test_sample_data_replaces_an_earlier_run_and_refuses_other_folders(sample, tmp_path, capsys):
    (sample / ".complete").touch()  # what `make run` adds: still an earlier sample-data folder
    assert main(["sample-data", "--out", str(sample), "--count", "4"]) == 0
    # replaced, not overwritten in part: the 8 pictures of the first run left 4 stale ones behind
    assert len([p for p in sample.iterdir() if p.suffix != ".txt"]) == 4
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    capsys.readouterr()
    for out, message in [
        (mine, "is not empty (holds 'README.md') and is not an earlier `sdtune sample-data` output"),
        (tmp_path / "afile", "is not a folder"),
        (tmp_path / "afile" / "raw", "is not a folder"),
    ]:
        assert main(["sample-data", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and message in err, err
    assert (mine / "README.md").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == [
        "README.md"
    ]
    assert (tmp_path / "afile").read_text() == "mine"
