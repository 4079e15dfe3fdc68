"""`sdtune runs list|compare` over runs recorded the way the pipeline records them."""

import re

from PIL import Image

from sdtune import tracking
from sdtune.cli import main
from sdtune.compare import compare_html, get_rows


def _pipeline_like_run(tmp_path, name: str, lr: str, loss: float) -> str:
    parent = tracking.start_parent_run("cmp", name, {"train": {"learning_rate": lr, "rank": 4}})
    (tmp_path / name).mkdir()
    grid = tmp_path / name / "grid.png"
    Image.new("RGB", (16, 8), "blue").save(grid)
    with tracking.step_run(parent, "evaluate") as run:
        run.log_metrics({"loss_tuned_trigger": loss})
        run.log_artifact(grid, "samples/step_000010")
    tracking.StepRun(tracking.mlflow_client(), parent).log_metrics({"loss_tuned_trigger": loss})
    tracking.finish_run(parent)
    return parent


def test_list_and_compare(sdtune_home, tmp_path, capsys):
    a = _pipeline_like_run(tmp_path, "run-a", "1e-4", 0.30)
    b = _pipeline_like_run(tmp_path, "run-b", "5e-5", 0.25)

    assert main(["runs", "list", "--experiment", "cmp"]) == 0
    out = capsys.readouterr().out
    assert "run-a" in out and "run-b" in out and a[:8] in out

    assert main(["runs", "compare", a, b]) == 0
    out = capsys.readouterr().out
    assert "train.learning_rate" in out and "train.rank" not in out  # only what differs

    page = compare_html(get_rows([a, b]), tmp_path / "cmp.html", tmp_path / "work").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r"(src|href)=['\"](?!data:)", page)


def test_empty_experiment_and_unknown_run(sdtune_home, capsys):
    assert main(["runs", "list", "--experiment", "nothing-here"]) == 0
    assert "no runs" in capsys.readouterr().out
    assert main(["runs", "compare", "0123456789abcdef"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
