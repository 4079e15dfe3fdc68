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
* sidecar injection off: an Istio sidecar keeps a finished task pod running.

Local runs (``kfp.local``) ignore all of it, so it is asserted on the compiled YAML (tests/cluster).
"""

from __future__ import annotations

from kfp import dsl, kubernetes

from sdtune.cluster.jobs import CONFIG_MAP_KEYS, GPU_RESOURCE, NO_SIDECAR, UID
from sdtune.config import RunConfig, StepResources

SHM_VOLUME = "dshm"
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
    gpu = res.gpus > 0
    if gpu:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(res.gpus)
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
    for key, value in NO_SIDECAR.items():
        kubernetes.add_pod_label(task, label_key=key, label_value=value)

    if step == "train":
        task.set_retry(cl.train_retries, backoff_duration=cl.retry_backoff, backoff_factor=2.0)
        # The task outlives the job it launches by a margin, so the launcher's own timeout fires first.
        kubernetes.set_timeout(task, seconds=cl.job_timeout_s + 900)
    return task
