"""The CLI's error paths follow the one exit-code table in docs/cli.md: one `error:` line, the documented code,
no traceback, no empty output folder left behind."""

from __future__ import annotations

import re

import pytest

from sdtune import errors, tracking
from sdtune.cli import main
from tests.conftest import REPO_ROOT

TINY = str(REPO_ROOT / "configs/debug/tiny_cpu.yaml")


def _documented_codes() -> set[int]:
    table = (REPO_ROOT / "docs/cli.md").read_text(encoding="utf-8").split("## Exit codes")[1]
    return {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code in _documented_codes(), (args, code)
    return code, out, err


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_every_exit_code_in_the_code_is_in_the_table():
    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.SdtuneError)
    }
    codes |= {errors.EXIT_PREEMPTED, errors.EXIT_OUT_OF_MEMORY, errors.EXIT_INTERRUPTED}
    assert codes <= _documented_codes()


def test_usage_and_config_mistakes_are_exit_2(capsys, sdtune_home, tmp_path):
    assert _run(capsys, "no-such-command")[0] == 2
    code, _, err = _run(capsys, "run", TINY)
    assert code == 2 and "--local" in _one_error(err)
    code, _, err = _run(capsys, "run", "--local", TINY, "train.learnin_rate=0.1")
    line = _one_error(err)
    assert code == 2 and line.startswith("error: override train.learnin_rate=0.1:")
    assert "did you mean train.learning_rate?" in line and "tiny_cpu.yaml" not in line
    code, _, err = _run(capsys, "run", "--local", TINY, f"model.base={tmp_path / 'missing'}")
    assert code == 2 and "base model folder not found" in _one_error(err)
    assert not (sdtune_home / "logs").exists()  # refused before any task started
    code, _, err = _run(capsys, "train", "--config", str(tmp_path / "nope.yaml"), "--data", "x", "--out", "y")
    assert code == 2 and "config file not found" in _one_error(err)


def test_plan_takes_friendly_gpu_names(capsys):
    code, out, _ = _run(
        capsys, "plan", str(REPO_ROOT / "configs/sd15/lora_1gpu.yaml"), "--gpu", "h100", "--json"
    )
    assert code == 0 and '"gpu": "h100-80gb"' in out
    code, _, err = _run(capsys, "plan", str(REPO_ROOT / "configs/sd15/lora_1gpu.yaml"), "--gpu", "a100")
    assert code == 2 and "a100-40gb or a100-80gb" in _one_error(err)


def test_a_failed_stage_is_marked_and_refused_downstream(capsys, tmp_path):
    raw = tmp_path / "raw"
    assert _run(capsys, "sample-data", "--out", str(raw), "--count", "3")[0] == 0
    ingested = tmp_path / "ingested"
    code, _, err = _run(capsys, "ingest", str(raw), "--out", str(ingested))
    assert code == 2 and "only 3 usable image(s)" in _one_error(err)
    assert (ingested / "FAILED").read_text().startswith("only 3 usable image(s)")

    pre = tmp_path / "pre"
    code, _, err = _run(capsys, "preprocess", str(ingested), "--out", str(pre))
    assert code == 2 and "failed stage" in _one_error(err)
    assert not pre.exists()  # no empty output folder left behind

    # Run again with enough images: the marker goes, the next stage accepts the folder.
    assert _run(capsys, "ingest", str(raw), "--out", str(ingested), "--min-images", "3")[0] == 0
    assert not (ingested / "FAILED").exists()
    assert _run(capsys, "preprocess", str(ingested), "--out", str(pre), "--resolution", "64")[0] == 0


