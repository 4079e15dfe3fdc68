"""Pipeline steps: one core stage plus its tracking, callable from a KFP component or from plain Python.

Each function takes the resolved run config as YAML text (how a KFP task receives it), the parent MLflow
run id, and local directories; it returns small JSON-able summaries. The KFP components in
``components/`` only map artifact paths onto these arguments.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from sdtune import tracking
from sdtune.config import config_from_yaml
from sdtune.manifest import StageResult, manifest_digest, report_markdown

Summary = dict[str, Any]


def start_run(config_yaml: str, kfp_run_id: str = "", pipeline_name: str = "personalize") -> str:
    """Create the parent MLflow run for one pipeline run; its id is passed to every later step."""
    cfg = config_from_yaml(config_yaml)
    tags = {
        "sdtune.pipeline": pipeline_name,
        "sdtune.base_model": cfg.model.base,
        "sdtune.config_digest": cfg.digest(),
    }
    if kfp_run_id:
        tags["kfp.run_id"] = kfp_run_id
    return tracking.start_parent_run(cfg.tracking.experiment, run_name=cfg.name, config=cfg.model_dump(mode="json"), tags=tags)


def finish_run(config_yaml: str, kfp_run_id: str, pipeline_state: str, error: str = "") -> str | None:
    """Close the parent run of ``kfp_run_id``: FINISHED when the pipeline succeeded, FAILED otherwise."""
    cfg = config_from_yaml(config_yaml)
    run_id = tracking.find_parent_run(cfg.tracking.experiment, kfp_run_id)
    if run_id is None:  # the pipeline failed before the run was opened
        return None
    succeeded = pipeline_state.upper() == "SUCCEEDED"
    if not succeeded:
        reason = tracking.failed_step_error(run_id) or error or f"pipeline {pipeline_state.lower()}"
        tracking.StepRun(tracking._client(), run_id).set_tags({"sdtune.error": reason[:5000]})
    tracking.finish_run(run_id, "FINISHED" if succeeded else "FAILED")
    return run_id


def _log_stage(run: tracking.StepRun, stage: str, result: StageResult) -> Summary:
    report = result.report
    counts = {f"{stage}_{status}": n for status, n in report.counts.items()}
    counts[f"{stage}_images"] = len(result.records)
    run.log_metrics(counts)
    run.log_artifact(result.out_dir / "report.json", "reports")
    run.log_text(report_markdown(report), f"reports/{stage}_report.md")
    run.set_tags({"sdtune.data_digest": manifest_digest(result.out_dir)})
    return {"stage": stage, "images": len(result.records), "counts": report.counts, "reasons": report.reasons}


def ingest_step(config_yaml: str, parent_run_id: str, out_dir: str | Path) -> Summary:
    from sdtune.data.ingest import ingest

    cfg = config_from_yaml(config_yaml)
    with tracking.step_run(parent_run_id, "ingest") as run:
        result = ingest(cfg.ingest.sources, Path(out_dir), cfg.ingest)
        return _log_stage(run, "ingest", result)


def preprocess_step(config_yaml: str, parent_run_id: str, in_dir: str | Path, out_dir: str | Path) -> Summary:
    from sdtune.data.preprocess import preprocess_dir

    cfg = config_from_yaml(config_yaml)
    with tracking.step_run(parent_run_id, "preprocess") as run:
        result = preprocess_dir(Path(in_dir), Path(out_dir), cfg.preprocess)
        return _log_stage(run, "preprocess", result)


def caption_step(config_yaml: str, parent_run_id: str, in_dir: str | Path, out_dir: str | Path) -> Summary:
    from sdtune.data.caption import caption_dir

    cfg = config_from_yaml(config_yaml)
    with tracking.step_run(parent_run_id, "caption") as run:
        result = caption_dir(Path(in_dir), Path(out_dir), cfg.caption)
        return _log_stage(run, "caption", result)


def train_step(config_yaml: str, parent_run_id: str, data_dir: str | Path, out_dir: str | Path) -> Summary:
    """Launch training as a subprocess (torchrun when ``train.num_processes`` > 1) and log its outputs."""
    from sdtune.errors import TrainingError
    from sdtune.train.launch import launch_training

    cfg = config_from_yaml(config_yaml)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tracking.step_run(parent_run_id, "train") as run:
        run.log_params(tracking.flatten_params({"train": cfg.train.model_dump(mode="json")}))
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp) / "config.yaml"
            config_path.write_text(config_yaml, encoding="utf-8")
            code = launch_training(config_path, Path(data_dir), out_dir, cfg.train.num_processes, run.run_id)
        if code != 0:
            raise TrainingError(f"training exited with code {code}")
        summary = json.loads((out_dir / "train_summary.json").read_text())
        run.log_artifact(out_dir, "model")
        run.set_tags({"sdtune.method": cfg.train.method})
        summary["mlflow_run_id"] = run.run_id
        return summary


def evaluate_step(
    config_yaml: str, parent_run_id: str, data_dir: str | Path, model_dir: str | Path, out_dir: str | Path
) -> dict[str, float]:
    from sdtune.evaluate import evaluate

    cfg = config_from_yaml(config_yaml)
    out_dir = Path(out_dir)
    with tracking.step_run(parent_run_id, "evaluate") as run:
        metrics = evaluate(cfg, cfg.model.base, Path(model_dir), Path(data_dir), out_dir)
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        run.log_metrics(numeric, step=cfg.train.max_steps)
        run.log_artifact(out_dir / "grid.png", f"samples/step_{cfg.train.max_steps:06d}")
        run.log_artifact(out_dir / "metrics.json", "evaluation")
    if parent_run_id:
        tracking.StepRun(tracking._client(), parent_run_id).log_metrics(numeric, step=cfg.train.max_steps)
    return numeric


def register_step(config_yaml: str, parent_run_id: str, model_dir: str | Path, evaluation_dir: str | Path) -> Summary:
    """Register the trained model in the MLflow model registry and point the alias at it."""
    from sdtune.registry import register_model

    cfg = config_from_yaml(config_yaml)
    evaluation_dir = Path(evaluation_dir)
    metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    with tracking.step_run(parent_run_id, "register") as run:
        result = register_model(cfg, Path(model_dir), numeric, run_id=run.run_id)
        run.set_tags({"sdtune.model_name": result["name"], "sdtune.model_version": str(result["version"])})
        run.set_tags(result.pop("gate_tags"))
    if parent_run_id:  # so `sdtune runs list` can mark the champion without walking every child
        tags = {"sdtune.model_name": result["name"], "sdtune.model_version": str(result["version"])}
        tracking.StepRun(tracking._client(), parent_run_id).set_tags(tags)
        gate_values = {k: result["gate"][k] for k in ("candidate", "champion") if result["gate"][k] is not None}
        run.log_metrics({f"gate_{k}": v for k, v in gate_values.items()})
    return {
        **result,
        "parent_run_id": parent_run_id,
        "model_dir": str(model_dir),
        "grid": str(evaluation_dir / "grid.png"),
        "metrics": numeric,
    }


def write_report_markdown(stage_dir: str | Path, md_path: str | Path) -> None:
    """The stage's report.json as Markdown (rendered by the KFP UI)."""
    from sdtune.manifest import read_report

    Path(md_path).parent.mkdir(parents=True, exist_ok=True)
    Path(md_path).write_text(report_markdown(read_report(Path(stage_dir))), encoding="utf-8")


def write_evaluation_html(evaluation_dir: str | Path, html_path: str | Path) -> None:
    """A self-contained page (grid inlined as base64, metric table) for the KFP UI."""
    import base64
    import html

    evaluation_dir = Path(evaluation_dir)
    metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{v:.5g}</td></tr>" if isinstance(v, int | float)
        else f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in metrics.items()
    )
    grid = base64.b64encode((evaluation_dir / "grid.png").read_bytes()).decode("ascii")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>sdtune evaluation</title></head><body>"
        "<h1>Evaluation</h1><p>Top row: base model. Bottom row: fine-tuned. Same seeds per column.</p>"
        f"<img alt='sample grid' src='data:image/png;base64,{grid}'>"
        f"<table border='1'><tr><th>metric</th><th>value</th></tr>{rows}</table></body></html>"
    )
    Path(html_path).parent.mkdir(parents=True, exist_ok=True)
    Path(html_path).write_text(page, encoding="utf-8")
