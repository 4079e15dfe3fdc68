"""Render Kubeflow Trainer v2 TrainJobs and Training Operator v1 PyTorchJobs as plain dicts.

The dicts are what the launcher creates and what tests/tools validate against the CRD schemas in
``schemas/`` (vendored); nothing here talks to a cluster. Both kinds get the same pod hardening: sidecar
injection off (an Istio sidecar keeps a finished training pod alive forever), a memory-backed /dev/shm
(NCCL and DataLoader workers outgrow the 64 MiB default), non-root, no privilege escalation, all
capabilities dropped, RuntimeDefault seccomp, no service-account token (training never calls the API).

Lifecycle: the job is owned by the launcher pod (``ownerReferences``), so Kubernetes deletes it when that
pod goes, even if the launcher was OOM-killed or evicted without running its cleanup; PyTorchJob's
``cleanPodPolicy: Running`` frees the GPUs of pods still running when the job ends. The pods' grace period
and torchrun's ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` both exceed ``train.preempt_grace_s``, so a preempted
rank has time to write its checkpoint.

Every text that comes from the config (args, env values) is escaped for Kubernetes' ``$(VAR)`` expansion
(``$`` → ``$$``): a prompt holding ``$(AWS_SECRET_ACCESS_KEY)`` stays that text instead of the secret.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

TRAINJOB_API = "trainer.kubeflow.org/v1alpha1"
PYTORCHJOB_API = "kubeflow.org/v1"
GPU_RESOURCE = "nvidia.com/gpu"
SHM_VOLUME = "dshm"
RUN_ID_LABEL = "sdtune.io/run-id"
ATTEMPT_LABEL = "sdtune.io/attempt"
MANAGED_BY = {"app.kubernetes.io/managed-by": "sdtune"}
NO_SIDECAR = {"sidecar.istio.io/inject": "false"}
IN_MESH = {"sidecar.istio.io/inject": "true"}
NATIVE_SIDECAR = {"sidecar.istio.io/nativeSidecar": "true"}  # the proxy exits when the pod's work does
# Selected by the egress NetworkPolicies of manifests/base (default deny + what each pod needs).
PART_OF = {"app.kubernetes.io/part-of": "sdtune"}
API_ACCESS_LABEL = "sdtune.io/api-access"
INTERNET_ACCESS_LABEL = "sdtune.io/hub-access"
# Keys of the sdtune-env ConfigMap (manifests/base) that training pods need; optional so a missing key
# does not block the pod.
CONFIG_MAP_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",
)
UID = 1000  # the non-root user of images/*/Dockerfile
# The launcher pod's identity (downward API), for the ownerReference of the job it creates.
POD_NAME_ENV, POD_UID_ENV = "SDTUNE_POD_NAME", "SDTUNE_POD_UID"
# The shared cache volume (cluster.cache_pvc): hub downloads and sdtune's step cache.
CACHE_MOUNT = "/sdtune-cache"
CACHE_ENV = {"HF_HOME": f"{CACHE_MOUNT}/hf", "SDTUNE_CACHE_DIR": f"{CACHE_MOUNT}/steps"}
CACHE_VOLUME = "sdtune-cache"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
# torchrun's SIGTERM → SIGKILL wait for its workers, and the pod's on top of that: the trainer needs
# train.preempt_grace_s to write its checkpoint.
TORCHRUN_GRACE_MARGIN_S, POD_GRACE_MARGIN_S = 30, 60
_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "16", "64Gi") as a number."""
    m = _QUANTITY.match(str(text).strip())
    if not m or m[2] not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    return float(m[1]) * _SUFFIX[m[2]]


def cpu_cores(text: str | int | float) -> float:
    return quantity(text)


def k8s_escape(text: str) -> str:
    """Protect ``text`` from the kubelet's ``$(VAR)`` expansion of args and env values (``$$`` → ``$``)."""
    return text.replace("$", "$$")


def job_name(run_id: str, attempt: int = 0, prefix: str = "sdtune") -> str:
    """Deterministic RFC 1035 name from the run id and attempt, short enough for derived pod hostnames.

    JobSet/PyTorchJob derive pod and Service names from it (``<name>-node-0-0``, ``<name>-master-0``),
    which must stay DNS labels (≤ 63 chars), so the name is capped at 40.
    """
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")[:16].strip("-")
    parts = [prefix, slug, digest, f"a{attempt}"]
    return "-".join(p for p in parts if p)[:40].rstrip("-")