def test_train_refuses_uncaptioned_data_and_evaluate_a_folder_without_weights(capsys, tmp_path):
    raw, ingested = tmp_path / "raw", tmp_path / "ingested"
    assert _run(capsys, "sample-data", "--out", str(raw), "--count", "5")[0] == 0
    assert _run(capsys, "ingest", str(raw), "--out", str(ingested))[0] == 0
    out = tmp_path / "lora"
    code, _, err = _run(capsys, "train", "--config", TINY, "--data", str(ingested), "--out", str(out))
    line = _one_error(err)
    assert code == 2 and re.search(r"\d+ of 5 training image\(s\) have no caption", line)
    assert "sdtune caption" in line and not out.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    evaluation = tmp_path / "eval"
    code, _, err = _run(
        capsys,
        "evaluate",
        "--config",
        TINY,
        "--data",
        str(ingested),
        "--lora",
        str(empty),
        "--out",
        str(evaluation),
    )
    assert code == 2 and "not a training output" in _one_error(err)
    assert not evaluation.exists()
    code, _, err = _run(
        capsys, "generate", "--config", TINY, "--lora", str(empty), "-p", "x", "--out", str(evaluation)
    )
    assert code == 2 and "not a training output" in _one_error(err)


def test_runs_compare_takes_the_ids_runs_list_prints(capsys, sdtune_home, monkeypatch):
    from sdtune.cli import runs

    first = tracking.start_parent_run("sdtune", "first", {"train": {"rank": 4, "method": "lora"}})
    second = tracking.start_parent_run("sdtune", "second-with-a-long-name", {"train": {"rank": 8}})
    for run_id in (first, second):
        metrics = {"loss_tuned_trigger": 0.5, "loss_base_trigger": 0.6, "loss_delta_class": 0.1}
        metrics |= {"fidelity_clip_score": 0.3, "loss_tuned_class": 0.4, "loss_delta_trigger": -0.1}
        tracking.StepRun(tracking.mlflow_client(), run_id).log_metrics(metrics)
    monkeypatch.setattr(runs.console, "width", 100)
    code, out, _ = _run(capsys, "runs", "list")
    assert code == 0 and first[:8] in out and second[:8] in out
    # The default columns fit 100 characters without squeezing: the gate metric's name and value show whole.
    assert max(len(line) for line in out.splitlines()) <= 100
    assert "loss_tuned_trigger" in out and "0.5" in out and "…" not in out.split("second")[0]
    code, out, _ = _run(capsys, "runs", "list", "--json")
    assert code == 0 and '"loss_base_trigger": 0.6' in out
    code, out, _ = _run(capsys, "runs", "compare", first[:8], second[:8])
    assert code == 0 and "train.rank" in out
    code, _, err = _run(capsys, "runs", "compare", "ffffffff")
    assert code == 2 and "no run id starts with 'ffffffff'" in _one_error(err)
    code, _, err = _run(capsys, "runs", "compare", "")
    assert code == 2 and "ambiguous" in _one_error(err)
    code, _, err = _run(capsys, "runs", "compare")
    assert code == 2


@pytest.mark.parametrize("args", [("--version",), ("runs", "list", "--help"), ("generate", "--help")])
def test_version_and_help(capsys, args):
    code, out, _ = _run(capsys, *args)
    assert code == 0 and "<bool>" not in out
    if args == ("--version",):
        from sdtune import __version__

        assert out.strip() == f"sdtune {__version__}"
    else:
        assert "Example: sdtune" in out


