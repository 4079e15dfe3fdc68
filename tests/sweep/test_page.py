"""The comparison page (synthetic trials): self-contained, every image decodes in headless Chromium, no errors;
the select step logs it and fails the sweep past ``max_failed``; the sweep pipeline compiles."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from sdtune.config import RunConfig
from sdtune.sweep.page import comparison_html
from sdtune.sweep.select import SweepFailed, TrialResult
from tests.sweep.chromium import assert_renders


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (128, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def _results():
    return [
        TrialResult(
            0,
            "trial-000",
            {"train.learning_rate": 1e-4, "caption.template": "a {trigger}"},
            "FINISHED",
            {"loss_tuned_trigger": 0.9, "loss_base_trigger": 1.0},
            seconds=12,
        ),
        TrialResult(
            1,
            "trial-001",
            {"train.learning_rate": 1e-3, "caption.template": "b {trigger}"},
            "FINISHED",
            {"loss_tuned_trigger": 0.7, "loss_base_trigger": 1.0},
            seconds=11,
        ),
        TrialResult(
            2,
            "trial-002",
            {"train.learning_rate": 1e-2, "caption.template": "<b>&"},
            "FAILED",
            error="TrainingError: training exited with code 1 (<diverged>)",
        ),
    ]


def test_page_renders_in_headless_chromium(tmp_path):
    results = _results()
    grids = {"trial-000": _png("red"), "trial-001": _png("blue")}
    page = comparison_html("sweep-x", "loss_tuned_trigger", "minimize", results, grids, results[1])
    assert page.index("trial-001") < page.index("trial-000")  # best first
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page.replace("<b>&lt;", "")  # escaped
    assert page.count("<svg") == 2  # one plot per varied key
    path = tmp_path / "comparison.html"
    path.write_text(page, encoding="utf-8")
    result = assert_renders(path, tmp_path, min_images=2)
    assert result["loaded"] == 2


def test_select_step_logs_the_page_and_applies_max_failed(sdtune_home, tmp_path):
    from mlflow.tracking import MlflowClient

    from sdtune import tracking
    from sdtune.sweep import tracking as sweep_tracking
    from sdtune.sweep.space import Trial
    from sdtune.sweep.steps import select_best_step

    cfg = RunConfig.model_validate({"tracking": {"experiment": "sweep-unit"}, "sweep": {"max_failed": 1}})
    results = _results()
    parent = sweep_tracking.start_sweep_run(
        cfg, "sweep-unit-1", [Trial(r.index, r.overrides) for r in results]
    )
    for r in results:
        r.run_id = sweep_tracking.open_trial_run(parent, Trial(r.index, r.overrides), cfg)
        sweep_tracking.close_trial_run(r.run_id, r)
    best = select_best_step(
        cfg.to_param(), parent, "sweep-unit-1", [r.to_json() for r in results], tmp_path / "page.html"
    )
    assert best["name"] == "trial-001"
    client = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    assert client.get_run(results[1].run_id).data.tags["sdtune.best_trial"] == "true"
    assert client.get_run(results[0].run_id).data.tags["sdtune.best_trial"] == "false"
    failed = client.get_run(results[2].run_id)
    assert failed.info.status == "FAILED" and "diverged" in failed.data.tags["sdtune.error"]
    run = client.get_run(parent)
    assert run.data.tags["sdtune.sweep_id"] == "sweep-unit-1" and run.data.metrics["sweep_failed"] == 1
    assert (
        run.data.metrics["loss_tuned_trigger"] == 0.7
        and run.data.params["sweep.metric"] == "loss_tuned_trigger"
    )
    assert {a.path for a in client.list_artifacts(parent, "sweep")} == {
        "sweep/comparison.html",
        "sweep/trials.json",
    }
    rows = sweep_tracking.trial_rows("sweep-unit", "sweep-unit-1")
    assert [(r.name, r.status) for r in rows] == [
        ("trial-000", "FINISHED"),
        ("trial-001", "FINISHED"),
        ("trial-002", "FAILED"),
    ]
    assert rows[0].overrides == results[0].overrides

    strict = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"max_failed": 0})})
    with pytest.raises(SweepFailed, match="1 of 3 trials failed"):
        select_best_step(
            strict.to_param(), parent, "sweep-unit-1", [r.to_json() for r in results], tmp_path / "page2.html"
        )
    assert (tmp_path / "page2.html").is_file()  # the page is written even when the sweep fails
    assert "1 of 3" in client.get_run(parent).data.tags["sdtune.sweep.error"]


def test_sweep_pipeline_compiles_with_parallelism_and_train_settings(tmp_path):
    import yaml

    from pipelines.sweep import compile_sweep
    from sdtune.sweep.space import build_trials

    cfg = RunConfig.model_validate({"sweep": {"grid": {"train.rank": [4, 8, 16]}, "parallelism": 3}})
    path = compile_sweep(cfg, build_trials(cfg), tmp_path / "sweep.yaml", "sweep-c")
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    (loop,) = [task for task in tasks.values() if "parameterIterator" in task]
    assert loop["iteratorPolicy"] == {"parallelismLimit": 3}
    items = json.loads(loop["parameterIterator"]["items"]["raw"])
    assert [json.loads(i)["overrides"] for i in items] == [
        {"train.rank": 4},
        {"train.rank": 8},
        {"train.rank": 16},
    ]
    trial_exec = spec["deploymentSpec"]["executors"]["exec-sweep-trial-op"]["container"]
    assert trial_exec["resources"]["accelerator"]["resourceCount"] == "1"
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-sweep-trial-op"]
    assert any(s["secretName"] == "mlpipeline-minio-artifact" for s in platform["secretAsEnv"])
