"""The dev Postgres gets MLflow's basic-auth database: the rendered Job reads the database name from the
basic_auth.ini MLflow reads, and its script, run against a real Postgres server, creates it once."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import ROOT, manifests_check

JOB = "sdtune-mlflow-auth-db"


def _example_ini() -> str:
    for doc in yaml.safe_load_all((ROOT / "manifests" / "examples" / "secrets.example.yaml").read_text()):
        if doc and doc["metadata"]["name"] == "sdtune-mlflow-auth-server":
            return doc["stringData"]["basic_auth.ini"]
    raise AssertionError("no sdtune-mlflow-auth-server example")


def _auth_volume(pod: dict) -> dict:
    (volume,) = [
        v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "sdtune-mlflow-auth-server"
    ]
    return volume["secret"]


def test_every_overlay_with_the_dev_postgres_creates_the_auth_database(rendered):
    with_postgres = 0
    for name, objs in rendered.items():
        kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
        if ("StatefulSet", "sdtune-postgres") not in kinds:
            assert ("Job", JOB) not in kinds, name
            continue
        with_postgres += 1
        job = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["name"] == JOB)
        mlflow = next(
            o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "sdtune-mlflow"
        )
        job_pod, mlflow_pod = job["spec"]["template"]["spec"], mlflow["spec"]["template"]["spec"]
        assert _auth_volume(job_pod) == _auth_volume(mlflow_pod), name  # the same ini MLflow reads
        env = {e["name"]: e for e in job_pod["containers"][0]["env"]}
        service = next(
            o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == env["PGHOST"]["value"]
        )
        assert service["spec"]["ports"][0]["port"] == int(env["PGPORT"]["value"]), name
        # Out of the mesh, like the database it talks to: a sidecar would keep the Job pod running.
        assert job["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
        postgres = next(o for o in objs if o["kind"] == "StatefulSet")
        assert postgres["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
        assert manifests_check.policy_errors(job) == []
    assert with_postgres >= 2


@pytest.fixture
def postgres():
    """A throwaway Postgres on 127.0.0.1 (run as the postgres user when the tests run as root)."""
    # Debian keeps the server binaries off PATH, in /usr/lib/postgresql/<version>/bin.
    path = os.pathsep.join([os.environ.get("PATH", ""), *sorted(glob.glob("/usr/lib/postgresql/*/bin"))])
    initdb, pg_ctl = shutil.which("initdb", path=path), shutil.which("pg_ctl", path=path)
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="sdtune-pg-"))  # not under pytest's 0700 tmp: the user must reach it
    root.chmod(0o755)
    if as_user:
        shutil.chown(root, "postgres")
    (root / "pw").write_text("pw-for-tests\n")
    from tests.servers import free_port

    port = free_port()
    run = lambda *argv: subprocess.run([*as_user, *argv], capture_output=True, text=True, timeout=60)  # noqa: E731
    done = run(
        initdb, "-D", str(root / "data"), "-U", "mlflow", f"--pwfile={root / 'pw'}", "-A", "scram-sha-256"
    )
    assert done.returncode == 0, done.stderr
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    done = run(pg_ctl, "-D", str(root / "data"), "-o", opts, "-l", str(root / "log"), "-w", "start")
    assert done.returncode == 0, done.stderr
    env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(port), PGUSER="mlflow", PGPASSWORD="pw-for-tests")
    yield env
    run(pg_ctl, "-D", str(root / "data"), "-m", "immediate", "stop")
    shutil.rmtree(root, ignore_errors=True)


def test_the_job_creates_the_auth_database_once(postgres, tmp_path):
    job = yaml.safe_load(
        (ROOT / "manifests" / "components" / "postgres-dev" / f"job.{JOB[7:]}.yaml").read_text()
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "auth-config"]
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(_example_ini())
    script = container["args"][0].replace(f"{mount['mountPath']}/basic_auth.ini", str(ini))

    def job_run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [*container["command"], script], env=postgres, capture_output=True, text=True, timeout=60
        )

    first, second = job_run(), job_run()
    assert first.returncode == 0 and "database mlflow_auth created" in first.stdout, first.stderr
    assert second.returncode == 0 and "database mlflow_auth exists" in second.stdout, (
        second.stderr
    )  # idempotent
    listed = subprocess.run(
        ["psql", "-d", "mlflow_auth", "-tAc", "SELECT current_database()"],
        env=postgres,
        capture_output=True,
        text=True,
    )
    assert listed.stdout.strip() == "mlflow_auth", listed.stderr

    ini.write_text(_example_ini().replace("/mlflow_auth", "/x;DROP DATABASE postgres"))
    refused = job_run()
    assert refused.returncode == 2 and refused.stderr.startswith("error: ")
