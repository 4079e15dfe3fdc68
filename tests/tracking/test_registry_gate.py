"""Registry and the retrain gate: a new version replaces the champion only when it is better."""

import pytest
from mlflow.tracking import MlflowClient

from sdtune import tracking
from sdtune.config import RunConfig
from sdtune.registry import decide, register_model


@pytest.mark.parametrize(
    "candidate, champion, direction, margin, promote",
    [
        (0.5, None, "minimize", 0.0, True),
        (0.4, 0.5, "minimize", 0.0, True),
        (0.5, 0.5, "minimize", 0.0, False),
        (0.45, 0.5, "minimize", 0.1, False),
        (0.6, 0.5, "maximize", 0.05, True),
        (0.52, 0.5, "maximize", 0.05, False),
        (None, 0.5, "minimize", 0.0, False),
    ],
)
def test_gate_rule(candidate, champion, direction, margin, promote):
    assert decide(candidate, champion, direction, margin)[0] is promote


def _register(tmp_path, loss):
    model_dir = tmp_path / f"model-{loss}"
    model_dir.mkdir()
    (model_dir / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    cfg = RunConfig(name="gate")
    cfg.register.model_name = "gated"
    cfg.register.gate_margin = 0.01
    parent = tracking.start_parent_run("gate", "gate", {})
    with tracking.step_run(parent, "register") as run:
        return register_model(cfg, model_dir, {"loss_tuned_trigger": loss}, run_id=run.run_id)


def test_champion_changes_only_for_a_better_candidate(sdtune_home, tmp_path):
    client = lambda: MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())  # noqa: E731
    first = _register(tmp_path, 0.50)
    assert first["gate"]["promote"] and first["gate"]["reason"] == "no champion yet"
    assert str(client().get_model_version_by_alias("gated", "champion").version) == "1"

    worse = _register(tmp_path, 0.55)
    assert not worse["gate"]["promote"]
    assert str(client().get_model_version_by_alias("gated", "champion").version) == "1"
    assert str(client().get_model_version_by_alias("gated", "candidate").version) == "2"
    assert client().get_model_version("gated", "2").tags["gate.decision"] == "kept_champion"

    barely = _register(tmp_path, 0.495)  # inside the 0.01 margin
    assert not barely["gate"]["promote"]

    better = _register(tmp_path, 0.40)
    assert better["gate"]["promote"] and better["gate"]["champion"] == pytest.approx(0.5)
    assert str(client().get_model_version_by_alias("gated", "champion").version) == "4"
    tags = client().get_model_version("gated", "4").tags
    assert tags["gate.decision"] == "promoted" and float(tags["metric.loss_tuned_trigger"]) == 0.4


def test_register_step_logs_gate_metrics_while_its_run_is_open(sdtune_home, tmp_path):
    import json

    import mlflow
    import yaml

    from sdtune.steps import register_step

    mlflow.set_registry_uri(tracking.tracking_uri())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"loss_tuned_trigger": 0.5}))
    config = {"name": "gate-step", "register": {"model_name": "gated-step"}}
    parent = tracking.start_parent_run("sdtune", "gate-step", {})
    register_step(yaml.safe_dump(config), parent, model_dir, evaluation)

    client = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    [run] = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert run.info.status == "FINISHED"
    [metric] = client.get_metric_history(run.info.run_id, "gate_candidate")
    assert metric.value == 0.5 and metric.timestamp <= run.info.end_time
