"""Sweep pipeline steps, callable from KFP components (``components/sweep.py``) or plain Python.

Like :mod:`sdtune.steps`: configs travel as one-line JSON/YAML text, runs as MLflow run ids, data as folders;
each function returns something JSON-able.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from sdtune.config import config_from_yaml
from sdtune.sweep import tracking as sweep_tracking
from sdtune.sweep.page import comparison_html
from sdtune.sweep.select import SweepFailed, TrialResult, select_best
from sdtune.sweep.space import Trial, trial_config


def start_sweep(config: str, kfp_run_id: str, sweep_id: str, trials_json: str) -> str:
    """Open the sweep's parent MLflow run; returns its id for every trial."""
    cfg = config_from_yaml(config)
    trials = [Trial.from_json(t) for t in json.loads(trials_json)]
    return sweep_tracking.start_sweep_run(cfg, sweep_id or kfp_run_id, trials, kfp_run_id=kfp_run_id)


def sweep_run_for(config: str, sweep_id: str, kfp_run_id: str) -> str:
    """The sweep's parent run id, found by the sweep id (or, without one, the KFP run id)."""
    cfg = config_from_yaml(config)
    run_id = sweep_tracking.find_sweep_run(cfg.tracking.experiment, sweep_id or kfp_run_id)
    if run_id is None:
        raise RuntimeError(
            f"no MLflow run for sweep {sweep_id or kfp_run_id!r} in {cfg.tracking.experiment!r}"
        )
    return run_id


def write_comparison(
    config: str, sweep_id: str, results: list[TrialResult], best: TrialResult | None, out: Path
) -> str:
    """Render the comparison page (grids fetched from each trial's evaluate run) to ``out``."""
    cfg = config_from_yaml(config)
    grids = {}
    for r in results:
        png = sweep_tracking.grid_png_bytes(r.evaluate_run_id)
        if png:
            grids[r.name] = png
    page = comparison_html(sweep_id, cfg.sweep.metric, cfg.sweep.direction, results, grids, best)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return page


def select_best_step(
    config: str, sweep_run_id: str, sweep_id: str, results: list[str | dict], html_path: str | Path
) -> dict[str, Any]:
    """Pick the best trial, tag it, write + log the comparison page. Raises :class:`SweepFailed` (after the
    page is logged) when more than ``sweep.max_failed`` trials failed."""
    cfg = config_from_yaml(config)
    sw = cfg.sweep
    trials = sorted((TrialResult.from_json(r) for r in results), key=lambda r: r.index)
    try:
        best = select_best(trials, sw.metric, sw.direction, sw.max_failed)
    except SweepFailed as exc:
        page = write_comparison(config, sweep_id, trials, None, Path(html_path))
        sweep_tracking.log_text(sweep_run_id, page, "sweep/comparison.html")
        sweep_tracking.set_tags(sweep_run_id, {"sdtune.sweep.error": str(exc)[:5000]})
        raise
    page = write_comparison(config, sweep_id, trials, best, Path(html_path))
    sweep_tracking.mark_best(sweep_run_id, best, trials, sw.metric)
    sweep_tracking.log_text(sweep_run_id, page, "sweep/comparison.html")
    sweep_tracking.log_text(
        sweep_run_id, json.dumps([json.loads(t.to_json()) for t in trials], indent=1), "sweep/trials.json"
    )
    return json.loads(best.to_json())


def register_best_step(config: str, sweep_run_id: str, best: str | dict) -> dict[str, Any]:
    """Register the best trial's model (downloaded from its train run) through the champion gate."""
    from sdtune import tracking
    from sdtune.steps import register_step

    result = TrialResult.from_json(best)
    if not result.train_run_id:  # a result read back from MLflow (Katib trials) carries only its own run
        result.train_run_id = sweep_tracking.child_run_ids(result.run_id).get("train", "")
    cfg = trial_config(config_from_yaml(config), Trial(result.index, result.overrides))
    client = tracking.mlflow_client()
    with tempfile.TemporaryDirectory(prefix="sdtune-best-") as tmp:
        model_dir = Path(client.download_artifacts(result.train_run_id, "model", tmp))
        evaluation = Path(tmp) / "evaluation"
        evaluation.mkdir()
        (evaluation / "metrics.json").write_text(json.dumps(result.metrics), encoding="utf-8")
        summary = register_step(cfg.to_param(), sweep_run_id, model_dir, evaluation)
    sweep_tracking.set_tags(
        result.run_id, {"sdtune.model_name": summary["name"], "sdtune.model_version": summary["version"]}
    )
    summary.update(best_trial=result.name, best_trial_run_id=result.run_id, overrides=result.overrides)
    summary["model_dir"] = f"runs:/{result.train_run_id}/model"
    summary.pop("grid", None)
    return summary
