"""The whole pipeline through kfp.local on the tiny model and the sample data, tracked in embedded MLflow."""

from __future__ import annotations

import base64
import os

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.conftest import sdtune_cli

pytestmark = pytest.mark.slow

STEPS = {"ingest", "preprocess", "caption", "train", "evaluate", "register"}


def _env(home, tracking_uri=None):
    env = dict(os.environ, SDTUNE_HOME=str(home), OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def _children(client, experiment_id, parent_id):
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


def test_pipeline_end_to_end_against_real_servers(tiny_assets, tmp_path, mlflow_endpoint):
    """The whole pipeline, tracked by a real MLflow server with S3 artifacts; then an unchanged retrain."""
    home = tmp_path / "home"
    args = (
        "run",
        "--local",
        "configs/debug/tiny_cpu.yaml",
        f"model.base={tiny_assets['model']}",
        f"ingest.sources=[{tiny_assets['data']}]",
        "name=e2e",
        "register.model_name=e2e-lora",
        "train.max_steps=8",
        "tracking.experiment=e2e",
    )
    done = sdtune_cli(*args, env=_env(home, mlflow_endpoint.url))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sdtune run finished" in done.stdout

    client = MlflowClient(mlflow_endpoint.url, registry_uri=mlflow_endpoint.url)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sdtune.role") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.max_steps"] == "8"
    assert "loss_tuned_trigger" in parent.data.metrics

    children = {
        r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) >= STEPS
    assert all(children[s].info.status == "FINISHED" for s in STEPS)

    losses = client.get_metric_history(children["train"].info.run_id, "loss")
    assert sorted(m.step for m in losses)[-1] == 8
    evaluate_files = {
        a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "samples/step_000008")
    }
    assert "samples/step_000008/grid.png" in evaluate_files
    model_files = {a.path for a in client.list_artifacts(children["train"].info.run_id, "model")}
    assert "model/pytorch_lora_weights.safetensors" in model_files
    report_files = {a.path for a in client.list_artifacts(children["ingest"].info.run_id, "reports")}
    assert "reports/report.json" in report_files

    version = client.get_model_version_by_alias("e2e-lora", "candidate")
    assert str(version.version) == "1"
    assert "metric.loss_tuned_trigger" in version.tags
    assert str(client.get_model_version_by_alias("e2e-lora", "champion").version) == "1"
    assert children["train"].info.artifact_uri.startswith("mlflow-artifacts:")  # stored in S3 via the server

    # The registered model loads as an MLflow pyfunc and generates images.
    import mlflow.pyfunc

    mlflow.set_tracking_uri(mlflow_endpoint.url)
    mlflow.set_registry_uri(mlflow_endpoint.url)
    model = mlflow.pyfunc.load_model("models:/e2e-lora@candidate")
    images = model.predict(["a photo of sks toy robot"])
    assert len(images) == 1 and base64.b64decode(images[0]).startswith(b"\x89PNG")

    # A retrain with unchanged content re-uses every expensive step and keeps the champion.
    again = sdtune_cli(*args, env=_env(home, mlflow_endpoint.url))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    second = next(
        r
        for r in client.search_runs([experiment.experiment_id], "tags.`sdtune.role` = 'parent'")
        if r.info.run_id != parent.info.run_id
    )
    cached = _children(client, experiment.experiment_id, second.info.run_id)
    assert {s: cached[s].data.tags.get("sdtune.cache") for s in STEPS - {"register"}} == dict.fromkeys(
        STEPS - {"register"}, "hit"
    )
    assert str(client.get_model_version_by_alias("e2e-lora", "candidate").version) == "2"
    assert str(client.get_model_version_by_alias("e2e-lora", "champion").version) == "1"


def test_failed_pipeline_is_one_line_and_marks_the_run_failed(tiny_assets, tmp_path):
    home = tmp_path / "home"
    done = sdtune_cli(
        "run",
        "--local",
        "configs/debug/tiny_cpu.yaml",
        f"model.base={tiny_assets['model']}",
        f"ingest.sources=[{tiny_assets['data']}]",
        "ingest.min_images=500",
        env=_env(home),
    )
    assert done.returncode == 4
    assert "Traceback" not in done.stderr.splitlines()[-1]
    assert done.stderr.strip().splitlines()[-1].startswith("error:")
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}", registry_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sdtune").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sdtune.role") == "parent")
    assert parent.info.status == "FAILED"
    assert "500" in parent.data.tags.get("sdtune.error", "")


def test_missing_base_model_is_a_clear_error(tmp_path):
    done = sdtune_cli(
        "run",
        "--local",
        "configs/debug/tiny_cpu.yaml",
        f"model.base={tmp_path / 'none'}",
        env=_env(tmp_path / "home"),
    )
    assert done.returncode != 0
    assert "base model folder not found" in done.stderr
    assert "Traceback" not in done.stderr
