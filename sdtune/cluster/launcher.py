"""Run one TrainJob/PyTorchJob to completion from inside a KFP task.

``run_training_job(build, ...)`` is what the multi-node launcher component calls:

* **get-or-create**: ``build(attempt)`` renders the job for an attempt; names are deterministic (run id +
  attempt), so a KFP retry of the task (same run id) finds the jobs of earlier attempts. A running or
  succeeded one is attached to, not duplicated; a failed one is skipped and the next attempt is created.
  A failure whose master exited with a non-retryable code (``sdtune.errors``: 2 = bad config/data) is not
  retried: the retry fails at once instead of burning GPUs on the same error.
* **logs**: the master pod's log is streamed to stdout (the KFP task log) from a daemon thread.
* **terminal state**: Complete/Succeeded → returns the job; Failed → raises :class:`TrainingJobFailed`
  (the task fails); no terminal state within ``timeout_s`` → the job is deleted and
  :class:`TrainingJobTimeout` raised.
* **cancellation**: SIGTERM/SIGINT (a terminated KFP run stops the task pod) deletes the job first.
* **ownership**: the job is created owned by the launcher pod (``owner``); a retried task that attaches
  to a running job adds its own pod as a further owner, so the job lives while any launcher does and is
  garbage-collected after the last one, even when none could run its cleanup (OOM kill, eviction).

The kubernetes client is imported lazily; tests pass fakes for ``custom_api`` and ``core_api``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from sdtune.cluster.errors import ClusterError, TrainingJobFailed, TrainingJobTimeout

# kind → (group, version, plural)
KINDS = {
    "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
}
SUCCEEDED, FAILED, RUNNING = "Succeeded", "Failed", "Running"
# 2 config/data/incompatible checkpoint, 3 diverged (non-finite loss), 5 out of GPU memory: a retry would fail
# the same way (sdtune.errors.PERMANENT_TRAINING_EXIT_CODES). 75 (preempted, checkpoint written) is retried.
NON_RETRYABLE_EXIT_CODES = frozenset({2, 3, 5})


def job_state(obj: dict[str, Any]) -> tuple[str, str]:
    """(state, message) from the job's conditions; TrainJob says Complete, PyTorchJob says Succeeded."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "Succeeded"):
            return SUCCEEDED, cond.get("message", "")
        if cond.get("type") == "Failed":
            return FAILED, cond.get("message", "") or cond.get("reason", "")
    return RUNNING, ""


def master_selector(obj: dict[str, Any]) -> str:
    """Label selector of the rank-0 pod (JobSet labels for TrainJob, operator labels for PyTorchJob)."""
    name = obj["metadata"]["name"]
    if obj["kind"] == "TrainJob":
        return (
            f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
            "jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
        )
    return (
        f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master,"
        "training.kubeflow.org/replica-index=0"
    )


def _status_code(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


def _as_dict(obj: Any) -> dict[str, Any]:
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


class _Job:
    """One job's coordinates plus the API calls on it."""

    def __init__(self, api: Any, manifest: dict[str, Any]):
        self.api, self.manifest = api, manifest
        self.kind = manifest["kind"]
        if self.kind not in KINDS:
            raise ClusterError(f"cannot launch kind {self.kind!r}; expected one of {sorted(KINDS)}")
        self.group, self.version, self.plural = KINDS[self.kind]
        self.name = manifest["metadata"]["name"]
        self.namespace = manifest["metadata"]["namespace"]

    def get(self) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, self.name
            )
        except Exception as exc:
            if _status_code(exc) == 404:
                return None
            raise

    def create(self) -> dict[str, Any]:
        try:
            return self.api.create_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, self.manifest
            )
        except Exception as exc:
            if _status_code(exc) == 409:  # a concurrent launcher won the race: attach to its job
                found = self.get()
                if found is not None:
                    return found
            raise

    def adopt(self, obj: dict[str, Any], owner: tuple[str, str] | None) -> dict[str, Any]:
        """Add ``owner`` (pod name, uid) to the job's ownerReferences unless it is there already."""
        from sdtune.cluster.jobs import owner_reference

        refs = list((obj.get("metadata") or {}).get("ownerReferences") or [])
        if owner is None or any(r.get("uid") == owner[1] for r in refs):
            return obj
        patch = {"metadata": {"ownerReferences": [*refs, owner_reference(*owner)]}}
        try:
            return self.api.patch_namespaced_custom_object(
                self.group, self.version, self.namespace, self.plural, self.name, patch
            )
        except Exception as exc:  # the job still runs; only its cleanup-on-pod-loss is weaker
            print(f"[sdtune] could not add this pod as owner of {self.name}: {exc.__class__.__name__}")
            return obj

    def delete(self) -> None:
        with contextlib.suppress(Exception):  # best effort: we are already on a failure/exit path
            self.api.delete_namespaced_custom_object(
                self.group,
                self.version,
                self.namespace,
                self.plural,
                self.name,
                propagation_policy="Background",
            )


