"""Rendered TrainJob / PyTorchJob specs: valid against the vendored CRD schemas, with the pod hardening."""

from __future__ import annotations

import pytest

from sdtune.cluster.jobs import (
    JobSpec,
    job_name,
    render,
    render_pytorchjob,
    render_trainjob,
    spec_from_config,
)
from sdtune.config import RunConfig
from tests.cluster.conftest import manifests_check

RUN_ID = "8d6c1e2a-0f3b-4c1e-9a57-2b8f0d4e6c11"


def _cfg(nodes: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "train": {"num_processes": 8},
            "cluster": {"num_nodes": nodes, "gpus_per_node": 8, "gpu_node_selector": {"pool": "a100"}},
        }
    )


def _spec(nodes: int, attempt: int = 0) -> JobSpec:
    return spec_from_config(
        _cfg(nodes),
        run_id=RUN_ID,
        attempt=attempt,
        image="img:0.1.0",
        args=["-m", "sdtune.cli", "train"],
        namespace="team",
    )


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_rendered_jobs_validate_against_crds(crds, kind, nodes):
    job = render(kind, _spec(nodes))
    assert manifests_check.validate_object(job, crds) == []
    assert manifests_check.policy_errors(job) == []


def test_trainjob_shape():
    job = render_trainjob(_spec(2))
    trainer = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert trainer["numNodes"] == 2
    assert trainer["numProcPerNode"] == 8 and isinstance(trainer["numProcPerNode"], int)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert trainer["command"] == ["torchrun"]
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    template = pod["template"]["spec"]["template"]
    assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    assert template["spec"]["volumes"] == [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
    ]
    assert template["spec"]["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert template["spec"]["nodeSelector"] == {"pool": "a100"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in template["spec"][
        "tolerations"
    ]
    secret_envs = {e["name"] for e in trainer["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secret_envs


def test_pytorchjob_shape():
    job = render_pytorchjob(_spec(2))
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"  # a string in v1
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    container = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch"
    assert "--nnodes=2" in container["args"] and "--nproc-per-node=8" in container["args"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert spec["runPolicy"]["backoffLimit"] == 0
    single = render_pytorchjob(_spec(1))
    assert "Worker" not in single["spec"]["pytorchReplicaSpecs"]


def test_wrong_types_fail_the_crd_schema(crds):
    job = render_pytorchjob(_spec(1))
    job["spec"]["nprocPerNode"] = 8
    assert any("not of type 'string'" in e for e in manifests_check.validate_object(job, crds))
    job = render_trainjob(_spec(1))
    job["spec"]["trainer"]["numProcPerNode"] = "8"
    job["spec"]["trainer"]["gpus"] = 8  # unknown field: the API server would drop it silently
    errors = manifests_check.validate_object(job, crds)
    assert any("not of type 'integer'" in e for e in errors)
    assert any("'gpus' was unexpected" in e for e in errors)


def test_job_names_are_deterministic_short_dns_labels():
    assert job_name(RUN_ID, 0) == job_name(RUN_ID, 0)
    assert job_name(RUN_ID, 0) != job_name(RUN_ID, 1)
    assert job_name(RUN_ID, 0) != job_name(RUN_ID.replace("8", "9"), 0)
    for run_id in (RUN_ID, "Run_With.Odd--chars" * 5, "0"):
        name = job_name(run_id, 12)
        assert len(name) <= 40 and manifests_check.RFC1035.match(name), name


def test_step_override_keeps_the_other_step_defaults():
    from sdtune.config import config_from_dict

    cfg = config_from_dict({}, ["cluster.steps.train.gpus=8", "cluster.launcher=pytorchjob"])
    train = cfg.cluster.step("train")
    assert train.gpus == 8 and train.memory_request == "64Gi" and train.shm
    assert cfg.cluster.step("finish_run").gpus == 0  # steps without a section get the light defaults


def test_pods_get_the_preemption_grace_before_sigkill():
    cfg = _cfg(2)
    cfg.train.preempt_grace_s = 300
    spec = spec_from_config(cfg, run_id=RUN_ID, attempt=0, image="img", args=["x"], namespace="team")
    trainjob = render_trainjob(spec)
    patch = trainjob["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod = patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 360  # the trainer's grace + time to exit
    for replica in render_pytorchjob(spec)["spec"]["pytorchReplicaSpecs"].values():
        assert replica["template"]["spec"]["terminationGracePeriodSeconds"] == 360
