"""apply_task_settings, asserted on compiled YAML (kfp.local ignores all of it)."""

from __future__ import annotations

import yaml

from sdtune.config import RunConfig
from tests.cluster.pipeline_stub import compile_stub


def _compiled(tmp_path, cfg):
    docs = list(yaml.safe_load_all(compile_stub(cfg, tmp_path / "p.yaml").read_text()))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    executor = {t: spec["components"][tasks[t]["componentRef"]["name"]]["executorLabel"] for t in tasks}
    by_step = {tasks[t]["taskInfo"]["name"]: t for t in tasks}
    return spec, platform, tasks, executor, by_step


def _cfg(**cluster):
    return RunConfig.model_validate({"train": {"num_processes": 8}, "cluster": cluster})


def test_train_step_gets_gpus_shm_secrets_retries(tmp_path):
    spec, platform, tasks, executor, by_step = _compiled(tmp_path, _cfg(gpu_node_selector={"pool": "a100"}))
    train = by_step["train"]
    res = spec["deploymentSpec"]["executors"][executor[train]]["container"]["resources"]
    assert (
        res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "8"
    )
    assert res["resourceMemoryLimit"] == "96Gi" and res["resourceCpuRequest"] == "8"
    k8s = platform[executor[train]]
    assert {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"} in k8s[
        "emptyDirMounts"
    ]
    secrets = {
        s["secretName"]: {e["envVar"]: e["secretKey"] for e in s["keyToEnv"]} for s in k8s["secretAsEnv"]
    }
    assert secrets["mlpipeline-minio-artifact"] == {
        "AWS_ACCESS_KEY_ID": "accesskey",
        "AWS_SECRET_ACCESS_KEY": "secretkey",
    }
    assert k8s["configMapAsEnv"][0]["configMapName"] == "sdtune-env"
    assert k8s["nodeSelector"]["labels"] == {"pool": "a100"}
    assert any(t.get("key") == "nvidia.com/gpu" for t in k8s["tolerations"])
    assert k8s["securityContext"]["runAsNonRoot"] is True
    assert k8s["podMetadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    retry = tasks[train]["retryPolicy"]
    assert retry["maxRetryCount"] == 2 and retry["backoffDuration"] == "120s"


def test_light_steps_get_no_gpu_and_no_retries(tmp_path):
    spec, platform, tasks, executor, by_step = _compiled(tmp_path, _cfg())
    register = by_step["register"]
    assert (
        "accelerator" not in spec["deploymentSpec"]["executors"][executor[register]]["container"]["resources"]
    )
    assert "retryPolicy" not in tasks[register]
    assert "emptyDirMounts" not in platform[executor[register]]
    assert "tolerations" not in platform[executor[register]]  # GPU taints only on GPU steps
    # credentials reach every step as Secret env vars, never as pipeline parameters
    assert platform[executor[register]]["secretAsEnv"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"config"}
    prep = by_step["preprocess"]
    assert platform[executor[prep]]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"


def test_multi_node_launcher_task_is_light(tmp_path):
    spec, _, tasks, executor, by_step = _compiled(tmp_path, _cfg(launcher="trainjob", num_nodes=2))
    train = by_step["train"]
    res = spec["deploymentSpec"]["executors"][executor[train]]["container"]["resources"]
    assert "accelerator" not in res and res["resourceMemoryLimit"] == "1Gi"
    assert tasks[train]["retryPolicy"]["maxRetryCount"] == 2
