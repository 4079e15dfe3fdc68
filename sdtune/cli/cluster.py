"""Cluster commands over the Kubeflow Pipelines API: submit, schedule (create/list/enable/disable/delete), status.

kfp and ``pipelines`` are imported inside the commands only. Auth follows kfp.Client: ``--token``
(existing_token), ``--cookie`` (Kubeflow >= 1.9 logs in through oauth2-proxy: its ``oauth2_proxy_kubeflow``
cookie; older Dex installs: ``authservice_session``), or a service-account token file
(``KF_PIPELINES_SA_TOKEN_PATH``, sent from the first request on and refreshed on every call). The host is
``--host`` or ``KF_PIPELINES_ENDPOINT``; only inside a pod may both be missing (in-cluster discovery).

``submit`` and ``schedule`` upload the compiled pipeline as a named pipeline version
(``<config name>-<digest of the compiled spec>``) and point the run or recurring run at it: the KFP UI
shows which pipeline a run used, and an unchanged pipeline is reused instead of uploaded again.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from sdtune.cli.printing import plain_console
from sdtune.cluster.errors import ClusterAuthError, ClusterError, ClusterUnreachableError, NoClusterHost
from sdtune.config import RunConfig, load_config, strip_url_credentials
from sdtune.errors import UsageError

console = plain_console()

HostOpt = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar="KF_PIPELINES_ENDPOINT",
        help="KFP API URL, e.g. https://kubeflow.example.com/pipeline.",
    ),
]
NamespaceOpt = Annotated[
    str | None, typer.Option("--namespace", help="Kubeflow profile namespace (multi-user installs).")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="SDTUNE_KFP_TOKEN", help="Bearer token (kfp.Client existing_token)."),
]
CookieOpt = Annotated[
    str | None,
    typer.Option(
        "--cookie",
        envvar="SDTUNE_KFP_COOKIE",
        help="Cookie header from a logged-in browser: 'oauth2_proxy_kubeflow=…' (Kubeflow >= 1.9, "
        "oauth2-proxy) or 'authservice_session=…' (older Dex/authservice installs).",
    ),
]
CaCertOpt = Annotated[
    Path | None, typer.Option("--ssl-ca-cert", help="CA bundle for a private TLS endpoint.")
]
ExperimentOpt = Annotated[
    str | None, typer.Option("--experiment", help="KFP experiment (default: tracking.experiment).")
]
OverridesArg = Annotated[list[str] | None, typer.Argument(help="key=value config overrides.")]


def _compile(cfg: RunConfig, out_path: Path) -> Path:
    """Compile the pipeline for ``cfg`` (tests replace this with a stand-in pipeline)."""
    try:
        from pipelines.compile import compile_pipeline
    except ImportError as exc:
        raise ClusterError(f"cannot compile the pipeline: {exc}") from None
    return compile_pipeline(cfg, out_path)


def _probe(host: str, token: str | None, cookie: str | None, ca_cert: Path | None) -> None:
    """One quick healthz request, so a wrong host or missing login is one clear line, not kfp's 5 retries."""
    import ssl

    req = urllib.request.Request(
        host.rstrip("/") + "/apis/v2beta1/healthz", headers={"Accept": "application/json"}
    )
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if cookie:
        req.add_header("Cookie", cookie)
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    try:
        with urllib.request.urlopen(req, timeout=15, context=context) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ClusterAuthError(
                f"{host}: HTTP {exc.code}; pass --token or --cookie, or set KF_PIPELINES_SA_TOKEN_PATH"
            ) from None
        raise ClusterError(f"{host}: healthz answered HTTP {exc.code} (is this the KFP API URL?)") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClusterUnreachableError(f"cannot reach KFP at {host}: {reason}") from None
    try:
        json.loads(body)
    except ValueError:  # e.g. an auth proxy's HTML login page after redirects
        raise ClusterAuthError(
            f"{host} answered with a non-JSON page (a login page?); pass --cookie or --token"
        ) from None


