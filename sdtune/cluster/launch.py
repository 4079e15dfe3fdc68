"""One call for the multi-node launcher component: config → rendered job → run to completion."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdtune.cluster.errors import ClusterError
from sdtune.cluster.jobs import POD_NAME_ENV, POD_UID_ENV, quantity, render, spec_from_config
from sdtune.cluster.launcher import run_training_job
from sdtune.cluster.placement import check_s3_prefixes
from sdtune.errors import ConfigError

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def current_namespace(default: str | None = None) -> str:
    """The pod's own namespace (KFP runs tasks in the profile namespace, where the Role is bound)."""
    if SA_NAMESPACE_FILE.is_file():
        return SA_NAMESPACE_FILE.read_text().strip()
    if default:
        return default
    # A setting missing from the config (exit 2), not a cluster that failed: a retry would fail the same way.
    raise ConfigError("cluster.namespace is not set and this is not running in a pod: set cluster.namespace")


def launcher_pod() -> tuple[str, str] | None:
    """(name, uid) of the pod this runs in (downward API env set by the pipeline), else None."""
    name, uid = os.environ.get(POD_NAME_ENV), os.environ.get(POD_UID_ENV)
    return (name, uid) if name and uid else None


def ephemeral_storage_for(dataset_bytes: int, base: str) -> str:
    """Local disk one node needs: the staged dataset, its latent cache (about as large again), plus
    ``base`` for the model cache and outputs. In whole GiB."""
    gib = (2 * dataset_bytes + quantity(base)) / 2**30
    return f"{int(gib) + 1}Gi"


def launch_training(
    cfg: Any, *, run_id: str, image: str, args: list[str], dataset_bytes: int | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Start (or re-attach to) the training job that ``cfg.cluster.launcher`` selects and wait for it.

    ``dataset_bytes`` (the staged dataset's size; looked up under the ``--data`` prefix of ``args`` when not
    given) sizes each node's ephemeral-storage request."""
    kind = cfg.cluster.launcher
    if kind == "single_node":
        raise ClusterError("cluster.launcher is single_node: train inside the task, no job to launch")
    namespace = cfg.cluster.namespace or current_namespace()
    check_s3_prefixes(cfg, namespace)
    if dataset_bytes is None:
        dataset_bytes = _staged_size(args)
    storage = ephemeral_storage_for(dataset_bytes, cfg.cluster.ephemeral_storage_base)
    owner = launcher_pod()

    def build(attempt: int) -> dict[str, Any]:
        return render(
            kind,
            spec_from_config(
                cfg,
                run_id=run_id,
                attempt=attempt,
                image=image,
                args=args,
                namespace=namespace,
                owner=owner,
                ephemeral_storage=storage,
            ),
        )

    return run_training_job(build, timeout_s=cfg.cluster.job_timeout_s, owner=owner, **kwargs)


def _staged_size(args: list[str]) -> int:
    if "--data" not in args:
        return 0
    from sdtune.staging import prefix_size

    return prefix_size(args[args.index("--data") + 1])