def master_exit_code(core_api: Any, obj: dict[str, Any]) -> int | None:
    """Exit code of the master's training container, when its pod is still there."""
    if core_api is None:
        return None
    try:
        pods = _as_dict(
            core_api.list_namespaced_pod(obj["metadata"]["namespace"], label_selector=master_selector(obj))
        )
    except Exception:
        return None
    for pod in pods.get("items") or []:
        for status in (pod.get("status") or {}).get("container_statuses") or []:
            terminated = (status.get("state") or {}).get("terminated")
            if terminated and terminated.get("exit_code") is not None:
                return int(terminated["exit_code"])
    return None


def _stream_master_logs(
    core_api: Any, obj: dict[str, Any], out: TextIO, stop: threading.Event, poll_s: float
) -> None:
    """Wait for the master pod to start, then copy its log (follow) to ``out``."""
    namespace = obj["metadata"]["namespace"]
    while not stop.is_set():
        try:
            pods = _as_dict(core_api.list_namespaced_pod(namespace, label_selector=master_selector(obj)))
            ready = [
                p
                for p in pods.get("items") or []
                if (p.get("status") or {}).get("phase") not in (None, "Pending")
            ]
            if ready:
                name = ready[0]["metadata"]["name"]
                resp = core_api.read_namespaced_pod_log(name, namespace, follow=True, _preload_content=False)
                for chunk in resp.stream():
                    out.write(chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk)
                    out.flush()
                return
        except Exception as exc:  # logs are a convenience: never fail the launch over them
            out.write(f"[sdtune] master log stream unavailable: {exc.__class__.__name__}\n")
            return
        stop.wait(poll_s)


def _find_or_create(
    api: Any,
    core_api: Any,
    build: Callable[[int], dict[str, Any]],
    max_attempts: int,
    log: Callable[[str], None],
    owner: tuple[str, str] | None = None,
) -> tuple[_Job, dict[str, Any]]:
    for attempt in range(max_attempts):
        job = _Job(api, build(attempt))
        existing = job.get()
        if existing is None:
            log(f"creating {job.kind} {job.namespace}/{job.name} (attempt {attempt})")
            return job, job.create()
        state, message = job_state(existing)
        if state != FAILED:
            log(f"attaching to existing {job.kind} {job.namespace}/{job.name} ({state.lower()})")
            return job, job.adopt(existing, owner)
        code = master_exit_code(core_api, existing)
        if code in NON_RETRYABLE_EXIT_CODES:
            raise TrainingJobFailed(
                f"{job.kind} {job.name} failed with non-retryable exit code {code}: {message}"
            )
        log(f"{job.kind} {job.name} failed earlier ({message or 'no message'}); trying the next attempt")
    raise TrainingJobFailed(f"all {max_attempts} attempts of the training job failed")


def run_training_job(
    build: Callable[[int], dict[str, Any]],
    *,
    timeout_s: float,
    custom_api: Any = None,
    core_api: Any = None,
    poll_s: float = 15.0,
    max_attempts: int = 10,
    out: TextIO | None = None,
    handle_signals: bool = True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    owner: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Get-or-create the job, stream the master's log, and wait for a terminal state (see module doc)."""
    out = out or sys.stdout
    if custom_api is None or core_api is None:
        custom_api, core_api = _default_clients(custom_api, core_api)

    def log(msg: str) -> None:
        out.write(f"[sdtune] {msg}\n")
        out.flush()

    job, obj = _find_or_create(custom_api, core_api, build, max_attempts, log, owner)
    stop = threading.Event()
    restore = _install_cleanup(job, log) if handle_signals else (lambda: None)
    streamer = threading.Thread(
        target=_stream_master_logs, args=(core_api, obj, out, stop, poll_s), daemon=True
    )
    streamer.start()
    deadline = clock() + timeout_s
    try:
        while True:
            state, message = job_state(obj)
            if state == SUCCEEDED:
                log(f"{job.kind} {job.name} succeeded")
                return obj
            if state == FAILED:
                code = master_exit_code(core_api, obj)
                detail = f" (master exit code {code})" if code is not None else ""
                raise TrainingJobFailed(f"{job.kind} {job.name} failed{detail}: {message or 'no message'}")
            if clock() >= deadline:
                job.delete()
                raise TrainingJobTimeout(
                    f"{job.kind} {job.name} did not finish within {timeout_s:.0f}s; deleted"
                )
            sleep(poll_s)
            obj = job.get()
            if obj is None:
                raise TrainingJobFailed(f"{job.kind} {job.name} disappeared (deleted outside the launcher?)")
    finally:
        stop.set()
        streamer.join(timeout=poll_s)  # let the last log lines out
        restore()


def _install_cleanup(job: _Job, log: Callable[[str], None]) -> Callable[[], None]:
    """Delete the job when the task is cancelled; returns a function that restores the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def on_signal(signum: int, _frame: Any) -> None:
        log(f"received signal {signum}: deleting {job.kind} {job.name}")
        job.delete()
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _default_clients(custom_api: Any, core_api: Any) -> tuple[Any, Any]:
    """In-cluster config inside a pod, kubeconfig elsewhere."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return custom_api or client.CustomObjectsApi(), core_api or client.CoreV1Api()