def _check_host_url(host: str) -> None:
    """A host that is not an http(s) URL is a typo, not an outage: exit 2 before urllib's ValueError."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(host)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 0) >= 0
    except ValueError:  # "http://[bad" or a port out of range
        ok = False
    if not ok:
        raise UsageError(
            f"--host {strip_url_credentials(host)!r}: expected the KFP API URL, "
            "e.g. https://kubeflow.example.com/pipeline (--host or KF_PIPELINES_ENDPOINT)"
        )


SA_TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def kfp_client(
    host: str | None, namespace: str | None, token: str | None, cookie: str | None, ca_cert: Path | None
):
    if not host and not SA_TOKEN_FILE.is_file():
        # Outside a pod kfp.Client would try a kube config, warn and retry for minutes.
        raise NoClusterHost("no KFP API host: pass --host URL or set KF_PIPELINES_ENDPOINT")
    import kfp

    token_path = os.environ.get("KF_PIPELINES_SA_TOKEN_PATH")
    if host:
        _check_host_url(host)
        _probe(host, token or _read_token(token_path), cookie, ca_cert)
    kwargs: dict[str, Any] = {
        "host": host,
        "existing_token": token,
        "cookies": cookie,
        "ssl_ca_cert": str(ca_cert) if ca_cert else None,
    }
    if namespace:
        kwargs["namespace"] = namespace
    if token_path and not token:
        # kfp.Client uses this file only when it discovers the host itself; pass it for --host too.
        from kfp.client import ServiceAccountTokenVolumeCredentials

        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=token_path)
    with api_errors(host or "the KFP API"):
        return kfp.Client(**kwargs)


@dataclass(frozen=True)
class KfpConnection:
    """The connection options every cluster command takes (see ``kfp_command``)."""

    host: str | None
    namespace: str | None
    token: str | None
    cookie: str | None
    ca_cert: Path | None

    def client(self):
        return kfp_client(self.host, self.namespace, self.token, self.cookie, self.ca_cert)

    def errors(self) -> AbstractContextManager[None]:
        return api_errors(self.host or "the KFP API")


def _option(name: str, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


# --host stands where the command declares ``conn`` and the login options come last: the order every
# command's --help had when each declared the five options itself.
_HOST = _option("host", HostOpt)
_LOGIN = [
    _option("namespace", NamespaceOpt),
    _option("token", TokenOpt),
    _option("cookie", CookieOpt),
    _option("ssl_ca_cert", CaCertOpt),
]


def kfp_command(func):
    """Give a command the KFP connection options, declared once, as one ``conn: KfpConnection`` argument
    (keyword-only where defaulted parameters come before it: ``conn`` itself has no default)."""
    own = inspect.signature(func, eval_str=True).parameters.values()
    params = [_HOST if p.name == "conn" else p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

    @functools.wraps(func)
    def command(*, host, namespace, token, cookie, ssl_ca_cert, **kwargs):
        return func(**kwargs, conn=KfpConnection(host, namespace, token, cookie, ssl_ca_cert))

    command.__signature__ = inspect.Signature([*params, *_LOGIN], return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    return command


@contextmanager
def _quiet() -> Iterator[None]:
    """kfp.Client prints a details link per call; the command prints its own one line."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _read_token(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as exc:
        raise ClusterAuthError(f"KF_PIPELINES_SA_TOKEN_PATH={path}: {exc.strerror}") from None


@contextmanager
def api_errors(host: str) -> Iterator[None]:
    """Turn transport and API errors from kfp into one-line sdtune errors."""
    import urllib3

    try:
        yield
    except urllib3.exceptions.HTTPError as exc:
        raise ClusterUnreachableError(f"cannot reach KFP at {host}: {exc.__class__.__name__}") from None
    except Exception as exc:
        status = getattr(exc, "status", None)
        if status in (401, 403):
            raise ClusterAuthError(
                f"{host}: HTTP {status}; check --token/--cookie/KF_PIPELINES_SA_TOKEN_PATH"
            ) from None
        if status is not None:
            raise ClusterError(f"KFP API HTTP {status}: {_api_message(exc)}") from None
        raise


