"""The sweep's MLflow runs, built on :mod:`sdtune.tracking`.

    sweep parent run  (sdtune.role=parent, sdtune.sweep_id, the base config as params, the best metrics)
    ├── trial-000     (sdtune.role=trial, sdtune.sweep_id, params = the trial's config, metrics, grid)
    │   ├── train     (the usual step runs, nested under the trial)
    │   └── evaluate
    ├── trial-001 …
    └── register      (the best trial's model version and the gate decision)

The best trial is tagged ``sdtune.best_trial=true``; the parent carries ``sdtune.best_trial_run``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sdtune import tracking
from sdtune.config import RunConfig
from sdtune.sweep.select import TrialResult
from sdtune.sweep.space import Trial

SWEEP_TAG = "sdtune.sweep_id"


def sweep_params(cfg: RunConfig) -> dict[str, str]:
    sw = cfg.sweep
    params = {
        "sweep.metric": sw.metric,
        "sweep.direction": sw.direction,
        "sweep.algorithm": sw.algorithm,
        "sweep.parallelism": str(sw.parallelism),
        "sweep.max_failed": str(sw.max_failed),
    }
    if sw.grid:
        params["sweep.grid"] = json.dumps(sw.grid)[:6000]
    if sw.ranges:
        params["sweep.ranges"] = json.dumps(sw.ranges)[:6000]
    if sw.prompts:
        params["sweep.prompts"] = json.dumps(sw.prompts)[:6000]
    return params


def start_sweep_run(
    cfg: RunConfig, sweep_id: str, trials: list[Trial], kfp_run_id: str = "", engine: str = "kfp"
) -> str:
    """Open the sweep's parent run (left RUNNING; the pipeline's exit handler closes it)."""
    tags = {
        SWEEP_TAG: sweep_id,
        "sdtune.pipeline": "sweep",
        "sdtune.sweep.engine": engine,
        "sdtune.sweep.trials": str(len(trials)),
        "sdtune.base_model": cfg.model.base,
        "sdtune.config_digest": cfg.digest(),
    }
    if kfp_run_id:
        tags["kfp.run_id"] = kfp_run_id
    run_id = tracking.start_parent_run(
        cfg.tracking.experiment,
        run_name=f"{cfg.name}-{sweep_id}",
        config=cfg.model_dump(mode="json"),
        tags=tags,
    )
    tracking.StepRun(tracking.mlflow_client(), run_id).log_params(sweep_params(cfg))
    return run_id


def find_sweep_run(experiment: str, sweep_id: str) -> str | None:
    """The parent run of a sweep."""
    return tracking.find_parent_run_by_tag(experiment, SWEEP_TAG, sweep_id)


def open_trial_run(sweep_run_id: str, trial: Trial, cfg: RunConfig | None, sweep_id: str = "") -> str:
    """Create the trial's run under the sweep parent; ``cfg`` None when the trial config itself is invalid."""
    client = tracking.mlflow_client()
    parent = client.get_run(sweep_run_id)
    sweep_id = sweep_id or parent.data.tags.get(SWEEP_TAG, "")
    tags = {
        "mlflow.parentRunId": sweep_run_id,
        "sdtune.role": "trial",
        "sdtune.step": "trial",
        SWEEP_TAG: sweep_id,
        "sdtune.trial": str(trial.index),
        "sdtune.trial_overrides": json.dumps(trial.overrides, sort_keys=True)[:5000],
        **tracking.run_tags(),
    }
    run = client.create_run(parent.info.experiment_id, run_name=trial.name, tags=tags)
    run_id = run.info.run_id
    params = tracking.flatten_params(cfg.model_dump(mode="json")) if cfg is not None else {}
    # The config already holds every override under its dotted name; add only what it does not (e.g. when
    # the trial's config failed to validate), formatted as flatten_params does.
    for key, value in trial.overrides.items():
        params.setdefault(key, (json.dumps(value) if isinstance(value, list | tuple) else str(value))[:6000])
    tracking._log_params(client, run_id, params)
    return run_id


def close_trial_run(run_id: str, result: TrialResult) -> None:
    client = tracking.mlflow_client()
    if result.error:
        client.set_tag(run_id, "sdtune.error", result.error[:5000])
    client.set_tag(run_id, "sdtune.trial_status", result.status)
    client.set_terminated(run_id, status="FINISHED" if result.ok else "FAILED")


def mark_best(sweep_run_id: str, best: TrialResult, results: list[TrialResult], metric: str) -> None:
    """Tag the best trial and copy its metrics (and the sweep's counts) onto the parent run."""
    client = tracking.mlflow_client()
    parent = tracking.StepRun(client, sweep_run_id)
    for result in results:
        if result.run_id:
            client.set_tag(result.run_id, "sdtune.best_trial", "true" if result is best else "false")
    parent.set_tags(
        {"sdtune.best_trial_run": best.run_id, "sdtune.best_trial": best.name, "sdtune.sweep.metric": metric}
    )
    failed = sum(not r.ok for r in results)
    parent.log_metrics({**best.metrics, "sweep_trials": len(results), "sweep_failed": failed})


def trial_rows(experiment: str, sweep_id: str) -> list[TrialResult]:
    """The trials of a sweep as recorded in MLflow (what `sdtune sweep show` prints)."""
    client = tracking.mlflow_client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' and tags.`sdtune.role` = 'trial'",
        max_results=5000,
    )
    rows = []
    for run in runs:
        tags = run.data.tags
        status = tags.get("sdtune.trial_status") or run.info.status
        rows.append(
            TrialResult(
                index=int(tags.get("sdtune.trial", "0")),
                name=run.info.run_name or "",
                overrides=json.loads(tags.get("sdtune.trial_overrides") or "{}"),
                status=status,
                metrics=dict(run.data.metrics),
                error=tags.get("sdtune.error", ""),
                run_id=run.info.run_id,
            )
        )
    return sorted(rows, key=lambda r: r.index)


def grid_png_bytes(evaluate_run_id: str, max_steps: int | None = None) -> bytes | None:
    """The sample grid an evaluate step logged (``samples/step_NNNNNN/grid.png``), newest step."""
    import tempfile
    from pathlib import Path

    if not evaluate_run_id:
        return None
    client = tracking.mlflow_client()
    try:
        steps = sorted(a.path for a in client.list_artifacts(evaluate_run_id, "samples") if a.is_dir)
        if not steps:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(evaluate_run_id, f"{steps[-1]}/grid.png", tmp)
            return Path(path).read_bytes()
    except Exception:  # a missing grid leaves a gap on the page, never a failed sweep
        return None


def child_run_ids(run_id: str) -> dict[str, str]:
    client = tracking.mlflow_client()
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    return {c.info.run_name: c.info.run_id for c in children}


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    tracking.StepRun(tracking.mlflow_client(), run_id).log_text(text, artifact_file)


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    tracking.StepRun(tracking.mlflow_client(), run_id).set_tags({k: str(v) for k, v in tags.items()})