def label_value(text: str) -> str:
    """A string squeezed into a valid label value (≤ 63, alnum at both ends)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")


@dataclass(frozen=True)
class JobSpec:
    """Everything the two renderers need; built from ``ClusterConfig`` by :func:`spec_from_config`."""

    name: str
    namespace: str
    image: str
    args: list[str]  # after ``torchrun``: e.g. ["-m", "sdtune.cli", "train", ...]
    run_id: str = ""
    attempt: int = 0
    num_nodes: int = 1
    procs_per_node: int = 8
    gpus_per_node: int = 8
    cpu_request: str = "8"
    cpu_limit: str = "16"
    memory_request: str = "64Gi"
    memory_limit: str = "96Gi"
    shm_size: str = "16Gi"
    env: list[dict[str, Any]] = field(default_factory=list)
    secrets: list[tuple[str, dict[str, str], bool]] = field(
        default_factory=list
    )  # (name, {ENV: key}, optional)
    config_map: str | None = "sdtune-env"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    trainjob_runtime: str = "torch-distributed"
    timeout_s: int | None = None
    # Time between SIGTERM and SIGKILL: the trainer needs its preemption grace to write a checkpoint.
    termination_grace_s: int = 120
    torchrun_grace_s: int = 90  # TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    owner: tuple[str, str] | None = None  # (pod name, pod uid) of the launcher
    ephemeral_storage: str | None = None
    affinity: dict[str, Any] | None = None
    image_pull_secrets: list[str] = field(default_factory=list)
    cache_pvc: str | None = None
    kueue_queue: str | None = None
    kueue_priority_class: str | None = None
    # manifests/base: an account with no role bindings and automountServiceAccountToken: false (a TrainJob's
    # runtime patch cannot set automountServiceAccountToken on the pod itself).
    service_account: str = "sdtune-training"
    internet_access: bool = True
    istio_sidecar: bool = False


def spec_from_config(
    cfg: Any,
    *,
    run_id: str,
    attempt: int,
    image: str,
    args: list[str],
    namespace: str,
    owner: tuple[str, str] | None = None,
    ephemeral_storage: str | None = None,
) -> JobSpec:
    """Map a ``RunConfig`` (its ``cluster`` and ``train`` sections) to a :class:`JobSpec`."""
    from sdtune.cluster.placement import gpu_affinity, gpus_per_node

    cl = cfg.cluster
    res = cl.steps.train
    gpus = gpus_per_node(cfg)
    gpu_tolerations = cl.gpu_tolerations if gpus else []
    tolerations = [t.model_dump(exclude_none=True) for t in [*cl.tolerations, *gpu_tolerations]]
    grace = int(cfg.train.preempt_grace_s + 0.999)
    return JobSpec(
        name=job_name(run_id, attempt),
        namespace=namespace,
        image=image,
        args=list(args),
        run_id=run_id,
        attempt=attempt,
        num_nodes=cl.num_nodes,
        procs_per_node=cfg.train.num_processes,
        gpus_per_node=gpus,
        cpu_request=res.cpu_request,
        cpu_limit=res.cpu_limit,
        memory_request=res.memory_request,
        memory_limit=res.memory_limit,
        shm_size=cl.shm_size,
        secrets=[(s.name, dict(s.env), s.optional) for s in cl.secrets],
        config_map=cl.config_map,
        node_selector={**cl.node_selector, **(cl.gpu_node_selector if gpus else {})},
        tolerations=tolerations,
        trainjob_runtime=cl.trainjob_runtime,
        timeout_s=cl.job_timeout_s,
        termination_grace_s=grace + POD_GRACE_MARGIN_S,
        torchrun_grace_s=grace + TORCHRUN_GRACE_MARGIN_S,
        owner=owner,
        ephemeral_storage=ephemeral_storage,
        affinity=gpu_affinity(cfg) if gpus else None,
        image_pull_secrets=list(cl.image_pull_secrets),
        cache_pvc=cl.cache_pvc,
        kueue_queue=cl.kueue_queue,
        kueue_priority_class=cl.kueue_priority_class,
        service_account=cl.job_service_account,
        internet_access=cl.internet_access,
        istio_sidecar=cl.istio_sidecar,
    )


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    """The launcher pod as owner: the garbage collector deletes the job (and its pods) after the pod.

    Not a controller and not blocking deletion: that would need update rights on pods/finalizers."""
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid, "blockOwnerDeletion": False}


def _metadata(spec: JobSpec) -> dict[str, Any]:
    labels = {**MANAGED_BY, ATTEMPT_LABEL: str(spec.attempt)}
    if spec.run_id:
        labels[RUN_ID_LABEL] = label_value(spec.run_id)
    if spec.kueue_queue:
        labels[KUEUE_QUEUE_LABEL] = spec.kueue_queue
        if spec.kueue_priority_class:
            labels[KUEUE_PRIORITY_LABEL] = spec.kueue_priority_class
    meta: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace, "labels": labels}
    if spec.run_id:
        meta["annotations"] = {RUN_ID_LABEL: spec.run_id}
    if spec.owner:
        meta["ownerReferences"] = [owner_reference(*spec.owner)]
    return meta


def _resources(spec: JobSpec) -> dict[str, dict[str, Any]]:
    requests: dict[str, Any] = {"cpu": spec.cpu_request, "memory": spec.memory_request}
    limits: dict[str, Any] = {"cpu": spec.cpu_limit, "memory": spec.memory_limit}
    if spec.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = spec.gpus_per_node
    if spec.ephemeral_storage:
        requests["ephemeral-storage"] = spec.ephemeral_storage
    return {"requests": requests, "limits": limits}


def _env(spec: JobSpec) -> list[dict[str, Any]]:
    ranks = max(1, int(spec.procs_per_node))
    env = [
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(spec.torchrun_grace_s)},
        # torchrun would otherwise give every rank 1 thread; the pod's CPU limit shared by its ranks.
        {"name": "OMP_NUM_THREADS", "value": str(max(1, int(cpu_cores(spec.cpu_limit)) // ranks))},
    ]
    if spec.cache_pvc:
        env += [{"name": k, "value": v} for k, v in CACHE_ENV.items()]
    for e in spec.env:
        env.append({**e, "value": k8s_escape(e["value"])} if "value" in e else dict(e))
    for name, mapping, optional in spec.secrets:
        for env_name, key in mapping.items():
            ref = {"name": name, "key": key, "optional": optional}
            env.append({"name": env_name, "valueFrom": {"secretKeyRef": ref}})
    if spec.config_map:
        for key in CONFIG_MAP_KEYS:
            ref = {"name": spec.config_map, "key": key, "optional": True}
            env.append({"name": key, "valueFrom": {"configMapKeyRef": ref}})
    return env


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def mesh_metadata(istio_sidecar: bool) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) putting a pod in or out of the Istio mesh."""
    if istio_sidecar:
        return dict(IN_MESH), {**IN_MESH, **NATIVE_SIDECAR}
    return dict(NO_SIDECAR), dict(NO_SIDECAR)


