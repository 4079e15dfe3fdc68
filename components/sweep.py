"""Sweep components: thin KFP wrappers over ``sdtune.sweep.steps`` (module scope: kfp and the stdlib only)."""

from kfp import dsl

from components._images import SDTUNE_IMAGE, SDTUNE_TRAIN_IMAGE


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def start_sweep_op(config: str, kfp_run_id: str, sweep_id: str, trials: str) -> str:
    """Open the sweep's parent MLflow run (tagged sdtune.sweep_id and the KFP run id); returns its id."""
    from sdtune.sweep.steps import start_sweep

    return start_sweep(config, kfp_run_id, sweep_id, trials)


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def sweep_data_op(
    config: str,
    parent_run_id: str,
    ingested: dsl.Output[dsl.Dataset],
    images: dsl.Output[dsl.Dataset],
    dataset: dsl.Output[dsl.Dataset],
):
    """The data stages once for every trial: ingest → preprocess → caption, each logged (and content-cached)
    as usual. One task: a sweep tunes on a handful of photos, where shard fan-out buys nothing."""
    from sdtune.steps import caption_step, ingest_step, preprocess_step

    ingest_step(config, parent_run_id, ingested.path)
    preprocess_step(config, parent_run_id, ingested.path, images.path)
    caption_step(config, parent_run_id, images.path, dataset.path)


@dsl.component(base_image=SDTUNE_TRAIN_IMAGE, install_kfp_package=False)
def sweep_trial_op(
    config: str,
    sweep_id: str,
    kfp_run_id: str,
    trial: str,
    ingested: dsl.Input[dsl.Dataset],
    images: dsl.Input[dsl.Dataset],
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    evaluation: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
) -> str:
    """One trial: train + evaluate under its own MLflow run. A failed trial returns status FAILED (with the
    reason) instead of failing the pipeline; the select step applies ``sweep.max_failed``.

    The sweep run is looked up by its id rather than passed in: kfp.local 2.17 replaces every task-output
    parameter of a ParallelFor body with the loop item (component inputs and artifacts are unaffected)."""
    import html
    import os

    from sdtune.cluster.placement import use_pod_cpu_limit
    from sdtune.sweep.steps import sweep_run_for
    from sdtune.sweep.trial import run_trial

    use_pod_cpu_limit(1)

    sweep_run_id = sweep_run_for(config, sweep_id, kfp_run_id)
    result = run_trial(
        config,
        sweep_run_id,
        trial,
        images.path,
        dataset.path,
        model.path,
        evaluation.path,
        ingested_dir=ingested.path,
    )
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
    page = os.path.join(evaluation.path, "report.html")
    os.makedirs(os.path.dirname(report.path), exist_ok=True)
    if os.path.isfile(page):
        with open(page, "rb") as src, open(report.path, "wb") as dst:
            dst.write(src.read())
    else:
        with open(report.path, "w", encoding="utf-8") as dst:
            dst.write(
                f"<!doctype html><meta charset='utf-8'><p>{html.escape(result.name)} failed: "
                f"{html.escape(result.error)}</p>"
            )
    return result.to_json()


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def select_best_op(
    config: str, sweep_run_id: str, sweep_id: str, results: list, comparison: dsl.Output[dsl.HTML]
) -> str:
    """Pick the best trial by ``sweep.metric``/``sweep.direction``, tag it, emit the comparison page; fails
    when more than ``sweep.max_failed`` trials failed."""
    import json

    from sdtune.sweep.steps import select_best_step

    return json.dumps(select_best_step(config, sweep_run_id, sweep_id, results, comparison.path))


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def register_best_op(config: str, sweep_run_id: str, best: str) -> str:
    """Register the best trial's model; the champion gate decides whether it is promoted."""
    import json

    from sdtune.sweep.steps import register_best_step

    return json.dumps(register_best_step(config, sweep_run_id, best))