def test_ingest_report_speaks_of_the_files_a_person_left(capsys, tmp_path):
    raw = tmp_path / "raw"
    assert _run(capsys, "sample-data", "--out", str(raw), "--count", "5")[0] == 0
    (raw / ".complete").touch()  # what `make run` leaves: sdtune's own marker, not the user's junk
    (raw / "notes.txt").write_text("shot on a phone")
    (raw / "broken.gif").write_bytes(b"GIF89a" + b"x" * 20)  # Pillow: "cannot identify image file <…>"
    assert _run(capsys, "ingest", str(raw), "--out", str(tmp_path / "ingested"))[0] == 0
    report = (tmp_path / "ingested" / "report.json").read_text()
    assert ".complete" not in report
    assert "notes.txt" in report and "no image of the same name" in report
    assert "broken.gif" in report and "cannot identify image file" in report and "_io." not in report


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", TINY, "--mfu", "0"], "--mfu"),  # was a ZeroDivisionError
        (["plan", TINY, "--num-gpus", "-2"], "--num-gpus"),  # was a plan for "-2× a100" costing $-0.01
        (["plan", TINY, "--usd-per-gpu-hour", "-3"], "--usd-per-gpu-hour"),
        (["plan", TINY, "--images", "-5"], "--images"),
        (["generate", "--config", TINY, "-p", "x", "--seeds", "99999999999999999999"], "--seeds"),
        (["generate", "--config", TINY, "-p", "x", "--size", "33"], "multiple of 8"),
    ],
)
def test_out_of_range_options_are_one_line_errors(capsys, tmp_path, args, message):
    code, _, err = (
        _run(capsys, *args, "--out", str(tmp_path / "o")) if args[0] == "generate" else _run(capsys, *args)
    )
    assert code == 2 and message in _one_error(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["ingest", "photos[/]", "--out", "x"], "source not found: photos[/]"),  # was a MarkupError
        (["ingest", "my:smile:dir", "--out", "x"], "source not found: my:smile:dir"),  # was an emoji
        (["ingest", "[red]x", "--out", "x"], "source not found: [red]x"),  # was "x"
        (["plan", "cfg[/b].yaml"], "config file not found: cfg[/b].yaml"),
        (
            ["sweep", TINY, "--grid", "train.learning_rate=loguniform:-1:1e-3", "--local"],
            "'loguniform:-1:1e-3'",
        ),
    ],
)
def test_user_text_in_errors_is_printed_literally(capsys, tmp_path, monkeypatch, args, shown):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *args)
    assert code == 2 and shown in _one_error(err)


def test_user_text_in_a_stage_summary_is_printed_literally(capsys, tmp_path):
    raw = tmp_path / "raw"
    assert _run(capsys, "sample-data", "--out", str(raw), "--count", "2")[0] == 0
    out = tmp_path / "ok[/]dir:smile:"
    code, printed, _ = _run(capsys, "ingest", str(raw), "--out", str(out), "--min-images", "1")
    assert code == 0 and str(out) in printed.replace("\n", "")  # was a MarkupError after the stage ran


def test_unreachable_s3_is_exit_4_and_s3_labels_read_whole(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    code, _, err = _run(capsys, "ingest", "s3://bucket/prefix", "--out", str(tmp_path / "o"))
    assert code == 4 and _one_error(err) == "error: s3://bucket/prefix: cannot reach S3 (NewConnectionError)"
    assert not (tmp_path / "o").exists()
    code, _, err = _run(capsys, "ingest", "s3://", "--out", str(tmp_path / "o"))
    assert code == 2 and _one_error(err) == "error: s3://: expected s3://bucket/prefix"  # was "s3::"


def test_a_katib_sweep_without_a_namespace_is_bad_input(capsys, tmp_path):
    out = tmp_path / "sw.yaml"
    code, _, err = _run(
        capsys, "sweep", TINY, "--grid", "train.rank=4", "--engine", "katib", "--out", str(out)
    )
    assert code == 2 and "cluster.namespace is not set" in _one_error(err)  # was exit 4, an outage


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("afile/p.yaml", "afile is a file, not a folder"),  # was a FileExistsError traceback
        ("raw", "is a folder; name the YAML file to write, e.g. {tmp}/raw/personalize.yaml"),  # a ValueError
        ("p.json", "the pipeline is written as YAML; name a .yaml file"),
    ],
)
def test_compile_out_must_name_a_yaml_file(capsys, tmp_path, out, message):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "raw").mkdir()
    code, _, err = _run(capsys, "compile", "--config", TINY, "--out", str(tmp_path / out))
    assert code == 2 and message.format(tmp=tmp_path) in _one_error(err)
    assert (tmp_path / "afile").read_text() == "mine" and not any((tmp_path / "raw").iterdir())
