"""Pipeline steps: one core stage plus its tracking, callable from a KFP component or from plain Python.

Each function takes the resolved run config as YAML text (how a KFP task receives it), the parent MLflow
run id, and local directories; it returns small JSON-able summaries. The KFP components in
``components/`` only map artifact paths onto these arguments.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from sdtune import cache, tracking
from sdtune.config import RunConfig, config_from_yaml
from sdtune.manifest import StageResult, manifest_digest, report_markdown

Summary = dict[str, Any]

# Set by `sdtune run --local` for its task subprocesses: the parent run is tagged with it, so several local
# runs sharing a folder (and an MLflow store) each find their own run.
LOCAL_RUN_ENV = "SDTUNE_LOCAL_RUN"
LOCAL_RUN_TAG = "sdtune.local_run"
# Printed by a step on a cache hit; `sdtune run --local` shows it on the task's line.
CACHE_HIT_LINE = "sdtune: cache hit"


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
    if os.environ.get(LOCAL_RUN_ENV):
        tags[LOCAL_RUN_TAG] = os.environ[LOCAL_RUN_ENV]
    return tracking.start_parent_run(
        cfg.tracking.experiment, run_name=cfg.name, config=cfg.model_dump(mode="json"), tags=tags
    )


def finish_run(config_yaml: str, kfp_run_id: str, pipeline_state: str, error: str = "") -> str | None:
    """Close the parent run of ``kfp_run_id``: FINISHED when the pipeline succeeded, FAILED otherwise."""
    cfg = config_from_yaml(config_yaml)
    run_id = tracking.find_parent_run(cfg.tracking.experiment, kfp_run_id)
    if run_id is None:  # the pipeline failed before the run was opened
        return None
    succeeded = pipeline_state.upper() == "SUCCEEDED"
    if not succeeded:
        reason = tracking.failed_step_error(run_id) or error or f"pipeline {pipeline_state.lower()}"
        tracking.StepRun(tracking.mlflow_client(), run_id).set_tags({"sdtune.error": reason[:5000]})
    tracking.finish_run(run_id, "FINISHED" if succeeded else "FAILED")
    return run_id


def close_interrupted_run(experiment: str, local_run: str, interrupted_ms: int) -> tuple[str | None, dict]:
    """After Ctrl-C: mark the local run's parent KILLED, and every step run that had not finished when the
    interrupt came (still RUNNING, or failed by the interrupt itself) KILLED too.

    Returns the parent run id and ``{step: status}`` for the steps that had started."""
    parent_id = tracking.find_parent_run_by_tag(experiment, LOCAL_RUN_TAG, local_run)
    if parent_id is None:
        return None, {}
    client = tracking.mlflow_client()
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
    )
    slack_ms = 5000  # the steps receive the same Ctrl-C and may note it a moment before this process does
    steps = {}
    for child in children:
        status = child.info.status
        ended_by_interrupt = status == "FAILED" and (child.info.end_time or 0) >= interrupted_ms - slack_ms
        if status == "RUNNING" or ended_by_interrupt:
            client.set_terminated(child.info.run_id, status="KILLED")
            status = "KILLED"
        steps[child.info.run_name] = status
    client.set_tag(parent_id, "sdtune.error", "interrupted (Ctrl-C)")
    client.set_terminated(parent_id, status="KILLED")
    return parent_id, steps


def _note_cache_hit(step: str, run: tracking.StepRun, key: str, **tags: str) -> None:
    run.set_tags({"sdtune.cache": "hit", "sdtune.cache_key": key, **tags})
    print(f"{CACHE_HIT_LINE}: {step} ({key[:12]})", flush=True)


def _log_stage(run: tracking.StepRun, stage: str, result: StageResult) -> Summary:
    report = result.report
    counts = {f"{stage}_{status}": n for status, n in report.counts.items()}
    counts[f"{stage}_images"] = len(result.records)
    run.log_metrics(counts)
    run.log_artifact(result.out_dir / "report.json", "reports")
    run.log_text(report_markdown(report), f"reports/{stage}_report.md")
    run.set_tags({"sdtune.data_digest": manifest_digest(result.out_dir)})
    return {"stage": stage, "images": len(result.records), "counts": report.counts, "reasons": report.reasons}


def _cache_key(cfg: RunConfig, step: str, **parts: Any) -> str | None:
    """The step's content-addressed cache key, or None when caching is off or an input's content is unknown."""
    if not cfg.cache.enabled or step not in cfg.cache.steps or any(v is None for v in parts.values()):
        return None
    return cache.step_key(step, **parts)


def _base_model_parts(cfg: RunConfig) -> dict[str, Any]:
    """The cache-key parts of the base model a model step works on (its content, family, resolution)."""
    return {
        "resolution": cfg.preprocess.resolution,
        "model": cache.model_identity(cfg.model.base, cfg.model.revision),
        "arch": cfg.model.arch,
    }


def _run_stage(
    cfg: RunConfig,
    parent_run_id: str,
    step: str,
    out_dir: Path,
    key: str | None,
    produce,
    cache_step: str = "",
) -> Summary:
    """Run a data stage, or restore its output from the cache, and log it either way."""
    from sdtune.manifest import read_manifest, read_report

    store = cache.StepCache()
    cache_step = cache_step or step
    with tracking.step_run(parent_run_id, step) as run:
        if key and store.restore(cache_step, key, out_dir) is not None:
            result = StageResult(out_dir=out_dir, records=read_manifest(out_dir), report=read_report(out_dir))
            _note_cache_hit(step, run, key)
        else:
            from sdtune.data.stagedir import stage_output

            with stage_output(out_dir):
                result = produce()
            if key:
                store.store(cache_step, key, out_dir, {})
            run.set_tags({"sdtune.cache": "miss" if key else "off"})
        return _log_stage(run, step, result)


def ingest_step(config_yaml: str, parent_run_id: str, out_dir: str | Path) -> Summary:
    from sdtune.data.ingest import ingest

    cfg = config_from_yaml(config_yaml)
    out_dir = Path(out_dir)
    sources = [cache.source_digest(s) for s in cfg.ingest.sources]
    key = _cache_key(
        cfg, "ingest", sources=None if None in sources else sources, ingest=cfg.ingest.model_dump(mode="json")
    )
    return _run_stage(
        cfg, parent_run_id, "ingest", out_dir, key, lambda: ingest(cfg.ingest.sources, out_dir, cfg.ingest)
    )


def preprocess_step(
    config_yaml: str,
    parent_run_id: str,
    in_dir: str | Path,
    out_dir: str | Path,
    shard: int | None = None,
    kfp_run_id: str = "",
) -> Summary:
    """Preprocess all of ``in_dir``, or one of its shards (the pipeline fans shards out in parallel).
    Without ``parent_run_id``, the parent MLflow run is the one tagged with ``kfp_run_id``."""
    from sdtune.data.preprocess import preprocess_dir
    from sdtune.data.shards import read_shards

    cfg = config_from_yaml(config_yaml)
    if not parent_run_id and kfp_run_id:
        parent_run_id = tracking.find_parent_run(cfg.tracking.experiment, kfp_run_id) or ""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    sharded = shard is not None and len(read_shards(in_dir)) > 1
    name = f"preprocess-{shard:04d}" if sharded else "preprocess"
    key = _cache_key(
        cfg,
        "preprocess",
        data=manifest_digest(in_dir),
        shard=shard,
        preprocess=cfg.preprocess.model_dump(mode="json"),
    )
    return _run_stage(
        cfg,
        parent_run_id,
        name,
        out_dir,
        key,
        lambda: preprocess_dir(in_dir, out_dir, cfg.preprocess, shard=shard),
        cache_step="preprocess",
    )


def list_shards(stage_dir: str | Path) -> list[int]:
    from sdtune.data.shards import read_shards

    return read_shards(Path(stage_dir))


def merge_step(
    config_yaml: str, parent_run_id: str, stage_dirs: list[str | Path], out_dir: str | Path
) -> Summary:
    """Join the preprocessed shards into one stage directory (one shard: a cheap copy by hard links)."""
    from sdtune.data.shards import merge_stages

    cfg = config_from_yaml(config_yaml)
    dirs = [Path(d) for d in stage_dirs]
    return _run_stage(
        cfg, parent_run_id, "merge", Path(out_dir), None, lambda: merge_stages(dirs, Path(out_dir))
    )


def caption_step(config_yaml: str, parent_run_id: str, in_dir: str | Path, out_dir: str | Path) -> Summary:
    from sdtune.data.caption import caption_dir

    cfg = config_from_yaml(config_yaml)
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    key = _cache_key(
        cfg, "caption", data=manifest_digest(in_dir), caption=cfg.caption.model_dump(mode="json")
    )
    return _run_stage(
        cfg, parent_run_id, "caption", out_dir, key, lambda: caption_dir(in_dir, out_dir, cfg.caption)
    )


def train_step(
    config_yaml: str, parent_run_id: str, data_dir: str | Path, out_dir: str | Path, kfp_run_id: str = ""
) -> Summary:
    """Train and log the outputs: in a subprocess of this task (torchrun when ``train.num_processes`` > 1),
    or, with ``cluster.launcher`` trainjob/pytorchjob, as a multi-node job that this task waits for."""
    from sdtune.errors import TrainingError

    cfg = config_from_yaml(config_yaml)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    key = _cache_key(
        cfg,
        "train",
        data=manifest_digest(data_dir),
        train=cfg.train.model_dump(mode="json"),
        **_base_model_parts(cfg),
    )
    store = cache.StepCache()
    with tracking.step_run(parent_run_id, "train") as run:
        run.log_params(tracking.flatten_params({"train": cfg.train.model_dump(mode="json")}))
        summary = store.restore("train", key, out_dir) if key else None
        if summary is not None:
            _note_cache_hit(
                "train", run, key, **{"sdtune.cache_source_run": summary.get("mlflow_run_id", "")}
            )
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            cfg, config_yaml = _durable_checkpoints(cfg, config_yaml, kfp_run_id)
            if cfg.cluster.launcher == "single_node":
                code = _train_in_task(config_yaml, cfg, data_dir, out_dir, run.run_id)
            else:
                code = _train_as_job(cfg, data_dir, out_dir, run.run_id, kfp_run_id or run.run_id)
            if code != 0:
                raise TrainingError(f"training exited with code {code}")
            summary = json.loads((out_dir / "train_summary.json").read_text())
            summary["mlflow_run_id"] = run.run_id
            if key:
                store.store("train", key, out_dir, summary)
            run.set_tags({"sdtune.cache": "miss" if key else "off"})
        run.log_artifact(out_dir, "model")
        run.set_tags({"sdtune.method": cfg.train.method})
        return summary


def _durable_checkpoints(cfg: RunConfig, config_yaml: str, kfp_run_id: str) -> tuple[RunConfig, str]:
    """On a cluster, checkpoints go to ``<cluster.staging_uri>/<KFP run id>/checkpoints`` unless the config
    names a place: a retried task (new pod, empty disk) or a re-created job then resumes where it stopped.
    Locally (no KFP pod) they stay in the output folder."""
    import os

    if cfg.train.checkpoint_dir or not kfp_run_id or not os.environ.get("KFP_POD_NAME"):
        return cfg, config_yaml
    cfg = cfg.model_copy(deep=True)
    cfg.train.checkpoint_dir = f"{cfg.cluster.staging_uri.rstrip('/')}/{kfp_run_id}/checkpoints"
    return cfg, cfg.to_param()


def _train_in_task(
    config_yaml: str, cfg: RunConfig, data_dir: Path, out_dir: Path, mlflow_run_id: str
) -> int:
    from sdtune.train.launch import launch_training

    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(config_yaml, encoding="utf-8")
        return launch_training(
            config_path, data_dir, out_dir, cfg.train.num_processes, mlflow_run_id, cfg=cfg
        )


def _train_as_job(
    cfg: RunConfig, data_dir: Path, out_dir: Path, mlflow_run_id: str, job_run_id: str, **api
) -> int:
    """Stage the dataset to S3, run a TrainJob/PyTorchJob of ``torchrun -m sdtune.remote_train``, fetch the
    outputs. The job is get-or-create by run id, so a retried task re-attaches instead of starting another."""
    import os

    from sdtune.cluster import launch_training as launch_job
    from sdtune.errors import ConfigError
    from sdtune.staging import download_prefix, upload_dir

    image = cfg.cluster.train_image or os.environ.get("SDTUNE_TRAIN_IMAGE")
    if not image:
        raise ConfigError("cluster.train_image is not set (the compiled pipeline sets it to the train image)")
    prefix = f"{cfg.cluster.staging_uri.rstrip('/')}/{job_run_id}"
    upload_dir(data_dir, f"{prefix}/data")
    args = [
        "-m",
        "sdtune.remote_train",
        "--config-json",
        cfg.storable().to_param(),
        "--data",
        f"{prefix}/data",
        "--out",
        f"{prefix}/out",
        "--mlflow-run-id",
        mlflow_run_id,
    ]
    launch_job(cfg, run_id=job_run_id, image=image, args=args, **api)
    if download_prefix(f"{prefix}/out", out_dir) == 0:
        return 1  # the job reported success but left no outputs
    return 0


def evaluate_step(
    config_yaml: str, parent_run_id: str, data_dir: str | Path, model_dir: str | Path, out_dir: str | Path
) -> dict[str, float]:
    from sdtune.evaluate import evaluate
    from sdtune.fidelity import fidelity_metrics
    from sdtune.report import evaluation_report

    cfg = config_from_yaml(config_yaml)
    data_dir, model_dir, out_dir = Path(data_dir), Path(model_dir), Path(out_dir)
    key = _cache_key(
        cfg,
        "evaluate",
        data=manifest_digest(data_dir),
        trained=cache.tree_digest(model_dir),
        evaluate=cfg.evaluate.model_dump(mode="json"),
        **_base_model_parts(cfg),
    )
    store = cache.StepCache()
    with tracking.step_run(parent_run_id, "evaluate") as run:
        cached = store.restore("evaluate", key, out_dir) if key else None
        if cached is not None:
            metrics = cached
            _note_cache_hit("evaluate", run, key)
        else:
            metrics = evaluate(cfg, cfg.model.base, model_dir, data_dir, out_dir)
            metrics.update(fidelity_metrics(cfg, out_dir, data_dir))
            (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
            if key:
                store.store("evaluate", key, out_dir, metrics)
            run.set_tags({"sdtune.cache": "miss" if key else "off"})
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        page = evaluation_report(out_dir, model_dir, data_dir)
        (out_dir / "report.html").write_text(page, encoding="utf-8")
        run.log_metrics(numeric, step=cfg.train.max_steps)
        run.log_artifact(out_dir / "report.html", "evaluation")
        run.log_artifact(out_dir / "grid.png", f"samples/step_{cfg.train.max_steps:06d}")
        run.log_artifact(out_dir / "metrics.json", "evaluation")
    if parent_run_id:
        tracking.StepRun(tracking.mlflow_client(), parent_run_id).log_metrics(
            numeric, step=cfg.train.max_steps
        )
    return numeric


def register_step(
    config_yaml: str, parent_run_id: str, model_dir: str | Path, evaluation_dir: str | Path
) -> Summary:
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
        gate_values = {
            k: result["gate"][k] for k in ("candidate", "champion") if result["gate"][k] is not None
        }
        run.log_metrics({f"gate_{k}": v for k, v in gate_values.items()})  # while the step run is open
    if parent_run_id:  # so `sdtune runs list` can mark the champion without walking every child
        tags = {"sdtune.model_name": result["name"], "sdtune.model_version": str(result["version"])}
        tracking.StepRun(tracking.mlflow_client(), parent_run_id).set_tags(tags)
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
    """The evaluation report page (see :mod:`sdtune.report`), for the KFP UI."""
    Path(html_path).parent.mkdir(parents=True, exist_ok=True)
    Path(html_path).write_bytes((Path(evaluation_dir) / "report.html").read_bytes())
