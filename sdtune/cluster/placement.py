"""Where training runs on a cluster: GPUs per node, the GPU model, the S3 prefixes a run may write.

One source for the pipeline's train task, the TrainJob/PyTorchJob renderer and the Katib trial, so the
GPUs a pod requests are always the GPUs its ranks use (``train.num_processes`` ranks per node, one GPU
each). Imports only the standard library and ``sdtune.errors`` (``sdtune.config`` validates with it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdtune.errors import ConfigError

CGROUP = Path("/sys/fs/cgroup")

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery (GPU Operator)
# The planner's GPU names (sdtune.train.plan.GPUS) → the product labels GPU feature discovery writes
# (SXM and PCIe boards report different names; a node affinity accepts any of them).
GPU_PRODUCTS: dict[str, tuple[str, ...]] = {
    "a100-40gb": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
    "a100-80gb": ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"),
    "h100-80gb": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"),
    "h200-141gb": ("NVIDIA-H200", "NVIDIA-H200-NVL"),
    "l40s-48gb": ("NVIDIA-L40S",),
    "l4-24gb": ("NVIDIA-L4",),
    "a10-24gb": ("NVIDIA-A10", "NVIDIA-A10G"),
}
# Kubeflow Pipelines >= 2.15 gives each profile namespace S3 keys limited to these prefixes of its bucket
# (the profile controller's policy); a write anywhere else is denied.
KFP_ALLOWED_PREFIXES = (
    "s3://mlpipeline/artifacts/",
    "s3://mlpipeline/private-artifacts/{namespace}/",
    "s3://mlpipeline/private/{namespace}/",
    "s3://mlpipeline/shared/",
)


def gpus_per_node(cfg: Any) -> int:
    """GPUs one training pod requests: ``train.num_processes`` (one rank per GPU), 0 for CPU training.

    ``cluster.steps.train.gpus`` says whether the train task trains on GPUs (0: CPU; its default 1: GPUs);
    any other count, and a ``cluster.gpus_per_node`` other than the ranks, is a config error: requesting
    1 GPU for 8 ranks (or 8 GPUs for 1 rank) never does what was meant."""
    cl, ranks = cfg.cluster, cfg.train.num_processes
    train = cl.steps.train
    if cl.launcher == "single_node":
        if train.gpus == 0:
            return 0
        if train.gpus not in (1, ranks):
            raise ConfigError(
                f"cluster.steps.train.gpus={train.gpus} but train.num_processes={ranks}: "
                "the train task runs one rank per GPU; set them equal (or drop cluster.steps.train.gpus)"
            )
    if cl.gpus_per_node is not None and cl.gpus_per_node not in (0, ranks):
        raise ConfigError(
            f"cluster.gpus_per_node={cl.gpus_per_node} but train.num_processes={ranks}: "
            "each node runs one rank per GPU; set them equal (or drop cluster.gpus_per_node)"
        )
    if cl.gpus_per_node == 0:
        return 0
    return ranks


def gpu_affinity(cfg: Any) -> dict[str, Any] | None:
    """A required node affinity on the GPU model (``cluster.gpu_model``), or None when none is named."""
    model = cfg.cluster.gpu_model
    if not model:
        return None
    term = {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": list(GPU_PRODUCTS[model])}
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [term]}]
            }
        }
    }


def resolve_namespace(uri: str, namespace: str | None) -> str:
    """``{namespace}`` in a configured S3 prefix → the profile namespace (left as is when unknown)."""
    return uri.replace("{namespace}", namespace) if namespace else uri


def outside_allowed(uri: str, allowed: list[str] | tuple[str, ...], namespace: str | None = None) -> bool:
    """True when ``uri`` (an S3 prefix a run writes) is not under any of ``allowed``.

    Both sides may still hold ``{namespace}``: then they are compared as templates (what a compile-time
    check can do before the namespace is known)."""
    if not uri.startswith("s3://"):
        return False
    target = resolve_namespace(uri, namespace).rstrip("/") + "/"
    if ".." in target.split("/"):
        return True
    return not any(target.startswith(resolve_namespace(p, namespace).rstrip("/") + "/") for p in allowed)


def s3_write_prefixes(cfg: Any) -> dict[str, str]:
    """Every S3 prefix the pipeline writes, by the setting that names it."""
    found = {"cluster.staging_uri": cfg.cluster.staging_uri}
    if (cfg.train.checkpoint_dir or "").startswith("s3://"):
        found["train.checkpoint_dir"] = cfg.train.checkpoint_dir
    return found


def check_s3_prefixes(cfg: Any, namespace: str | None = None) -> None:
    """Refuse (one line) a run that would write outside the namespace's allowed S3 prefixes."""
    allowed = cfg.cluster.allowed_s3_prefixes
    for setting, uri in s3_write_prefixes(cfg).items():
        if outside_allowed(uri, allowed, namespace):
            raise ConfigError(
                f"{setting}={uri} is outside the namespace's writable S3 prefixes "
                f"({', '.join(allowed)}); change it or cluster.allowed_s3_prefixes"
            )


def pod_cpu_limit(cgroup: Path = CGROUP) -> float | None:
    """The container's CPU limit in cores (cgroup v2 ``cpu.max`` or v1 CFS quota); None when unlimited."""
    try:
        if (cgroup / "cpu.max").is_file():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def use_pod_cpu_limit(ranks: int, cgroup: Path = CGROUP) -> None:
    """``OMP_NUM_THREADS`` = the pod's CPU limit shared by its ranks, unless set or unlimited.

    torch (and torchrun's default) otherwise size thread pools from the host's CPU count, which in a pod
    limited to 16 of 128 cores oversubscribes the quota and throttles every step."""
    limit = pod_cpu_limit(cgroup)
    if limit and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, int(limit) // max(1, ranks)))