def _pod_metadata(spec: JobSpec) -> dict[str, dict[str, str]]:
    mesh_labels, annotations = mesh_metadata(spec.istio_sidecar)
    labels = {**mesh_labels, **PART_OF}
    if spec.internet_access:
        labels[INTERNET_ACCESS_LABEL] = "true"
    return {"labels": labels, "annotations": annotations}


def _container_security() -> dict[str, Any]:
    # Root filesystem stays writable: torch/triton compile caches and HF caches write under $HOME.
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _volumes(spec: JobSpec) -> list[dict[str, Any]]:
    volumes = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}}]
    if spec.cache_pvc:
        volumes.append({"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": spec.cache_pvc}})
    return volumes


def _mounts(spec: JobSpec) -> list[dict[str, Any]]:
    mounts = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    if spec.cache_pvc:
        mounts.append({"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT})
    return mounts


def _pod_spec(spec: JobSpec, containers: list[dict[str, Any]]) -> dict[str, Any]:
    """What both kinds' pods share: grace, hardening, an account without API rights, volumes, scheduling."""
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": spec.termination_grace_s,
        "securityContext": _pod_security(),
        "serviceAccountName": spec.service_account,
        "volumes": _volumes(spec),
        "containers": containers,
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.affinity:
        pod["affinity"] = spec.affinity
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    return pod


def render_trainjob(spec: JobSpec) -> dict[str, Any]:
    """A TrainJob on the ``torch-distributed`` ClusterTrainingRuntime.

    The runtime's torch plugin sets PET_NNODES/PET_NPROC_PER_NODE/PET_NODE_RANK/PET_MASTER_ADDR, which
    ``torchrun`` reads, so the command carries no rendezvous flags. Pod-level settings go through
    ``runtimePatches`` (the v2.3 replacement of podSpecOverrides) onto the runtime's ``node`` job.
    """
    pod_spec = _pod_spec(
        spec, [{"name": "node", "volumeMounts": _mounts(spec), "securityContext": _container_security()}]
    )
    job: dict[str, Any] = {
        "apiVersion": TRAINJOB_API,
        "kind": "TrainJob",
        "metadata": _metadata(spec),
        "spec": {
            "runtimeRef": {
                "name": spec.trainjob_runtime,
                "kind": "ClusterTrainingRuntime",
                "apiGroup": "trainer.kubeflow.org",
            },
            "trainer": {
                "image": spec.image,
                "command": ["torchrun"],
                "args": [k8s_escape(a) for a in spec.args],
                "numNodes": spec.num_nodes,
                "numProcPerNode": int(spec.procs_per_node),  # an integer in v2 (a string in PyTorchJob v1)
                "resourcesPerNode": _resources(spec),
                "env": _env(spec),
            },
            "runtimePatches": [
                {
                    "manager": "sdtune.io/launcher",
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {
                                        "name": "node",
                                        "template": {
                                            "spec": {
                                                "template": {
                                                    "metadata": _pod_metadata(spec),
                                                    "spec": pod_spec,
                                                }
                                            }
                                        },
                                    }
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }
    if spec.timeout_s:
        job["spec"]["activeDeadlineSeconds"] = spec.timeout_s
    return job


def _pytorch_replica(spec: JobSpec, replicas: int) -> dict[str, Any]:
    container = {
        "name": "pytorch",  # the operator finds the training container by this name
        "image": spec.image,
        "command": ["torchrun"],
        # Explicit rendezvous: operator versions differ in which PET_* vars they set, but all set
        # MASTER_ADDR/MASTER_PORT and RANK (the pod's node rank), expanded here by the kubelet.
        "args": [
            f"--nnodes={spec.num_nodes}",
            f"--nproc-per-node={spec.procs_per_node}",
            "--node-rank=$(RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
            *(k8s_escape(a) for a in spec.args),
        ],
        "env": _env(spec),
        "resources": _resources(spec),
        "volumeMounts": _mounts(spec),
        "securityContext": _container_security(),
    }
    pod_spec = _pod_spec(spec, [container])
    pod_spec["automountServiceAccountToken"] = False  # training code never talks to the API server
    return {
        "replicas": replicas,
        "restartPolicy": "Never",  # a failed rank fails the job; KFP's retry starts a new attempt
        "template": {
            "metadata": _pod_metadata(spec),
            "spec": pod_spec,
        },
    }


def render_pytorchjob(spec: JobSpec) -> dict[str, Any]:
    """A PyTorchJob (Training Operator v1) with one Master and ``num_nodes - 1`` Workers."""
    replicas = {"Master": _pytorch_replica(spec, 1)}
    if spec.num_nodes > 1:
        replicas["Worker"] = _pytorch_replica(spec, spec.num_nodes - 1)
    run_policy: dict[str, Any] = {
        "backoffLimit": 0,
        # Pods still running when the job ends (Workers after the Master failed) are deleted: they hold
        # GPUs. Finished pods stay, so logs and exit codes remain readable.
        "cleanPodPolicy": "Running",
    }
    if spec.timeout_s:
        run_policy["activeDeadlineSeconds"] = spec.timeout_s
    return {
        "apiVersion": PYTORCHJOB_API,
        "kind": "PyTorchJob",
        "metadata": _metadata(spec),
        "spec": {
            "nprocPerNode": str(spec.procs_per_node),  # a STRING in v1 ("auto", "gpu" or a number)
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }


def render(kind: str, spec: JobSpec) -> dict[str, Any]:
    """``kind`` is ``trainjob`` or ``pytorchjob`` (the ``cluster.launcher`` values)."""
    renderers = {"trainjob": render_trainjob, "pytorchjob": render_pytorchjob}
    if kind not in renderers:
        raise ValueError(f"no job renderer for launcher {kind!r}")
    return renderers[kind](spec)