def _api_message(exc: Exception) -> str:
    body = getattr(exc, "body", None) or ""
    try:
        return json.loads(body).get("message") or str(getattr(exc, "reason", ""))
    except (ValueError, AttributeError):
        return str(getattr(exc, "reason", "")) or str(body)[:200]


def run_url(client: Any, run_id: str) -> str:
    return f"{client._get_url_prefix()}/#/runs/details/{run_id}"


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "string_value": name}]})


def pipeline_version(client: Any, package: str, cfg: RunConfig, namespace: str | None) -> tuple[str, str]:
    """(pipeline id, version id) of the version holding ``package``; uploaded only when not there yet."""
    import yaml

    text = Path(package).read_text()
    pipeline_name = next(yaml.safe_load_all(text))["pipelineInfo"]["name"]
    version_name = f"{cfg.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    found = client.list_pipelines(filter=_name_filter(pipeline_name), namespace=namespace).pipelines or []
    if found:
        pipeline_id = found[0].pipeline_id
        versions = client.list_pipeline_versions(pipeline_id, filter=_name_filter(version_name))
        if versions.pipeline_versions:
            return pipeline_id, versions.pipeline_versions[0].pipeline_version_id
    else:
        pipeline_id = client.upload_pipeline(
            package, pipeline_name=pipeline_name, namespace=namespace
        ).pipeline_id
    version = client.upload_pipeline_version(package, version_name, pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def _run_target(client: Any, cfg: RunConfig, experiment: str | None, namespace: str | None) -> dict[str, str]:
    """Where a run or a recurring run of ``cfg`` goes: its experiment, the pipeline version holding the
    compiled spec (uploaded when new) and the service account (keyword arguments of kfp.Client)."""
    with tempfile.TemporaryDirectory() as tmp:
        package = str(_compile(cfg, Path(tmp) / "pipeline.yaml"))
        pipeline_id, version_id = pipeline_version(client, package, cfg, namespace)
    exp = client.create_experiment(experiment or cfg.tracking.experiment, namespace=namespace)
    return {
        "experiment_id": exp.experiment_id,
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "service_account": cfg.cluster.service_account,
    }


@kfp_command
def submit_cmd(
    *,
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    overrides: OverridesArg = None,
    conn: KfpConnection,
    experiment: ExperimentOpt = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="Default: the config's name.")] = None,
) -> None:
    """Compile the pipeline for CONFIG and start one run on the cluster; prints the run URL."""
    cfg = load_config(config, overrides or [])
    client = conn.client()
    with conn.errors(), _quiet():
        result = client.run_pipeline(
            job_name=run_name or cfg.name, **_run_target(client, cfg, experiment, conn.namespace)
        )
    console.print(f"run {result.run_id}: {run_url(client, result.run_id)}", highlight=False, soft_wrap=True)


