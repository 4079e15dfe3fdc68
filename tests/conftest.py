"""Shared test set-up: one torch thread (2 shared cores make multi-threaded steps erratic), isolated homes."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their store explicitly

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sdtune_home(tmp_path, monkeypatch) -> Path:
    """An empty SDTUNE_HOME with the embedded MLflow store in it."""
    home = tmp_path / "sdtune-home"
    monkeypatch.setenv("SDTUNE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 for the whole session."""
    from tests.servers import s3_server

    server = s3_server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_endpoint(tmp_path_factory, s3_endpoint):
    """A real `mlflow server` (sqlite backend) whose artifacts go to the S3 server."""
    from tests.servers import make_bucket, mlflow_server

    make_bucket(s3_endpoint.url, "mlflow")
    server = mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_endpoint.url, "mlflow").start(timeout=90)
    yield server
    server.stop()


def pytest_runtest_makereport(item, call):
    """In CI every dependency is installed (`make test` sets them up), so a test that skips itself there
    is a failure, not a green run: a skip would hide a missing install step."""
    import pytest as _pytest

    if call.excinfo is None or not os.environ.get("CI"):
        return None
    if call.excinfo.errisinstance(_pytest.skip.Exception) and "gpu" not in item.keywords:
        outcome = _pytest.TestReport.from_item_and_call(item, call)
        outcome.outcome = "failed"
        outcome.longrepr = f"skipped in CI, where every dependency must be present: {call.excinfo.value}"
        return outcome
    return None


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD 1.x model and the sample dataset, built once per session through the real CLI."""
    from tests.e2e.conftest import sdtune_cli

    root = tmp_path_factory.mktemp("assets")
    model, data = root / "tiny-sd15", root / "sample-data"
    for args in (
        ("models", "tiny", "--arch", "sd15", "--out", str(model)),
        ("sample-data", "--out", str(data)),
    ):
        done = sdtune_cli(*args)
        assert done.returncode == 0, done.stderr
    return {"model": model, "data": data}
