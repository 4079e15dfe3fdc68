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

from sdtune.config import strip_url_credentials
from sdtune.errors import UsageError

DEFAULT_HOME = ".sdtune"
PARAM_SECTIONS = ("model", "preprocess", "caption", "train", "evaluate", "register")
PARAM_SKIP_KEYS = {"cache_dir"}


def sdtune_home() -> Path:
    return Path(os.environ.get("SDTUNE_HOME", DEFAULT_HOME)).resolve()


def embedded_uri() -> str:
    return f"sqlite:///{sdtune_home() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri()


def uses_embedded_store() -> bool:
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: our own sqlite URI there is still the embedded store.
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return not uri or uri == embedded_uri()


def ui_command() -> str:
    """The command a person runs to look at what was tracked: artifacts live where each experiment says
    (``$SDTUNE_HOME/mlartifacts`` for the embedded store), so only the store needs naming."""
    if uses_embedded_store():
        return f"mlflow ui --backend-store-uri {tracking_uri()}"
    return f"open {tracking_uri()}"


def mlflow_client():
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uses_embedded_store():
        sdtune_home().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str) -> str:
    client = mlflow_client()
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
            if isinstance(value, list | tuple):
                text = json.dumps([strip_url_credentials(v) if isinstance(v, str) else v for v in value])
            else:
                text = strip_url_credentials(str(value))
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
    for env, tag in (("KFP_POD_NAME", "kfp.pod_name"), ("KFP_POD_UID", "kfp.pod_uid")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def start_parent_run(
    experiment: str, run_name: str, config: Mapping[str, Any], tags: Mapping[str, str] | None = None
) -> str:
    """Create the pipeline run's parent MLflow run and return its id (left RUNNING; steps nest under it)."""
    client = mlflow_client()
    experiment_id = ensure_experiment(experiment)
    all_tags = {**run_tags(), **(tags or {}), "sdtune.role": "parent"}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    _log_params(client, run_id, flatten_params(config))
    return run_id


def find_parent_run(experiment: str, kfp_run_id: str) -> str | None:
    """The parent run opened for a KFP run (looked up by tag, so exit handlers need no task outputs)."""
    return find_parent_run_by_tag(experiment, "kfp.run_id", kfp_run_id)


def find_parent_run_by_tag(experiment: str, tag: str, value: str) -> str | None:
    """The oldest parent run whose ``tag`` equals ``value`` (oldest: if a race ever created two)."""
    client = mlflow_client()
    found = client.get_experiment_by_name(experiment)
    if found is None or not value:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{tag}` = '{value}' and tags.`sdtune.role` = 'parent'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def failed_step_error(parent_run_id: str) -> str | None:
    """The error recorded by the first failed step under a parent run, if any."""
    client = mlflow_client()
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'FAILED'",
        order_by=["attributes.start_time ASC"],
    )
    for child in children:
        if child.data.tags.get("sdtune.error"):
            return child.data.tags["sdtune.error"]
    return None


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    mlflow_client().set_terminated(run_id, status=status)


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
    client = mlflow_client()
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id,
        run_name=step,
        tags={"mlflow.parentRunId": parent_run_id, "sdtune.step": step, **run_tags()},
    )
    handle = StepRun(client, run.info.run_id)
    try:
        yield handle
    except BaseException as exc:
        # The reason travels with the run: the local runner and the exit handler report it.
        client.set_tag(run.info.run_id, "sdtune.error", f"{step}: {exc}"[:5000])
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
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the whole run

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._fh.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


@contextmanager
def _fail_fast() -> Iterator[None]:
    """MLflow's HTTP client retries for minutes by itself; inside the training loop we would rather fail at
    once, keep the data, and retry on our own schedule without blocking the step."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class MLflowLogger:
    """Logs to an existing MLflow run without ever stopping training for the tracking server.

    Metrics are batched (one request per ``flush_every`` steps). When the server or its artifact store is
    down or slow, nothing raises: metrics and artifacts stay queued and are retried with exponential
    backoff, then flushed when it answers again. :meth:`close` keeps trying for ``close_timeout_s``; what
    still cannot be sent is written to ``spool_dir`` (:func:`replay_spool` sends it later), so nothing is lost.
    """

    def __init__(
        self,
        run_id: str,
        flush_every: int = 50,
        retry_base_s: float = 1.0,
        retry_max_s: float = 60.0,
        close_timeout_s: float = 300.0,
        spool_dir: str | Path | None = None,
    ):
        self.run_id = run_id
        self._client = mlflow_client()
        _require_run(self._client, run_id)
        self._metrics: list[Any] = []
        self._artifacts: list[tuple[str, str | None]] = []
        self._flush_every = flush_every
        self._retry_base_s, self._retry_max_s = retry_base_s, retry_max_s
        self._close_timeout_s = close_timeout_s
        self._spool_dir = Path(spool_dir) if spool_dir else None
        self._failures = 0
        self._retry_at = 0.0
        self.last_error = ""  # the latest reason a send failed, shown when items are spooled
        self.outages = 0  # how many times the server stopped answering (for the run summary)
        self._system_monitor = _start_system_metrics(run_id)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self._metrics) >= self._flush_every * max(1, len(metrics)):
            self.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._artifacts.append((str(path), artifact_path))
        self.flush()

    @property
    def pending(self) -> int:
        return len(self._metrics) + len(self._artifacts)

    def flush(self, force: bool = False) -> bool:
        """Try to send everything queued; returns True when nothing is left. Never raises.

        Metrics go first, in batches; then each artifact on its own, so one the server refuses (its
        artifact store is misconfigured, say) does not hold back the others or the metrics after it.
        An artifact whose file is gone is dropped with a warning: no retry can send it."""
        if not self.pending:
            return True
        if not force and time.monotonic() < self._retry_at:
            return False
        problem = None
        with _fail_fast():
            try:
                while self._metrics:
                    self._client.log_batch(self.run_id, metrics=self._metrics[:1000])
                    del self._metrics[:1000]
            except Exception as exc:  # any transport or server error: keep the data, back off
                problem = exc
            if problem is None:  # the server answers: each artifact gets its own try
                self._artifacts, problem = self._send_artifacts()
        if problem is not None:
            self.last_error = f"{problem.__class__.__name__}: {str(problem).strip()[:300]}"
            if self._failures == 0:
                self.outages += 1
                _warn(
                    f"tracking server unavailable ({problem.__class__.__name__}); buffering {self.pending} items"
                )
            self._failures += 1
            delay = min(self._retry_max_s, self._retry_base_s * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay
            return False
        if self._failures:
            _warn("tracking server is back; buffered metrics and artifacts sent")
        self._failures = 0
        return True

    def _send_artifacts(self) -> tuple[list[tuple[str, str | None]], Exception | None]:
        left, problem = [], None
        for path, artifact_path in self._artifacts:
            if not Path(path).exists():
                _warn(f"artifact {path} no longer exists; not sent")
                continue
            try:
                if Path(path).is_dir():
                    self._client.log_artifacts(self.run_id, path, artifact_path)
                else:
                    self._client.log_artifact(self.run_id, path, artifact_path)
            except Exception as exc:  # kept for the next try (or the spool)
                left.append((path, artifact_path))
                problem = problem or exc
        return left, problem

    def close(self) -> None:
        if self._system_monitor is not None:
            self._system_monitor.finish()
        deadline = time.monotonic() + self._close_timeout_s
        while not self.flush(force=True) and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self._retry_at - time.monotonic(), deadline - time.monotonic())))
        if self.pending:
            self._spool()

    def _spool(self) -> None:
        spool_dir = self._spool_dir or sdtune_home() / "spool"
        spool_dir.mkdir(parents=True, exist_ok=True)
        path = spool_dir / f"{self.run_id}-{int(time.time())}.json"
        payload = {
            "run_id": self.run_id,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self._metrics],
            "artifacts": self._artifacts,
        }
        path.write_text(json.dumps(payload))
        _warn(
            f"tracking server did not take {self.pending} items ({self.last_error}); saved to {path} "
            "(replay_spool sends them)"
        )


# What the tracking store answers for a run id that can never be logged to: retrying would never help.
_NO_SUCH_RUN = {"RESOURCE_DOES_NOT_EXIST": "not found", "INVALID_PARAMETER_VALUE": "is not a valid run id"}


def _require_run(client: Any, run_id: str) -> None:
    """Refuse a run the store says does not exist (:class:`UsageError`, exit 2): :meth:`MLflowLogger.flush`
    would take that answer for an outage and retry it until the close timeout. An unreachable store is
    no reason to stop: the logger buffers until it answers."""
    from mlflow.exceptions import MlflowException

    with _fail_fast():
        try:
            client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in _NO_SUCH_RUN:
                raise UsageError(f"MLflow run {run_id} {_NO_SUCH_RUN[exc.error_code]}") from None
        except Exception:  # transport errors: buffered and retried by flush()
            pass


def _start_system_metrics(run_id: str):
    """GPU/CPU/memory utilisation as MLflow system metrics: on by default where a GPU trains
    (``SDTUNE_SYSTEM_METRICS=1`` forces it on, ``0`` off); off on CPU test runs, where it is only noise."""
    setting = os.environ.get("SDTUNE_SYSTEM_METRICS", "auto")
    if setting == "0":
        return None
    if setting == "auto":
        import sys

        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=tracking_uri())
        monitor.start()
        return monitor
    except Exception as exc:  # a missing optional probe (pynvml) must not stop training
        _warn(f"system metrics disabled: {exc}")
        return None


def replay_spool(path: str | Path) -> int:
    """Send a spool file written by :class:`MLflowLogger` when the server stayed down; returns items sent."""
    payload = json.loads(Path(path).read_text())
    logger = MLflowLogger(payload["run_id"], close_timeout_s=0)
    from mlflow.entities import Metric

    logger._metrics = [Metric(k, v, ts, step) for k, v, ts, step in payload["metrics"]]
    logger._artifacts = [tuple(a) for a in payload["artifacts"]]
    count = logger.pending
    if not logger.flush(force=True):
        raise ConnectionError(f"tracking server still unavailable; {path} kept")
    Path(path).unlink()
    return count


def _warn(message: str) -> None:
    import sys

    print(f"sdtune: {message}", file=sys.stderr, flush=True)


class CompositeLogger:
    def __init__(self, *loggers: MetricLogger):
        self.loggers = [lg for lg in loggers if lg is not None]

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
