"""Fixtures for the cluster tests: schema locations, a fake KFP v2beta1 API on 127.0.0.1, a stand-in pipeline."""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("manifests_check", ROOT / "tools" / "manifests_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


manifests_check = _load_tool()


@pytest.fixture(scope="session")
def schemas() -> Path:
    return manifests_check.schemas_dir()


@pytest.fixture(scope="session")
def crds(schemas: Path) -> dict:
    return manifests_check.load_crd_schemas(schemas)


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every overlay in manifests/overlays/, rendered by ``kubectl kustomize``: overlay name → objects."""
    import shutil

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) not installed")
    overlays = sorted(p.parent for p in (ROOT / "manifests" / "overlays").glob("*/kustomization.yaml"))
    return {o.name: manifests_check.render_overlay(o) for o in overlays}


class FakeKfp:
    """Answers the v2beta1 endpoints kfp.Client 2.17 calls for submit/schedule/status; records requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}  # version id → version (with pipeline_id and the spec)
        self.fail_with: int | None = None  # answer every request with this HTTP status

    def handle(self, method: str, path: str, query: dict, body: Any) -> tuple[int, Any]:
        if self.fail_with:
            return self.fail_with, {"error": "nope", "code": 16, "message": "unauthenticated"}
        api = "/apis/v2beta1"
        if method == "GET" and path == f"{api}/healthz":
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if path == f"{api}/experiments":
            if method == "POST":
                exp = {
                    **body,
                    "experiment_id": f"exp-{len(self.experiments) + 1}",
                    "storage_state": "AVAILABLE",
                }
                self.experiments[exp["experiment_id"]] = exp
                return 200, exp
            wanted = _filter_value(query)
            found = [e for e in self.experiments.values() if wanted is None or e["display_name"] == wanted]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if method == "POST" and path in (f"{api}/pipelines/upload", f"{api}/pipelines/upload_version"):
            name = (query.get("name") or [""])[0]
            if path.endswith("/upload"):
                pipeline_id = f"p-{len(self.pipelines) + 1}"
                self.pipelines[pipeline_id] = {
                    "pipeline_id": pipeline_id,
                    "display_name": name,
                    "created_at": "2026-11-26T10:00:00Z",
                }
            else:
                pipeline_id = query["pipelineid"][0]
            version = {
                "pipeline_id": pipeline_id,
                "pipeline_version_id": f"v-{len(self.versions) + 1}",
                "display_name": name,
                "created_at": "2026-11-26T10:00:00Z",
                "pipeline_spec": body,
            }
            self.versions[version["pipeline_version_id"]] = version
            if path.endswith("/upload"):
                return 200, self.pipelines[pipeline_id]
            return 200, version
        if method == "GET" and path == f"{api}/pipelines":
            wanted = _filter_value(query)
            found = [p for p in self.pipelines.values() if wanted is None or p["display_name"] == wanted]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if method == "GET" and (m := re.fullmatch(rf"{api}/pipelines/([^/:]+)/versions", path)):
            wanted = _filter_value(query)
            found = [
                v
                for v in self.versions.values()
                if v["pipeline_id"] == m[1] and (wanted is None or v["display_name"] == wanted)
            ]
            return 200, {"pipeline_versions": found, "total_size": len(found)} if found else {}
        if method == "POST" and path == f"{api}/runs":
            run = {
                **body,
                "run_id": f"run-{len(self.runs) + 1}",
                "state": "PENDING",
                "created_at": "2026-11-26T10:00:00Z",
            }
            self.runs[run["run_id"]] = run
            return 200, run
        if method == "GET" and (m := re.fullmatch(rf"{api}/runs/([^/:]+)", path)):
            run = self.runs.get(m[1])
            return (200, run) if run else (404, {"message": f"run {m[1]} not found", "code": 5})
        if path == f"{api}/recurringruns":
            if method == "POST":
                job = {
                    **body,
                    "recurring_run_id": f"rr-{len(self.recurring) + 1}",
                    "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED",
                }
                self.recurring[job["recurring_run_id"]] = job
                return 200, job
            jobs = list(self.recurring.values())
            return 200, {"recurringRuns": jobs, "total_size": len(jobs)}  # camelCase, as in the swagger
        if m := re.fullmatch(rf"{api}/recurringruns/([^/:]+)(?::(enable|disable))?", path):
            job = self.recurring.get(m[1])
            if job is None:
                return 404, {"message": "not found", "code": 5}
            if method == "DELETE":
                del self.recurring[m[1]]
            elif m[2]:
                job["status"] = "ENABLED" if m[2] == "enable" else "DISABLED"
            return 200, {}
        return 404, {"message": f"fake KFP has no {method} {path}", "code": 12}


def _filter_value(query: dict) -> str | None:
    raw = (query.get("filter") or [None])[0]
    if not raw:
        return None
    preds = json.loads(raw).get("predicates") or []
    return preds[0].get("string_value") or preds[0].get("stringValue") if preds else None


def _uploaded_yaml(raw: bytes, content_type: str) -> dict:
    """The pipeline YAML of a multipart upload (the ``uploadfile`` form field)."""
    import email.parser
    import email.policy

    import yaml

    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return next(yaml.safe_load_all(part.get_payload(decode=True)))
    raise AssertionError("upload without an uploadfile field")


@pytest.fixture
def fake_kfp():
    state = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            content_type = self.headers.get("Content-Type") or ""
            if content_type.startswith("multipart/form-data"):
                body = _uploaded_yaml(raw, content_type)
            else:
                body = json.loads(raw) if raw else None
            query = parse_qs(url.query)
            state.requests.append(
                {
                    "method": self.command,
                    "path": url.path,
                    "query": query,
                    "body": body,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            )
            status, payload = state.handle(self.command, url.path, query, body)
            state.requests[-1].update(status=status, response=payload)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PATCH = _serve

        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    # kfp.Client reads ~/.config/kfp/context.json; never let a developer's context leak into tests.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in (
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_SA_TOKEN_PATH",
        "SDTUNE_KFP_TOKEN",
        "SDTUNE_KFP_COOKIE",
    ):
        monkeypatch.delenv(var, raising=False)
