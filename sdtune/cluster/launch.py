"""One call for the multi-node launcher component: config → rendered job → run to completion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.cluster.errors import ClusterError
from sdtune.cluster.jobs import render, spec_from_config
from sdtune.cluster.launcher import run_training_job

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def current_namespace(default: str | None = None) -> str:
    """The pod's own namespace (KFP runs tasks in the profile namespace, where the Role is bound)."""
    if SA_NAMESPACE_FILE.is_file():
        return SA_NAMESPACE_FILE.read_text().strip()
    if default:
        return default
    raise ClusterError("cluster.namespace is not set and this is not running in a pod")


def launch_training(cfg: Any, *, run_id: str, image: str, args: list[str], **kwargs: Any) -> dict[str, Any]:
    """Start (or re-attach to) the training job that ``cfg.cluster.launcher`` selects and wait for it."""
    kind = cfg.cluster.launcher
    if kind == "single_node":
        raise ClusterError("cluster.launcher is single_node: train inside the task, no job to launch")
    namespace = cfg.cluster.namespace or current_namespace()

    def build(attempt: int) -> dict[str, Any]:
        return render(
            kind,
            spec_from_config(
                cfg, run_id=run_id, attempt=attempt, image=image, args=args, namespace=namespace
            ),
        )

    return run_training_job(build, timeout_s=cfg.cluster.job_timeout_s, **kwargs)
