"""Validate recorded KFP REST requests against the v2beta1 swagger files vendored in schemas/kfp."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from tests.cluster.conftest import manifests_check

# The per-service files first; the single-file API adds healthz (no file of its own).
FILES = ("run", "recurring_run", "experiment", "pipeline", "pipeline.upload", "kfp_api_single_file")


def _int64_either(schema: Any) -> Any:
    """proto3 JSON writes int64 as a string, but the API's parser (grpc-gateway) also takes a number,
    which is what kfp_server_api sends (e.g. ``max_concurrency``); accept both, nothing else."""
    if isinstance(schema, dict):
        out = {k: _int64_either(v) for k, v in schema.items()}
        if out.get("type") == "string" and out.get("format") in ("int64", "uint64"):
            out["type"] = ["string", "integer"]
        return out
    if isinstance(schema, list):
        return [_int64_either(v) for v in schema]
    return schema


@cache
def _operations(schemas_dir: str) -> list[tuple[re.Pattern, str, dict, dict]]:
    ops = []
    for name in FILES:
        doc = json.loads((Path(schemas_dir) / "kfp" / f"{name}.swagger.json").read_text())
        for template, methods in doc["paths"].items():
            pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/:]+", re.escape(template)) + "$")
            for method, op in methods.items():
                ops.append((pattern, method.upper(), op, doc["definitions"]))
    return ops


def validate_request(req: dict[str, Any], schemas_dir: Path) -> dict[str, Any]:
    """Raise if the method/path is not in the API, a query parameter is unknown, or the body is invalid.

    Bodies are checked with unknown fields forbidden (a misspelt field would be ignored by the server).
    The fake server's 200 answers are checked the same way, so the fake cannot drift from the real API.
    Returns the matched operation.
    """
    for pattern, method, op, definitions in _operations(str(schemas_dir)):
        if method != req["method"] or not pattern.match(req["path"]):
            continue
        params = op.get("parameters", [])
        declared = {p["name"] for p in params if p["in"] == "query"}
        unknown = set(req["query"]) - declared
        assert not unknown, f"{req['method']} {req['path']}: undeclared query parameters {unknown}"
        body_params = [p for p in params if p["in"] == "body"]
        if body_params and req["body"] is not None:
            schema = manifests_check._strict({**body_params[0]["schema"], "definitions": definitions})
            schema = _int64_either(schema)
            jsonschema.Draft4Validator(schema).validate(req["body"])
        answer = op.get("responses", {}).get("200", {}).get("schema")
        if answer and req.get("status") == 200:
            schema = _int64_either(manifests_check._strict({**answer, "definitions": definitions}))
            jsonschema.Draft4Validator(schema).validate(req["response"])
        return op
    raise AssertionError(f"{req['method']} {req['path']} is not a KFP v2beta1 endpoint")
