"""The one place that talks to MLflow.

- No ``MLFLOW_TRACKING_URI``: an embedded sqlite store under ``$SDTUNE_HOME`` (default ``./.sdtune``), with
  artifacts beside it, so a laptop run needs no server. With it set, the same code talks to a tracking
  server (whose artifact store may be S3).
- One *parent* run per pipeline run; each step opens a *nested* run under it (``mlflow.parentRunId``), from
  any process: the parent run id travels as a plain string between pipeline tasks.
- Training logs through the small :class:`MetricLogger` protocol (JSONL on disk always, MLflow when a run is
  given), so the recipe never imports MLflow.
- Params are the resolved config, flattened, through an allowlist of sections: nothing that could hold a
  credential is logged.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

DEFAULT_HOME = ".sdtune"
PARAM_SECTIONS = ("model", "preprocess", "caption", "train", "evaluate", "register")
PARAM_SKIP_KEYS = {"cache_dir"}


def sdtune_home() -> Path:
    return Path(os.environ.get("SDTUNE_HOME", DEFAULT_HOME)).resolve()


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{sdtune_home() / 'mlflow.db'}"


def uses_embedded_store() -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI")


def ui_command() -> str:
    """The command a person runs to look at what was tracked."""
    if uses_embedded_store():
        home = sdtune_home()
        return f"mlflow ui --backend-store-uri {tracking_uri()} --default-artifact-root {home / 'mlartifacts'}"
    return f"open {tracking_uri()}"


def _client():
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uses_embedded_store():
        sdtune_home().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str) -> str:
    client = _client()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uses_embedded_store():
        # With sqlite MLflow would put artifacts under ./mlruns of whichever cwd the step runs in.
        location = (sdtune_home() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Flatten the allowlisted config sections into MLflow params (values ≤ 6000 chars)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                if key in PARAM_SKIP_KEYS:
                    continue
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            out[prefix] = text[:6000]

    for section in PARAM_SECTIONS:
        if section in config:
            walk(section, config[section])
    if "name" in config:
        out["name"] = str(config["name"])
    return out


def run_tags() -> dict[str, str]:
    """Tags that link a run back to where it ran."""
    from sdtune import __version__

    tags = {"sdtune.version": __version__}
    for env, tag in (("KFP_RUN_ID", "kfp.run_id"), ("KFP_POD_NAME", "kfp.pod_name"), ("SDTUNE_PIPELINE", "kfp.pipeline")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def start_parent_run(experiment: str, run_name: str, config: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str:
    """Create the pipeline run's parent MLflow run and return its id (left RUNNING; steps nest under it)."""
    client = _client()
    experiment_id = ensure_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={**run_tags(), **(tags or {})})
    run_id = run.info.run_id
    _log_params(client, run_id, flatten_params(config))
    return run_id


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    _client().set_terminated(run_id, status=status)


class StepRun:
    """A nested MLflow run for one pipeline step (or a no-op when tracking is off)."""

    def __init__(self, client: Any | None, run_id: str | None):
        self._client = client
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            _log_params(self._client, self.run_id, {k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key=k, value=float(v), timestamp=now, step=step or 0) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):
            self._client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            path = Path(path)
            if path.is_dir():
                self._client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self._client.set_tag(self.run_id, key, str(value))


@contextmanager
def step_run(parent_run_id: str | None, step: str, experiment: str = "sdtune") -> Iterator[StepRun]:
    """Open a nested run named ``step`` under ``parent_run_id``; no-op when ``parent_run_id`` is empty.

    The run ends FINISHED, or FAILED if the body raises (the exception propagates).
    """
    if not parent_run_id:
        yield StepRun(None, None)
        return
    client = _client()
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id,
        run_name=step,
        tags={"mlflow.parentRunId": parent_run_id, "sdtune.step": step, **run_tags()},
    )
    handle = StepRun(client, run.info.run_id)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


def _log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


class MetricLogger(Protocol):
    """What a training loop logs through. Implementations must be cheap to call every step."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """Per-step metrics as JSON lines: the file every run leaves on disk, whatever else is configured."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._fh.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class MLflowLogger:
    """Logs to an existing MLflow run, buffering and sending in batches to keep the hot loop free."""

    def __init__(self, run_id: str, flush_every: int = 50):
        self._run = StepRun(_client(), run_id)
        self._pending: list[tuple[dict[str, float], int]] = []
        self._flush_every = flush_every

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._pending.append(({k: float(v) for k, v in metrics.items()}, step))
        if len(self._pending) >= self._flush_every:
            self.flush()

    def flush(self) -> None:
        from mlflow.entities import Metric

        if not self._pending:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for metrics, step in self._pending for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):
            self._run._client.log_batch(self._run.run_id, metrics=batch[start : start + 1000])
        self._pending.clear()

    def close(self) -> None:
        self.flush()


class CompositeLogger:
    def __init__(self, *loggers: MetricLogger):
        self.loggers = [lg for lg in loggers if lg is not None]

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
