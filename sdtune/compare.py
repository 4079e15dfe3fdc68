"""Comparing runs: the parent runs of an experiment as rows, with key params, metrics and the champion."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune import tracking

KEY_PARAMS = (
    "train.method",
    "train.learning_rate",
    "train.rank",
    "train.max_steps",
    "train.batch_size",
    "caption.trigger",
    "model.base",
)


@dataclass
class RunRow:
    run_id: str
    name: str
    status: str
    start_ms: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    champion: bool = False
    children: dict[str, str] = field(default_factory=dict)  # step name → run id


def list_runs(experiment: str, max_results: int = 50, sweep_id: str | None = None) -> list[RunRow]:
    client = tracking.mlflow_client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = "tags.`sdtune.role` = 'parent'"
    if sweep_id:
        query = f"tags.`sdtune.sweep_id` = '{sweep_id}'"
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=query,
        max_results=max_results,
        order_by=["attributes.start_time DESC"],
    )
    champions: dict[str, str] = {}
    rows = []
    for run in runs:
        tags = run.data.tags
        row = RunRow(
            run.info.run_id,
            run.info.run_name or "",
            run.info.status,
            run.info.start_time or 0,
            dict(run.data.params),
            dict(run.data.metrics),
            dict(tags),
        )
        name, version = tags.get("sdtune.model_name"), tags.get("sdtune.model_version")
        if name and version:
            if name not in champions:
                champions[name] = _champion_version(client, name)
            row.champion = champions[name] == version
        rows.append(row)
    return rows


def _champion_version(client: Any, name: str, alias: str = "champion") -> str:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:  # no registered model or no champion yet
        return ""


RUN_ID_LENGTH = 32


def resolve_run_ids(ids: list[str]) -> list[str]:
    """Full run ids for the given ids or unique prefixes of them (``runs list`` prints 8 characters)."""
    from sdtune.errors import UsageError

    client = tracking.mlflow_client()
    known: list[str] | None = None
    resolved = []
    for given in ids:
        if len(given) == RUN_ID_LENGTH:
            resolved.append(given)
            continue
        if known is None:
            known = _parent_run_ids(client)
        matches = [run_id for run_id in known if run_id.startswith(given.lower())]
        if not matches:
            raise UsageError(f"no run id starts with {given!r} (see `sdtune runs list`)")
        if len(matches) > 1:
            raise UsageError(
                f"run id {given!r} is ambiguous ({len(matches)} runs start with it): give more of it"
            )
        resolved.append(matches[0])
    return resolved


def _parent_run_ids(client: Any) -> list[str]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    ids, token = [], None
    while experiments:
        page = client.search_runs(
            experiments, filter_string="tags.`sdtune.role` = 'parent'", max_results=1000, page_token=token
        )
        ids += [run.info.run_id for run in page]
        token = page.token
        if not token:
            break
    return ids


def get_rows(run_ids: list[str]) -> list[RunRow]:
    client = tracking.mlflow_client()
    rows = []
    for run_id in resolve_run_ids(run_ids):
        run = client.get_run(run_id)
        row = RunRow(
            run_id,
            run.info.run_name or "",
            run.info.status,
            run.info.start_time or 0,
            dict(run.data.params),
            dict(run.data.metrics),
            dict(run.data.tags),
        )
        children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
        row.children = {c.info.run_name: c.info.run_id for c in children}
        name, version = row.tags.get("sdtune.model_name"), row.tags.get("sdtune.model_version")
        row.champion = bool(name and version and _champion_version(client, name) == version)
        rows.append(row)
    return rows


def differing_params(rows: list[RunRow]) -> list[str]:
    keys = sorted({k for r in rows for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in rows}) > 1]


def grid_png(row: RunRow, dest: Path) -> Path | None:
    """Download the newest sample grid of a run's evaluate step, if it has one."""
    run_id = row.children.get("evaluate")
    if not run_id:
        return None
    client = tracking.mlflow_client()
    steps = [a.path for a in client.list_artifacts(run_id, "samples") if a.is_dir]
    if not steps:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, f"{sorted(steps)[-1]}/grid.png", str(dest)))


def compare_html(rows: list[RunRow], out: Path, workdir: Path) -> Path:
    """A self-contained page: one column per run (grid inlined), the params that differ, every metric."""
    params = differing_params(rows) or list(KEY_PARAMS)
    metrics = sorted({k for r in rows for k in r.metrics})
    head = "".join(
        f"<th>{html.escape(r.name)}<br><code>{r.run_id[:8]}</code>{' ★ champion' if r.champion else ''}</th>"
        for r in rows
    )
    cells = []
    for row in rows:
        png = grid_png(row, workdir / row.run_id)
        if png:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            cells.append(f"<td><img alt='grid {row.run_id[:8]}' src='data:image/png;base64,{data}'></td>")
        else:
            cells.append("<td>(no grid)</td>")
    body = [f"<tr><th>samples</th>{''.join(cells)}</tr>"]
    for key in params:
        body.append(
            f"<tr><th>{html.escape(key)}</th>"
            + "".join(f"<td>{html.escape(r.params.get(key, ''))}</td>" for r in rows)
            + "</tr>"
        )
    for key in metrics:
        body.append(
            f"<tr><th>{html.escape(key)}</th>"
            + "".join(f"<td>{r.metrics[key]:.5g}</td>" if key in r.metrics else "<td></td>" for r in rows)
            + "</tr>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>sdtune run comparison</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        "img{max-width:480px}table{border-collapse:collapse}</style></head><body>"
        f"<h1>Run comparison</h1><table><tr><th></th>{head}</tr>{''.join(body)}</table></body></html>"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
