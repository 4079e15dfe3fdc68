"""The whole pipeline through kfp.local on the tiny model and the sample data, tracked in embedded MLflow."""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.conftest import sdtune_cli

pytestmark = pytest.mark.slow

STEPS = {"ingest", "preprocess", "caption", "train", "evaluate", "register"}


def _env(home):
    env = dict(os.environ, SDTUNE_HOME=str(home), OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_pipeline_runs_end_to_end_and_tracks_everything(tiny_assets, tmp_path):
    home = tmp_path / "home"
    done = sdtune_cli(
        "run", "--local", "configs/debug/tiny_cpu.yaml",
        f"model.base={tiny_assets['model']}", f"ingest.sources=[{tiny_assets['data']}]",
        "name=e2e", "register.model_name=e2e-lora", "train.max_steps=8",
        env=_env(home),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sdtune run finished" in done.stdout
    assert "mlflow ui --backend-store-uri" in done.stdout

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sdtune")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sdtune.role") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.max_steps"] == "8"
    assert "loss_tuned_trigger" in parent.data.metrics

    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert STEPS <= set(children)
    assert all(children[s].info.status == "FINISHED" for s in STEPS)

    losses = client.get_metric_history(children["train"].info.run_id, "loss")
    assert sorted(m.step for m in losses)[-1] == 8
    evaluate_files = {a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "samples/step_000008")}
    assert "samples/step_000008/grid.png" in evaluate_files
    model_files = {a.path for a in client.list_artifacts(children["train"].info.run_id, "model")}
    assert "model/pytorch_lora_weights.safetensors" in model_files
    report_files = {a.path for a in client.list_artifacts(children["ingest"].info.run_id, "reports")}
    assert "reports/report.json" in report_files

    version = client.get_model_version_by_alias("e2e-lora", "candidate")
    assert version.version == "1"
    assert "metric.loss_tuned_trigger" in version.tags


def test_failed_pipeline_is_one_line_and_marks_the_run_failed(tiny_assets, tmp_path):
    home = tmp_path / "home"
    done = sdtune_cli(
        "run", "--local", "configs/debug/tiny_cpu.yaml",
        f"model.base={tiny_assets['model']}", f"ingest.sources=[{tiny_assets['data']}]",
        "ingest.min_images=500",
        env=_env(home),
    )
    assert done.returncode == 4
    assert "Traceback" not in done.stderr.splitlines()[-1]
    assert done.stderr.strip().splitlines()[-1].startswith("error:")
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sdtune").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sdtune.role") == "parent")
    assert parent.info.status == "FAILED"
    assert "500" in parent.data.tags.get("sdtune.error", "")


def test_missing_base_model_is_a_clear_error(tmp_path):
    done = sdtune_cli("run", "--local", "configs/debug/tiny_cpu.yaml", f"model.base={tmp_path / 'none'}",
                      env=_env(tmp_path / "home"))
    assert done.returncode != 0
    assert "base model folder not found" in done.stderr
    assert "Traceback" not in done.stderr
