"""`sdtune submit / schedule / status` against a fake KFP API on 127.0.0.1; requests checked against swagger."""

from __future__ import annotations

import json
import re
import sys

import pytest
import typer
import yaml
from google.protobuf import json_format

from sdtune.cli import cluster as cluster_cli
from sdtune.errors import SdtuneError
from tests.cluster.conftest import ROOT
from tests.cluster.kfp_swagger import validate_request
from tests.cluster.pipeline_stub import compile_stub


@pytest.fixture
def cli(monkeypatch, tmp_path, capsys):
    """Run a cluster command the way `sdtune` does; returns (exit code, stdout, stderr)."""
    compiled: list = []

    def fake_compile(cfg, out_path):
        path = compile_stub(cfg, out_path)
        compiled.append(list(yaml.safe_load_all(path.read_text())))  # [pipeline spec, platform spec]
        return path

    monkeypatch.setattr(cluster_cli, "_compile", fake_compile)
    config = tmp_path / "run.yaml"
    config.write_text(
        "name: nightly\ntracking: {experiment: portraits}\ncluster: {service_account: sdtune-pipeline}\n"
    )

    def run(*argv: str) -> tuple[int, str, str]:
        app = typer.Typer()

        @app.callback()
        def _root() -> None:
            pass

        cluster_cli.register(app)
        capsys.readouterr()
        try:
            app(args=[str(a) for a in argv], standalone_mode=False)
            code = 0
        except SdtuneError as exc:  # what sdtune.cli.main prints as one line
            print(f"error: {exc}", file=sys.stderr)
            code = exc.exit_code
        out, err = capsys.readouterr()
        return code, out, err

    run.config = config
    run.compiled = compiled
    return run


def _normalised(doc: dict, message) -> dict:
    return json_format.MessageToDict(json_format.ParseDict(doc, message()))


def test_submit_sends_the_compiled_spec(cli, fake_kfp, schemas):
    code, out, err = cli("submit", cli.config, "--host", fake_kfp.url)
    assert code == 0, err
    for req in fake_kfp.requests:
        validate_request(req, schemas)
    run_req = next(
        r for r in fake_kfp.requests if r["method"] == "POST" and r["path"] == "/apis/v2beta1/runs"
    )
    body = run_req["body"]
    assert body["display_name"] == "nightly"
    assert body["service_account"] == "sdtune-pipeline"
    assert body["experiment_id"] == "exp-1" and fake_kfp.experiments["exp-1"]["display_name"] == "portraits"
    # the run points at a named pipeline version holding the compiled spec, not an inline copy
    assert "pipeline_spec" not in body
    ref = body["pipeline_version_reference"]
    version = fake_kfp.versions[ref["pipeline_version_id"]]
    assert version["pipeline_id"] == ref["pipeline_id"]
    assert re.fullmatch(r"nightly-[0-9a-f]{12}", version["display_name"])
    assert fake_kfp.pipelines[ref["pipeline_id"]]["display_name"] == "sdtune-stub"
    assert version["pipeline_spec"] == cli.compiled[-1][0]
    assert out.strip().splitlines() == [f"run run-1: {fake_kfp.url}/#/runs/details/run-1"]


def test_unchanged_pipeline_version_is_reused(cli, fake_kfp, schemas):
    for _ in range(2):
        assert cli("submit", cli.config, "--host", fake_kfp.url)[0] == 0
    assert cli("schedule", cli.config, "--host", fake_kfp.url)[0] == 0
    uploads = [r for r in fake_kfp.requests if "/pipelines/upload" in r["path"]]
    assert len(uploads) == 2  # the pipeline (with its first version) and the named version, once
    refs = [
        r["body"]["pipeline_version_reference"]
        for r in fake_kfp.requests
        if r["method"] == "POST" and r["path"] in ("/apis/v2beta1/runs", "/apis/v2beta1/recurringruns")
    ]
    assert len(refs) == 3 and len({json.dumps(r, sort_keys=True) for r in refs}) == 1
    for req in fake_kfp.requests:
        validate_request(req, schemas)
    cli.config.write_text(cli.config.read_text().replace("nightly", "weekly"))
    assert cli("submit", cli.config, "--host", fake_kfp.url)[0] == 0
    assert len([r for r in fake_kfp.requests if "/pipelines/upload" in r["path"]]) == 3  # a new version


def test_schedule_defaults_no_catchup_one_at_a_time(cli, fake_kfp, schemas):
    code, out, err = cli("schedule", cli.config, "--cron", "0 0 3 * * *", "--host", fake_kfp.url)
    assert code == 0, err
    for req in fake_kfp.requests:
        validate_request(req, schemas)
    body = next(r["body"] for r in fake_kfp.requests if r["path"] == "/apis/v2beta1/recurringruns")
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert body["no_catchup"] is True
    assert body["max_concurrency"] == "1"  # int64 is a string in the API's JSON
    assert body["mode"] == "ENABLE"
    assert body["service_account"] == "sdtune-pipeline"
    version = fake_kfp.versions[body["pipeline_version_reference"]["pipeline_version_id"]]
    assert version["pipeline_spec"] == cli.compiled[-1][0]
    assert "rr-1" in out


