"""Offline checks of everything sdtune applies to a cluster (`make manifests-check`).

1. `kubectl kustomize` renders every overlay in manifests/overlays/.
2. Built-in objects validate against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown
   fields fail, because the API server would drop them silently).
3. Custom resources (TrainJob, PyTorchJob, training runtimes) validate against the CRD schemas in the
   vendored schemas folder (schemas/, upstream versions in schemas/README.md), made strict the same way (structural schemas prune unknown fields). The CEL
   name rule of TrainJob is checked by hand; other CEL rules need an API server.
4. The TrainJob/PyTorchJob specs the launcher renders (1×8 and 2×8 GPUs) validate the same way.
5. Istio AuthorizationPolicies and Kueue objects validate against the vendored Istio and Kueue CRDs.
6. Policy: containers run non-root without privilege escalation, capabilities or a seccomp profile other
   than RuntimeDefault, and with requests+limits; Roles have no
   wildcards; no Secret is rendered (references only); the example Secrets hold placeholders only.

Schemas: $SDTUNE_SCHEMAS_DIR, else the repository's own schemas/ (vendored, so a bare clone is enough).
Exit status 1 on any finding; one line per finding.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = "1.32"  # the kubectl on CI; kubernetes-validate bundles 1.25–1.37
# libyaml when present: the CRD files are large (pure-Python parsing takes ~5 s).
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def schemas_dir() -> Path:
    env = os.environ.get("SDTUNE_SCHEMAS_DIR")
    path = Path(env) if env else ROOT / "schemas"
    if not path.is_dir():
        raise SystemExit(f"schemas not found at {path}; set SDTUNE_SCHEMAS_DIR")
    return path


def render_overlay(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed: {proc.stderr.strip()}")
    return [d for d in yaml.load_all(proc.stdout, Loader=Loader) if d]


def _strict(schema: Any) -> Any:
    """Forbid unknown fields wherever the CRD lists its properties and does not preserve unknown ones."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            # metadata is typed `object` without properties in CRDs; the API server owns it.
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def load_crd_schemas(root: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → strict OpenAPI v3 schema, from every CRD file under ``root``."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(root.rglob("*.yaml")):
        text = path.read_text()
        if "CustomResourceDefinition" not in text:
            continue
        for doc in yaml.load_all(text, Loader=Loader):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                # Some CRDs (Istio's) list only spec/status; every object has these three.
                props = schema.setdefault("properties", {})
                for key in ("apiVersion", "kind"):
                    props.setdefault(key, {"type": "string"})
                props.setdefault("metadata", {"type": "object"})
                found[(f"{group}/{version['name']}", kind)] = _strict(schema)
    return found


def validate_object(
    obj: dict[str, Any], crds: dict[tuple[str, str], dict[str, Any]], k8s_version: str = K8S_VERSION
) -> list[str]:
    import jsonschema
    import kubernetes_validate

    where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in crds:
        errors = [
            f"{where}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in jsonschema.Draft7Validator(crds[key]).iter_errors(obj)
        ]
        name = (obj.get("metadata") or {}).get("name", "")
        if obj.get("kind") == "TrainJob" and not (RFC1035.match(name) and len(name) <= 63):
            errors.append(f"{where}: metadata.name must be an RFC 1035 label of at most 63 characters")
        return errors
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {'.'.join(map(str, exc.path)) or '(root)'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{where}: no schema for {key[0]} {key[1]} (neither built-in nor a known CRD)"]
    return []


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind in POD_TEMPLATE_KINDS:
        return [spec["template"]["spec"]]
    if kind == "PyTorchJob":
        return [r["template"]["spec"] for r in spec["pytorchReplicaSpecs"].values()]
    if kind == "TrainJob":  # the pod settings sdtune patches in, with the trainer's resources
        pods = []
        for patch in spec.get("runtimePatches") or []:
            for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                pod = copy.deepcopy(job["template"]["spec"]["template"]["spec"])
                for c in pod.get("containers", []):
                    c.setdefault("resources", (spec.get("trainer") or {}).get("resourcesPerNode") or {})
                pods.append(pod)
        return pods
    return []


def policy_errors(obj: dict[str, Any]) -> list[str]:
    where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    errors: list[str] = []
    if obj.get("kind") == "Secret":
        errors.append(f"{where}: overlays must only reference Secrets, never contain them")
    for rule in (obj.get("rules") or []) if obj.get("kind") in ("Role", "ClusterRole") else []:
        for field in ("apiGroups", "resources", "verbs"):
            if "*" in (rule.get(field) or []):
                errors.append(f"{where}: wildcard in {field}")
    if obj.get("kind") == "ClusterRole" or obj.get("kind") == "ClusterRoleBinding":
        errors.append(f"{where}: sdtune needs namespaced RBAC only")
    for pod in _pod_specs(obj):
        if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
            errors.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        pod_seccomp = ((pod.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        for c in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            sc = c.get("securityContext") or {}
            if (sc.get("seccompProfile") or {}).get("type", pod_seccomp) != "RuntimeDefault":
                errors.append(f"{where}/{c['name']}: seccompProfile is not RuntimeDefault")
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append(f"{where}/{c['name']}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                errors.append(f"{where}/{c['name']}: capabilities are not dropped")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(res.get(part) or {})
                if missing:
                    errors.append(f"{where}/{c['name']}: resources.{part} lacks {', '.join(sorted(missing))}")
    return errors


def example_secret_errors(path: Path) -> list[str]:
    """The example Secrets must validate and carry placeholders for every credential."""
    errors: list[str] = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        errors += validate_object(doc, {})
        for key, value in (doc.get("stringData") or {}).items():
            if re.search(r"pass|secret|key|uri|json|token|ini", key, re.I) and "PLACEHOLDER" not in str(
                value
            ):
                errors.append(f"{path.name}: {doc['metadata']['name']}.{key} is not a placeholder")
        if doc.get("data"):
            errors.append(f"{path.name}: {doc['metadata']['name']} uses data:, use placeholder stringData")
    return errors


def sample_jobs() -> list[dict[str, Any]]:
    """TrainJob and PyTorchJob for 1×8 and 2×8 GPUs, exactly as the launcher renders them."""
    sys.path.insert(0, str(ROOT))
    from sdtune.cluster.jobs import render, spec_from_config
    from sdtune.config import RunConfig

    jobs = []
    for nodes in (1, 2):
        cfg = RunConfig.model_validate(
            {"train": {"num_processes": 8}, "cluster": {"num_nodes": nodes, "gpus_per_node": 8}}
        )
        for kind in ("trainjob", "pytorchjob"):
            spec = spec_from_config(
                cfg,
                run_id="8d6c1e2a-0f3b-4c1e-9a57-2b8f0d4e6c11",
                attempt=0,
                image="ghcr.io/sdtune/sdtune-train:0.1.0",
                namespace="sdtune",
                args=["-m", "sdtune.cli", "train", "--config", "/etc/sdtune/config.yaml"],
            )
            jobs.append(render(kind, spec))
    return jobs


def run(overlays_root: Path, k8s_version: str, out=sys.stdout) -> int:
    crds = load_crd_schemas(schemas_dir())
    findings: list[str] = []
    overlays = sorted(p.parent for p in overlays_root.glob("*/kustomization.yaml"))
    if not overlays:
        findings.append(f"no overlays under {overlays_root}")
    for overlay in overlays:
        try:
            objs = render_overlay(overlay)
        except RuntimeError as exc:
            findings.append(str(exc))
            continue
        errs = [e for o in objs for e in validate_object(o, crds, k8s_version) + policy_errors(o)]
        findings += [f"{overlay.name}: {e}" for e in errs]
        print(f"{'ok  ' if not errs else 'FAIL'} overlay {overlay.name}: {len(objs)} objects", file=out)
    jobs = sample_jobs()
    errs = [e for j in jobs for e in validate_object(j, crds, k8s_version) + policy_errors(j)]
    findings += [f"launcher: {e}" for e in errs]
    print(
        f"{'ok  ' if not errs else 'FAIL'} launcher jobs: {len(jobs)} (TrainJob, PyTorchJob × 1x8, 2x8)",
        file=out,
    )
    example = overlays_root.parent / "examples" / "secrets.example.yaml"
    if example.is_file():
        errs = example_secret_errors(example)
        findings += errs
        print(
            f"{'ok  ' if not errs else 'FAIL'} {example.relative_to(overlays_root.parent.parent)}", file=out
        )
    kueue = overlays_root.parent / "examples" / "kueue.example.yaml"
    if kueue.is_file():
        docs = [d for d in yaml.load_all(kueue.read_text(), Loader=Loader) if d]
        errs = [e for d in docs for e in validate_object(d, crds, k8s_version)]
        errs += [
            f"{kueue.name}: {d['kind']} is not a Kueue object" for d in docs if "kueue" not in d["apiVersion"]
        ]
        findings += errs
        print(f"{'ok  ' if not errs else 'FAIL'} {kueue.relative_to(overlays_root.parent.parent)}", file=out)
    for line in findings:
        print(f"error: {line}", file=out)
    return 1 if findings else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overlays", type=Path, default=ROOT / "manifests" / "overlays")
    parser.add_argument("--k8s-version", default=K8S_VERSION)
    args = parser.parse_args(argv)
    return run(args.overlays, args.k8s_version)


if __name__ == "__main__":
    sys.exit(main())
