"""Train, evaluate and register for outputs that travel by S3 URI (``sdtune.cluster.outputs``): the train
task uploads the model once under the run's staging prefix and returns its URI as a string parameter;
evaluate fetches it once into the model cache; register points the MLflow version at it in place.

The functions keep the names of their artifact twins in ``components.train``, so the tasks keep their
names (``train-op``, ``evaluate-op``, ``register-op``) whichever way the model travels.
"""

from typing import NamedTuple

from kfp import dsl

from components._images import SDTUNE_IMAGE, SDTUNE_TRAIN_IMAGE


@dsl.component(base_image=SDTUNE_TRAIN_IMAGE, install_kfp_package=False)
def train_op(config: str, parent_run_id: str, kfp_run_id: str, dataset: dsl.Input[dsl.Dataset]) -> NamedTuple(
    "TrainOutputs", summary=str, model_uri=str
):
    """Train (as ``components.train.train_op``); the outputs go to ``<staging>/<run id>/outputs``."""
    import json
    import tempfile
    from collections import namedtuple

    from sdtune.cluster.outputs import outputs_location
    from sdtune.cluster.placement import use_pod_cpu_limit
    from sdtune.config import config_from_yaml
    from sdtune.steps import train_step

    cfg = config_from_yaml(config)
    use_pod_cpu_limit(cfg.train.num_processes)
    destination = outputs_location(cfg, kfp_run_id)
    with tempfile.TemporaryDirectory(prefix="sdtune-train-") as work:
        summary = train_step(
            config, parent_run_id, dataset.path, work, kfp_run_id=kfp_run_id, model_uri=destination
        )
    return namedtuple("TrainOutputs", ["summary", "model_uri"])(json.dumps(summary), summary["model_uri"])


@dsl.component(base_image=SDTUNE_TRAIN_IMAGE, install_kfp_package=False)
def evaluate_op(
    config: str,
    parent_run_id: str,
    dataset: dsl.Input[dsl.Dataset],
    model_uri: str,
    evaluation: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
):
    """Evaluate the model at ``model_uri`` (as ``components.train.evaluate_op``)."""
    from sdtune.cluster.placement import use_pod_cpu_limit
    from sdtune.steps import evaluate_step, write_evaluation_html

    use_pod_cpu_limit(1)
    values = evaluate_step(config, parent_run_id, dataset.path, model_uri, evaluation.path)
    for key, value in values.items():
        metrics.log_metric(key, value)
    write_evaluation_html(evaluation.path, report.path)


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def register_op(config: str, parent_run_id: str, model_uri: str, evaluation: dsl.Input[dsl.Artifact]) -> str:
    """Register the model at ``model_uri`` without copying it; returns the run summary as JSON."""
    import json

    from sdtune.steps import register_step

    return json.dumps(register_step(config, parent_run_id, model_uri, evaluation.path))
