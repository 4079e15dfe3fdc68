"""Training and evaluation components (CUDA image on a cluster); register needs no GPU (CPU image)."""

from kfp import dsl

from components._images import SDTUNE_IMAGE, SDTUNE_TRAIN_IMAGE


@dsl.component(base_image=SDTUNE_TRAIN_IMAGE, install_kfp_package=False)
def train_op(
    config: str,
    parent_run_id: str,
    kfp_run_id: str,
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
) -> str:
    """Train in a subprocess (torchrun with ``train.num_processes`` ranks) or as a multi-node job; returns the
    summary as JSON."""
    import json

    from sdtune.cluster.placement import use_pod_cpu_limit
    from sdtune.config import config_from_yaml
    from sdtune.steps import train_step

    use_pod_cpu_limit(config_from_yaml(config).train.num_processes)
    summary = train_step(config, parent_run_id, dataset.path, model.path, kfp_run_id=kfp_run_id)
    model.metadata.update({k: v for k, v in summary.items() if isinstance(v, int | float | str)})
    return json.dumps(summary)


@dsl.component(base_image=SDTUNE_TRAIN_IMAGE, install_kfp_package=False)
def evaluate_op(
    config: str,
    parent_run_id: str,
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    evaluation: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
):
    """Held-out loss (base vs tuned) and a sample grid; metrics go to the KFP UI and MLflow."""
    from sdtune.cluster.placement import use_pod_cpu_limit
    from sdtune.steps import evaluate_step, write_evaluation_html

    use_pod_cpu_limit(1)
    values = evaluate_step(config, parent_run_id, dataset.path, model.path, evaluation.path)
    for key, value in values.items():
        metrics.log_metric(key, value)
    write_evaluation_html(evaluation.path, report.path)


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def register_op(
    config: str, parent_run_id: str, model: dsl.Input[dsl.Model], evaluation: dsl.Input[dsl.Artifact]
) -> str:
    """Register the model version in MLflow and set its alias; returns the run summary as JSON."""
    import json

    from sdtune.steps import register_step

    return json.dumps(register_step(config, parent_run_id, model.path, evaluation.path))
