"""Per-task Kubernetes settings from ``cfg.cluster``; the pipeline calls this once for every task.

Why each setting is here:
* resources and GPUs: without ``set_accelerator_type`` + ``set_accelerator_limit`` the pod never gets a GPU
  and the step silently trains on CPU;
* ``/dev/shm``: data-loading steps get a memory-backed emptyDir (the 64 MiB default kills DataLoader workers);
* credentials: Secrets become env vars (``use_secret_as_env``), never pipeline parameters, so they are not
  stored in the run record; non-secret endpoints come from the ``sdtune-env`` ConfigMap;
* retries: only the train step retries (with backoff): its failures are the transient kind (preemption,
  NCCL timeouts). KFP 2.17 cannot filter retries by exit code; the multi-node launcher refuses to start a
  new job after a non-retryable exit code instead (``sdtune.cluster.launcher``);
* sidecar injection off: an Istio sidecar keeps a finished task pod running; MLflow opts out of the mesh
  the same way (manifests/base), so the two agree (docs/cluster.md, "Istio");
* the train task requests exactly the GPUs its ranks use (``sdtune.cluster.placement``), with a node
  affinity on the GPU model when ``cluster.gpu_model`` names one;
* ``OMP_NUM_THREADS`` from the pod's CPU limit (per rank), not the node's CPU count: read from the
  cgroup inside the torch-heavy components (``sdtune.cluster.placement.use_pod_cpu_limit``), not set
  here, because kfp.local passes task env vars on to local runs;
* the multi-node launcher gets its pod's name and uid, so the job it creates is owned by (and garbage
  collected with) that pod even when the launcher is killed without a chance to clean up;
* optional: a shared cache PVC (model and step caches), image pull secrets, a Kueue queue label.

Local runs (``kfp.local``) ignore all of it, so it is asserted on the compiled YAML (tests/cluster).
"""

from __future__ import annotations

from kfp import dsl, kubernetes

from sdtune.cluster.jobs import (
    API_ACCESS_LABEL,
    CACHE_ENV,
    CACHE_MOUNT,
    CONFIG_MAP_KEYS,
    GPU_RESOURCE,
    INTERNET_ACCESS_LABEL,
    KUEUE_PRIORITY_LABEL,
    KUEUE_QUEUE_LABEL,
    PART_OF,
    POD_NAME_ENV,
    POD_UID_ENV,
    UID,
    mesh_metadata,
)
from sdtune.cluster.placement import GPU_PRODUCT_LABEL, GPU_PRODUCTS, gpus_per_node
from sdtune.config import RunConfig, StepResources

SHM_VOLUME = "dshm"
# Steps that may fetch from outside the cluster: URL sources, hub models (captioner, upscaler, base model).
FETCHING_STEPS = frozenset({"ingest", "preprocess", "caption", "train", "evaluate", "register"})
# The multi-node launcher task only watches the job; the job's own pods get ``cluster.steps.train``.
LAUNCHER_RESOURCES = StepResources(
    cpu_request="100m", cpu_limit="1", memory_request="256Mi", memory_limit="1Gi"
)


def apply_task_settings(task: dsl.PipelineTask, step: str, cfg: RunConfig) -> dsl.PipelineTask:
    """Apply resources, GPUs, shm, scheduling, credentials and retries for pipeline step ``step``."""
    cl = cfg.cluster
    launches_job = step == "train" and cl.launcher != "single_node"
    res = LAUNCHER_RESOURCES if launches_job else cl.step(step)

    task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
    task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
    trains_here = step == "train" and not launches_job
    gpus = gpus_per_node(cfg) if trains_here else res.gpus
    gpu = gpus > 0
    if gpu:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
        if cl.gpu_model:
            kubernetes.add_node_affinity(
                task,
                match_expressions=[
                    {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(GPU_PRODUCTS[cl.gpu_model])}
                ],
            )
    if res.shm:
        kubernetes.empty_dir_mount(
            task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory", size_limit=cl.shm_size
        )

    for key, value in {**cl.node_selector, **(cl.gpu_node_selector if gpu else {})}.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in [*cl.tolerations, *(cl.gpu_tolerations if gpu else [])]:
        kubernetes.add_toleration(
            task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect
        )

    for secret in cl.secrets:
        kubernetes.use_secret_as_env(
            task,
            secret_name=secret.name,
            optional=secret.optional,
            secret_key_to_env={key: env for env, key in secret.env.items()},
        )
    if cl.config_map:
        kubernetes.use_config_map_as_env(
            task,
            config_map_name=cl.config_map,
            optional=True,
            config_map_key_to_env={k: k for k in CONFIG_MAP_KEYS},
        )

    kubernetes.set_security_context(task, run_as_user=UID, run_as_group=UID, run_as_non_root=True)
    mesh_labels, mesh_annotations = mesh_metadata(cl.istio_sidecar)
    for key, value in mesh_annotations.items():
        kubernetes.add_pod_annotation(task, annotation_key=key, annotation_value=value)
    labels = {**mesh_labels, **PART_OF}
    if cl.internet_access and step in FETCHING_STEPS:
        labels[INTERNET_ACCESS_LABEL] = "true"
    if launches_job:
        labels[API_ACCESS_LABEL] = "true"
    for key, value in labels.items():
        kubernetes.add_pod_label(task, label_key=key, label_value=value)
    if cl.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cl.image_pull_secrets))
    if cl.cache_pvc and (gpu or step in ("caption", "preprocess")):
        kubernetes.mount_pvc(task, pvc_name=cl.cache_pvc, mount_path=CACHE_MOUNT)
        for name, value in CACHE_ENV.items():
            task.set_env_variable(name, value)
    if cl.kueue_queue and gpu:
        kubernetes.add_pod_label(task, label_key=KUEUE_QUEUE_LABEL, label_value=cl.kueue_queue)
        if cl.kueue_priority_class:
            kubernetes.add_pod_label(
                task, label_key=KUEUE_PRIORITY_LABEL, label_value=cl.kueue_priority_class
            )
    if launches_job:
        kubernetes.use_field_path_as_env(task, env_name=POD_NAME_ENV, field_path="metadata.name")
        kubernetes.use_field_path_as_env(task, env_name=POD_UID_ENV, field_path="metadata.uid")

    if step == "train":
        task.set_retry(cl.train_retries, backoff_duration=cl.retry_backoff, backoff_factor=2.0)
        # The task outlives the job it launches by a margin, so the launcher's own timeout fires first.
        kubernetes.set_timeout(task, seconds=cl.job_timeout_s + 900)
    return task
