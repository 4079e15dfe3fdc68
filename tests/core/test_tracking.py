"""The tracking layer against the embedded sqlite store (the real-server tests live in tests/tracking)."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from sdtune import tracking
from sdtune.config import RunConfig


def test_parent_and_nested_runs(sdtune_home):
    cfg = RunConfig(name="unit")
    parent = tracking.start_parent_run(
        "exp-unit", "unit", cfg.model_dump(mode="json"), tags={"kfp.run_id": "k1"}
    )
    with tracking.step_run(parent, "train") as run:
        run.log_metrics({"loss": 0.5}, step=3)
        run.log_text("hello", "notes/hello.txt")
    assert tracking.find_parent_run("exp-unit", "k1") == parent
    assert tracking.find_parent_run("exp-unit", "other") is None
    tracking.finish_run(parent)

    client = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    child = client.get_run(run.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.info.status == "FINISHED"
    assert client.get_metric_history(run.run_id, "loss")[0].step == 3
    assert client.get_run(parent).data.params["train.rank"] == str(cfg.train.rank)
    assert (sdtune_home / "mlflow.db").exists()
    local = mlflow.artifacts.download_artifacts(
        run_id=run.run_id, artifact_path="notes/hello.txt", tracking_uri=tracking.tracking_uri()
    )
    assert Path(local).read_text() == "hello"


def test_failed_step_marks_run_failed(sdtune_home):
    parent = tracking.start_parent_run("exp-unit", "unit", {}, tags={})
    with pytest.raises(RuntimeError), tracking.step_run(parent, "ingest") as run:
        raise RuntimeError("boom")
    assert (
        MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
        .get_run(run.run_id)
        .info.status
        == "FAILED"
    )


def test_no_parent_means_no_tracking(sdtune_home):
    with tracking.step_run("", "ingest") as run:
        assert not run.enabled
        run.log_metrics({"x": 1.0})
    assert not (sdtune_home / "mlflow.db").exists()


def test_params_are_an_allowlist():
    params = tracking.flatten_params(
        {
            "train": {"rank": 4, "target_modules": ["a", "b"]},
            "cluster": {"secrets": "s3cr3t"},
            "ingest": {"sources": ["s3://k:v@b"]},
        }
    )
    assert params == {"train.rank": "4", "train.target_modules": json.dumps(["a", "b"])}


def test_jsonl_and_composite_logger(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    logger = tracking.CompositeLogger(tracking.JsonlLogger(path))
    logger.log({"loss": 1.25}, step=1)
    logger.log({"loss": 1.0}, step=2)
    logger.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 1.25},
        {"step": 2, "loss": 1.0},
    ]


def test_embedded_store_stays_embedded_after_mlflow_exports_its_uri(sdtune_home, monkeypatch):
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; the embedded store must not then pass for a
    server (artifacts would land in ./mlruns of whatever folder a step ran in, and `mlflow ui` would not find them)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.mlflow_client()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.embedded_uri())  # what MLflow leaves behind
    assert tracking.uses_embedded_store()
    experiment_id = tracking.ensure_experiment("exp-embedded")
    location = MlflowClient(tracking.tracking_uri()).get_experiment(experiment_id).artifact_location
    assert location == (tracking.sdtune_home() / "mlartifacts").as_uri()
    assert tracking.ui_command() == f"mlflow ui --backend-store-uri {tracking.embedded_uri()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert not tracking.uses_embedded_store()


def test_a_run_that_does_not_exist_is_refused_at_once(sdtune_home):
    """The store's "not found" is an answer, not an outage: no buffering and retrying until close."""
    from sdtune.errors import UsageError

    with pytest.raises(UsageError, match="^MLflow run deadbeef not found$"):
        tracking.MLflowLogger("deadbeef", close_timeout_s=0)
    with pytest.raises(UsageError, match="is not a valid run id"):
        tracking.MLflowLogger("../x", close_timeout_s=0)
    parent = tracking.start_parent_run("exp-unit", "unit", {})
    logger = tracking.MLflowLogger(parent, close_timeout_s=0)  # a run that exists still logs
    logger.log({"loss": 0.5}, step=1)
    logger.close()
    client = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    assert [m.step for m in client.get_metric_history(parent, "loss")] == [1]