def test_schedule_list_enable_disable_delete(cli, fake_kfp, schemas):
    assert (
        cli("schedule", "create", cli.config, "--cron", "0 30 2 * * 1", "--host", fake_kfp.url, "--paused")[0]
        == 0
    )
    assert fake_kfp.recurring["rr-1"]["status"] == "DISABLED"
    code, out, _ = cli("schedule", "list", "--host", fake_kfp.url)
    assert code == 0 and "rr-1" in out and "0 30 2 * * 1" in out and "nightly-schedule" in out
    assert cli("schedule", "enable", "rr-1", "--host", fake_kfp.url)[0] == 0
    assert fake_kfp.recurring["rr-1"]["status"] == "ENABLED"
    assert cli("schedule", "disable", "rr-1", "--host", fake_kfp.url)[0] == 0
    assert fake_kfp.recurring["rr-1"]["status"] == "DISABLED"
    assert cli("schedule", "delete", "rr-1", "--host", fake_kfp.url)[0] == 0
    assert fake_kfp.recurring == {}
    for req in fake_kfp.requests:
        validate_request(req, schemas)


def test_status_shows_state_and_failed_tasks(cli, fake_kfp):
    fake_kfp.runs["r-9"] = {
        "run_id": "r-9",
        "display_name": "nightly",
        "state": "FAILED",
        "created_at": "2026-11-26T10:00:00Z",
        "error": {"message": "task train failed"},
        "run_details": {
            "task_details": [
                {"display_name": "train", "state": "FAILED"},
                {"display_name": "ingest", "state": "SUCCEEDED"},
            ]
        },
    }
    code, out, _ = cli("status", "r-9", "--host", fake_kfp.url)
    assert code == 0
    assert "nightly: FAILED" in out and "task train: FAILED" in out and "ingest" not in out
    code, _, err = cli("status", "missing", "--host", fake_kfp.url)
    assert code == 4 and "404" in err


def test_token_is_sent_as_bearer(cli, fake_kfp, tmp_path, monkeypatch):
    assert cli("status", "nope", "--host", fake_kfp.url, "--token", "t0k")[0] == 4
    assert all(r["headers"].get("authorization") == "Bearer t0k" for r in fake_kfp.requests)
    token_file = tmp_path / "sa-token"
    token_file.write_text("from-file")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    fake_kfp.requests.clear()
    cli("status", "nope", "--host", fake_kfp.url)
    # from the first request on (the healthz probe): behind oauth2-proxy a tokenless one gets a login page
    assert fake_kfp.requests[0]["path"].endswith("/healthz")
    assert all(r["headers"].get("authorization") == "Bearer from-file" for r in fake_kfp.requests)


def test_no_host_is_one_line_naming_both_ways(tmp_path):
    """Outside a pod, without --host or KF_PIPELINES_ENDPOINT: one line, exit 2, nothing from kfp."""
    import os
    import subprocess

    config = tmp_path / "run.yaml"
    config.write_text("name: nightly\n")
    env = {k: v for k, v in os.environ.items() if k not in ("KF_PIPELINES_ENDPOINT", "KUBECONFIG")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "sdtune.cli", "submit", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: no KFP API host: pass --host URL or set KF_PIPELINES_ENDPOINT"
    ]
    assert done.stdout == ""


def test_unreachable_host_is_one_clear_line(cli):
    code, out, err = cli("submit", cli.config, "--host", "http://127.0.0.1:9")
    assert code == 4
    assert (
        err.strip().startswith("error: cannot reach KFP at http://127.0.0.1:9")
        and len(err.strip().splitlines()) == 1
    )


def test_rejected_credentials_are_an_auth_error(cli, fake_kfp):
    fake_kfp.fail_with = 401
    code, _, err = cli("schedule", "list", "--host", fake_kfp.url)
    assert code == 4 and "--token" in err and len(err.strip().splitlines()) == 1


def test_bad_cron_fails_before_contacting_the_host(cli, fake_kfp):
    code, _, err = cli("schedule", cli.config, "--cron", "0 3 * * *", "--host", fake_kfp.url)
    assert code == 2 and "6 fields" in err and fake_kfp.requests == []  # bad input, not an outage


@pytest.mark.parametrize("host", ["notaurl", "ftp://kfp.example.com", "http://[bad", "https://u:pw@"])
def test_a_host_that_is_not_a_url_is_bad_input(cli, host):
    code, out, err = cli("submit", cli.config, "--host", host)  # was urllib's "ValueError: unknown url type"
    assert code == 2 and err.startswith("error: --host ") and len(err.strip().splitlines()) == 1
    assert "pw" not in err and out == ""


def test_real_pipeline_through_sdtune_main(fake_kfp, schemas, tmp_path, capsys):
    """The lead's personalize pipeline, compiled by `sdtune submit` itself, makes a valid run request."""
    pytest.importorskip("pipelines.compile")
    from sdtune.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("name: e2e\ntrain: {num_processes: 8}\n")
    assert main(["submit", str(config), "--host", fake_kfp.url]) == 0, capsys.readouterr().err
    for req in fake_kfp.requests:
        validate_request(req, schemas)
    body = next(r["body"] for r in fake_kfp.requests if r["path"] == "/apis/v2beta1/runs")
    version = fake_kfp.versions[body["pipeline_version_reference"]["pipeline_version_id"]]
    executors = version["pipeline_spec"]["deploymentSpec"]["executors"]
    gpus = [
        e["container"]["resources"].get("accelerator", {}).get("resourceCount") for e in executors.values()
    ]
    assert "8" in gpus
    assert body["service_account"] == "sdtune-pipeline"