@kfp_command
def schedule_create_cmd(
    *,
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    overrides: OverridesArg = None,
    cron: Annotated[
        str, typer.Option("--cron", help="6-field cron (seconds first), e.g. '0 0 3 * * *'.")
    ] = "0 0 3 * * *",
    conn: KfpConnection,
    experiment: ExperimentOpt = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Schedule name (default: <config name>-schedule).")
    ] = None,
    max_concurrency: Annotated[int, typer.Option("--max-concurrency", min=1)] = 1,
    catchup: Annotated[
        bool, typer.Option("--catchup/--no-catchup", help="Backfill missed intervals when re-enabled.")
    ] = False,
    paused: Annotated[bool, typer.Option("--paused", help="Create it disabled.")] = False,
) -> None:
    """Create a recurring run of CONFIG (no catch-up and one run at a time unless told otherwise)."""
    if len(cron.split()) != 6:
        raise UsageError(f"--cron {cron!r}: KFP wants 6 fields (seconds first), e.g. '0 0 3 * * *'")
    cfg = load_config(config, overrides or [])
    client = conn.client()
    with conn.errors(), _quiet():
        job = client.create_recurring_run(
            job_name=name or f"{cfg.name}-schedule",
            cron_expression=cron,
            max_concurrency=str(max_concurrency),  # int64: a string in the API's JSON (swagger)
            no_catchup=not catchup,
            enabled=not paused,
            **_run_target(client, cfg, experiment, conn.namespace),
        )
    state = "paused" if paused else "enabled"
    console.print(f"recurring run {job.recurring_run_id} ({state}, cron '{cron}')", highlight=False)


@kfp_command
def schedule_list_cmd(
    conn: KfpConnection,
    experiment: ExperimentOpt = None,
) -> None:
    """List recurring runs (id, status, cron, name)."""
    client = conn.client()
    with conn.errors():
        exp_id = (
            client.get_experiment(experiment_name=experiment, namespace=conn.namespace).experiment_id
            if experiment
            else None
        )
        resp = client.list_recurring_runs(experiment_id=exp_id, namespace=conn.namespace, page_size=100)
    for job in resp.recurring_runs or []:
        cron = (job.trigger.cron_schedule.cron if job.trigger and job.trigger.cron_schedule else "") or ""
        console.print(
            f"{job.recurring_run_id}  {job.status or '?':<8}  {cron:<16}  {job.display_name}", highlight=False
        )


def _schedule_action(action: str):
    @kfp_command
    def command(
        recurring_run_id: Annotated[
            str, typer.Argument(help="Recurring run id (see `sdtune schedule list`).")
        ],
        conn: KfpConnection,
    ) -> None:
        client = conn.client()
        with conn.errors():
            getattr(client, f"{action}_recurring_run")(recurring_run_id)
        console.print(f"recurring run {recurring_run_id}: {action}d", highlight=False)

    command.__doc__ = f"{action.capitalize()} a recurring run."
    return command


@kfp_command
def status_cmd(
    run_id: Annotated[str, typer.Argument(help="KFP run id (printed by `sdtune submit`).")],
    conn: KfpConnection,
) -> None:
    """Show a run's state, times and failed tasks."""
    client = conn.client()
    with conn.errors():
        run = client.get_run(run_id)
    console.print(f"{run.display_name}: {run.state}", highlight=False)
    console.print(f"  created {run.created_at}  finished {run.finished_at or '-'}", highlight=False)
    if run.error and run.error.message:
        console.print(f"  error: {run.error.message}", highlight=False)
    details = run.run_details.task_details if run.run_details else None
    for task in details or []:
        if task.state in ("FAILED", "CANCELED"):
            console.print(f"  task {task.display_name}: {task.state}", highlight=False)
    console.print(f"  {run_url(client, run_id)}", highlight=False, soft_wrap=True)


class _DefaultCreateGroup(TyperGroup):
    """`sdtune schedule CONFIG …` means `sdtune schedule create CONFIG …`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["create", *args]
        return super().parse_args(ctx, args)


def register(app: typer.Typer) -> None:
    app.command("submit")(submit_cmd)
    app.command("status")(status_cmd)
    schedule = typer.Typer(
        cls=_DefaultCreateGroup,
        no_args_is_help=True,
        help="Recurring runs: `schedule CONFIG --cron …` creates one; list/enable/disable/delete.",
    )
    schedule.command("create")(schedule_create_cmd)
    schedule.command("list")(schedule_list_cmd)
    for action in ("enable", "disable", "delete"):
        schedule.command(action)(_schedule_action(action))
    app.add_typer(schedule, name="schedule")
