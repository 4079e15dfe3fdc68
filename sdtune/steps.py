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
    config_yaml: str,
    parent_run_id: str,
    data_dir: str | Path,
    out_dir: str | Path,
    kfp_run_id: str = "",
    model_uri: str | None = None,
) -> Summary:
    """Train and log the outputs: in a subprocess of this task (torchrun when ``train.num_processes`` > 1),
    or, with ``cluster.launcher`` trainjob/pytorchjob, as a multi-node job that this task waits for.

    With ``model_uri`` (sdtune.cluster.outputs) the outputs go there, once, instead of being logged to
    MLflow as artifacts; the summary's ``model_uri`` says where they are (on a cache hit, possibly the
    prefix of the earlier run that trained them, when it still holds them)."""
    from sdtune.cluster.outputs import is_s3, publish_outputs
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
        if summary is not None and model_uri:
            summary = _cached_outputs_at_uri(summary, out_dir, model_uri)
        if summary is not None:
            _note_cache_hit(
                "train", run, key, **{"sdtune.cache_source_run": summary.get("mlflow_run_id", "")}
            )
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            cfg, config_yaml = _durable_checkpoints(cfg, config_yaml, kfp_run_id)
            job_out = model_uri if model_uri and is_s3(model_uri) else None
            if cfg.cluster.launcher == "single_node":
                code = _train_in_task(config_yaml, cfg, data_dir, out_dir, run.run_id)
            else:
                job_run_id = kfp_run_id or run.run_id
                code = _train_as_job(cfg, data_dir, out_dir, run.run_id, job_run_id, out_uri=job_out)
            if code != 0:
                raise TrainingError(f"training exited with code {code}")
            summary = json.loads((out_dir / "train_summary.json").read_text())
            summary["mlflow_run_id"] = run.run_id
            if model_uri:  # a job wrote to job_out itself; an in-task run uploads its folder once
                in_place = job_out is not None and cfg.cluster.launcher != "single_node"
                summary["model_uri"] = model_uri if in_place else publish_outputs(out_dir, model_uri)
            if key:
                store.store("train", key, out_dir, summary)
            run.set_tags({"sdtune.cache": "miss" if key else "off"})
        ran = summary.get("extra", {})
        if ran.get("gradient_checkpointing") is not None:  # what train.gradient_checkpointing=auto became
            run.log_params({"train.gradient_checkpointing.resolved": ran["gradient_checkpointing"]})
        if ran.get("mixed_precision") is not None:  # what train.mixed_precision became on this device
            run.log_params({"train.mixed_precision.resolved": ran["mixed_precision"]})
        if model_uri:
            run.set_tags({"sdtune.model_uri": summary["model_uri"]})
        else:
            run.log_artifact(out_dir, "model")
        run.set_tags({"sdtune.method": cfg.train.method})
        return summary


def _cached_outputs_at_uri(summary: Summary, out_dir: Path, model_uri: str) -> Summary | None:
    """A train cache hit whose model travels by URI: the earlier run's URI while it still holds the model,
    else the cached files published to ``model_uri``; None (train again) when the entry holds only the
    summary of a model that stayed in S3 and is gone."""
    from sdtune.cluster.outputs import has_objects, publish_outputs

    earlier = summary.get("model_uri")
    if earlier and has_objects(earlier):
        return summary
    if any(p.is_file() and p.name != "train_summary.json" for p in out_dir.rglob("*")):
        return {**summary, "model_uri": publish_outputs(out_dir, model_uri)}
    return None


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
    cfg: RunConfig,
    data_dir: Path,
    out_dir: Path,
    mlflow_run_id: str,
    job_run_id: str,
    out_uri: str | None = None,
    **api,
) -> int:
    """Stage the dataset to S3, run a TrainJob/PyTorchJob of ``torchrun -m sdtune.remote_train``, fetch the
    outputs. The job is get-or-create by run id, so a retried task re-attaches instead of starting another.
    With ``out_uri`` the job writes its outputs there and only their summary is fetched."""
    import os

    from sdtune.cluster import launch_training as launch_job
    from sdtune.cluster.outputs import run_prefix
    from sdtune.errors import ConfigError
    from sdtune.staging import download_prefix, upload_dir

    image = cfg.cluster.train_image or os.environ.get("SDTUNE_TRAIN_IMAGE")
    if not image:
        raise ConfigError("cluster.train_image is not set (the compiled pipeline sets it to the train image)")
    prefix = run_prefix(cfg, job_run_id)
    upload_dir(data_dir, f"{prefix}/data")
    job_out = out_uri or f"{prefix}/out"
    args = [
        "-m",
        "sdtune.remote_train",
        "--config-json",
        cfg.storable().to_param(),
        "--data",
        f"{prefix}/data",
        "--out",
        job_out,
        "--mlflow-run-id",
        mlflow_run_id,
    ]
    launch_job(cfg, run_id=job_run_id, image=image, args=args, **api)
    if out_uri:
        return _fetch_summary(out_uri, out_dir)
    if download_prefix(job_out, out_dir) == 0:
        return 1  # the job reported success but left no outputs
    return 0


def _fetch_summary(out_uri: str, out_dir: Path) -> int:
    """Only ``train_summary.json`` of outputs that stay in S3; 1 when the job left none."""
    from minio.error import S3Error

    from sdtune.data.s3 import client_from_env, split_s3_uri

    bucket, prefix = split_s3_uri(f"{out_uri.rstrip('/')}/train_summary.json")
    try:
        client_from_env().fget_object(bucket, prefix, str(out_dir / "train_summary.json"))
    except S3Error:
        return 1
    return 0


def evaluate_step(
    config_yaml: str, parent_run_id: str, data_dir: str | Path, model_dir: str | Path, out_dir: str | Path
) -> dict[str, float]:
    """Evaluate the trained model in ``model_dir``: a folder, or an ``s3://`` URI of outputs that travel by
    URI (fetched once into the model cache)."""
    from sdtune.cluster.outputs import fetch_model
    from sdtune.evaluate import evaluate
    from sdtune.fidelity import fidelity_metrics
    from sdtune.report import evaluation_report

    cfg = config_from_yaml(config_yaml)
    data_dir, model_dir, out_dir = Path(data_dir), fetch_model(str(model_dir)), Path(out_dir)
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
    """Register the trained model in the MLflow model registry and point the alias at it. ``model_dir``
    may be the ``s3://`` URI of outputs that travel by URI: the version then points at them in place."""
    from sdtune.cluster.outputs import is_s3
    from sdtune.registry import register_model

    cfg = config_from_yaml(config_yaml)
    in_place = str(model_dir) if is_s3(str(model_dir)) else None
    evaluation_dir = Path(evaluation_dir)
    metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    with tracking.step_run(parent_run_id, "register") as run:
        local = None if in_place else Path(model_dir)
        result = register_model(cfg, local, numeric, run_id=run.run_id, model_uri=in_place)
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
