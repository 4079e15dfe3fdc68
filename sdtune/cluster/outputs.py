"""Where a run's large files live on a cluster, and when they are deleted.

Every run owns one prefix, ``<cluster.staging_uri>/<KFP run id>/``:

* ``data/`` the captioned dataset staged for a multi-node job, ``out/`` the job's outputs on their way back
  to the train task, ``checkpoints/`` the durable checkpoints a retried task resumes from. A run that
  **succeeded** deletes all three from its exit handler (:func:`cleanup_after_run`); a failed run keeps
  them, because KFP's "retry run" re-runs the failed tasks under the same run id and resumes from them.
* ``outputs/`` the trained model when it travels by URI (:func:`outputs_by_uri`: full fine-tunes and
  DreamBooth write whole pipelines, GBs). The train task uploads it once; evaluate downloads it once into
  the model cache (:func:`fetch_model`); register points the MLflow model version at it. It is never
  deleted here: the registry refers to it.

Deletion refuses any key outside the run's own prefix (:func:`delete_run_part`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from sdtune.config import RunConfig
from sdtune.errors import ConfigError

# Methods whose outputs are a whole diffusers pipeline (GBs) rather than an adapter (MBs).
LARGE_OUTPUT_METHODS = frozenset({"full", "dreambooth"})
# What a finished run no longer needs; "outputs" is absent on purpose (the registry points at it).
STAGED_PARTS = ("data", "out", "checkpoints")
OUTPUTS_PART = "outputs"


def outputs_by_uri(cfg: RunConfig) -> bool:
    """True when the train step hands its outputs on as an S3 URI instead of a KFP artifact."""
    mode = cfg.cluster.outputs_by
    return mode == "uri" or (mode == "auto" and cfg.train.method in LARGE_OUTPUT_METHODS)


def on_cluster() -> bool:
    """Inside a KFP task pod (the KFP launcher sets the pod name); kfp.local runs have no pod."""
    return bool(os.environ.get("KFP_POD_NAME"))


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def run_prefix(cfg: RunConfig, run_id: str) -> str:
    """``<staging_uri>/<run_id>``: everything one run stages lives under it."""
    if not run_id or "/" in run_id or run_id in (".", "..") or not run_id.isprintable():
        raise ConfigError(f"run id {run_id!r} cannot name a staging prefix")
    staging = cfg.cluster.staging_uri.rstrip("/")
    if not is_s3(staging) or "{namespace}" in staging:
        raise ConfigError(f"cluster.staging_uri {staging!r} is not a concrete s3:// prefix")
    return f"{staging}/{run_id}"


def outputs_location(cfg: RunConfig, run_id: str) -> str:
    """Where the train step puts a model that travels by URI: ``<run prefix>/outputs`` on a cluster; a
    folder under ``$SDTUNE_HOME/outputs`` in a local run (no object store to hand it through)."""
    if on_cluster():
        return f"{run_prefix(cfg, run_id)}/{OUTPUTS_PART}"
    from sdtune.tracking import sdtune_home

    return str((sdtune_home() / "outputs" / run_id).resolve())


def model_cache_root() -> Path:
    """Beside the step cache: on a cluster the shared cache PVC, so a model is fetched once per cluster."""
    from sdtune.cache import cache_root

    return cache_root().parent / "models"


def fetch_model(uri: str, root: Path | None = None) -> Path:
    """A local folder holding the model at ``uri``: the folder itself for a local path, else one download
    into the model cache, keyed by the objects' names, sizes and ETags (a changed object is fetched anew).
    The copy is renamed into place complete, so a killed download is never taken for a model."""
    if not is_s3(uri):
        return Path(uri)
    from sdtune.data.s3 import client_from_env, split_s3_uri
    from sdtune.errors import TrainingError
    from sdtune.staging import download_prefix

    bucket, prefix = split_s3_uri(uri)
    prefix = prefix.rstrip("/") + "/"
    listing = sorted(
        (o.object_name, o.size or 0, o.etag or "")
        for o in client_from_env().list_objects(bucket, prefix=prefix, recursive=True)
    )
    if not listing:
        raise TrainingError(f"{uri}: no model files under this prefix")
    digest = hashlib.sha256(repr((uri, listing)).encode()).hexdigest()[:32]
    root = Path(root or model_cache_root())
    target = root / digest
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{digest}.{uuid.uuid4().hex}.partial"
    try:
        download_prefix(uri, partial)
        os.replace(partial, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # left only when another process won the rename
    return target


def publish_outputs(local: Path, uri: str) -> str:
    """Put the train step's outputs at ``uri``: one upload to S3, or a move into a local folder."""
    if is_s3(uri):
        from sdtune.staging import upload_dir

        upload_dir(local, uri)
    elif Path(uri).resolve() != Path(local).resolve():
        target = Path(uri)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(local, target)
    return uri


def has_objects(uri: str) -> bool:
    """True when ``uri`` (S3 prefix or folder) still holds files."""
    if is_s3(uri):
        from sdtune.staging import prefix_size

        return prefix_size(uri) > 0
    return Path(uri).is_dir() and any(p.is_file() for p in Path(uri).rglob("*"))


def delete_run_part(uri: str, prefix: str) -> int:
    """Delete every object under ``uri``, which must lie strictly inside the run prefix ``prefix``;
    anything else (another run, the staging root, another bucket, ``..``) is refused before any call."""
    from sdtune.staging import delete_prefix

    root = prefix.rstrip("/") + "/"
    target = uri.rstrip("/")
    inside = target.startswith(root) and len(target) > len(root)
    parts = target[len("s3://") :].split("/")
    if not is_s3(target) or not inside or any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"refusing to delete {uri}: not inside this run's staging prefix {root}")
    return delete_prefix(target)


def cleanup_run_staging(cfg: RunConfig, run_id: str) -> dict[str, int]:
    """Delete the run's staged data, job outputs and checkpoints; returns the object count per part."""
    prefix = run_prefix(cfg, run_id)
    return {part: delete_run_part(f"{prefix}/{part}", prefix) for part in STAGED_PARTS}


def cleanup_after_run(cfg: RunConfig, run_id: str, pipeline_state: str) -> dict[str, int] | None:
    """The exit handler's cleanup: only after the whole run SUCCEEDED (no task retry can still need the
    staged files), only on a cluster, and not with ``cluster.keep_staging``. None when nothing was done."""
    if pipeline_state.upper() != "SUCCEEDED" or cfg.cluster.keep_staging or not on_cluster():
        return None
    return cleanup_run_staging(cfg, run_id)
