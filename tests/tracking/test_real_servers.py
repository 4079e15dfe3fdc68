"""The tracking layer against a real `mlflow server` whose artifacts go to a real S3-compatible server."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sdtune import tracking
from tests.servers import make_bucket, mlflow_server

pytestmark = pytest.mark.slow


@pytest.fixture
def server_env(mlflow_endpoint, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_endpoint.url)
    return mlflow_endpoint


def test_a_missing_run_on_the_server_is_refused_at_once(server_env):
    from sdtune.errors import UsageError

    with pytest.raises(UsageError, match="not found"):
        tracking.MLflowLogger("0" * 32, close_timeout_s=0)


def test_nested_runs_and_artifacts_land_in_s3(server_env, tmp_path):
    parent = tracking.start_parent_run("srv", "p", {"train": {"rank": 4}})
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG fake")
    with tracking.step_run(parent, "evaluate") as run:
        run.log_metrics({"clip_t": 0.25}, step=10)
        run.log_artifact(grid, "samples")
    client = MlflowClient(server_env.url, registry_uri=server_env.url)
    assert client.get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(run.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert [a.path for a in client.list_artifacts(run.run_id, "samples")] == ["samples/grid.png"]
    (tmp_path / "back").mkdir()
    local = client.download_artifacts(run.run_id, "samples/grid.png", str(tmp_path / "back"))
    assert Path(local).read_bytes() == b"\x89PNG fake"


def test_outage_mid_run_loses_nothing(tmp_path, s3_endpoint, monkeypatch):
    """Stop the tracking server mid-run, keep logging, restart it: every step and artifact arrives."""
    workdir = tmp_path / "srv"
    workdir.mkdir()
    make_bucket(s3_endpoint.url, "mlflow")  # its own bucket: run alone, no other test has made it
    server = mlflow_server(workdir, s3_endpoint.url, "mlflow").start(timeout=90)
    port = server.port
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    try:
        parent = tracking.start_parent_run("outage", "p", {})
        with tracking.step_run(parent, "train") as run:
            logger = tracking.MLflowLogger(
                run.run_id,
                flush_every=5,
                retry_base_s=0.2,
                retry_max_s=1.0,
                close_timeout_s=60,
                spool_dir=tmp_path / "spool",
            )
            for step in range(1, 21):
                logger.log({"loss": 1.0 / step}, step)
            server.stop()  # the server goes away mid-run
            artifact = tmp_path / "grid_step_40.png"
            artifact.write_bytes(b"grid at 40")
            for step in range(21, 61):
                logger.log({"loss": 1.0 / step}, step)
                if step == 40:
                    logger.log_artifact(artifact, "samples")
            assert logger.pending > 0 and logger.outages == 1
            server = mlflow_server(workdir, s3_endpoint.url, "mlflow", port=port).start(timeout=90)
            for step in range(61, 81):
                logger.log({"loss": 1.0 / step}, step)
            logger.close()
            assert logger.pending == 0
        client = MlflowClient(server.url, registry_uri=server.url)
        steps = {m.step for m in client.get_metric_history(run.run_id, "loss")}
        assert steps == set(range(1, 81))
        assert [a.path for a in client.list_artifacts(run.run_id, "samples")] == ["samples/grid_step_40.png"]
        assert not (tmp_path / "spool").exists()  # everything went to the server; nothing spooled
    finally:
        server.stop()


def test_server_down_at_close_spools_then_replays(tmp_path, s3_endpoint, monkeypatch):
    workdir = tmp_path / "srv"
    workdir.mkdir()
    make_bucket(s3_endpoint.url, "mlflow")
    server = mlflow_server(workdir, s3_endpoint.url, "mlflow").start(timeout=90)
    port = server.port
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    try:
        parent = tracking.start_parent_run("spool", "p", {})
        logger = tracking.MLflowLogger(
            parent, flush_every=1000, close_timeout_s=0.5, spool_dir=tmp_path / "spool"
        )
        for step in range(1, 11):
            logger.log({"loss": float(step)}, step)
        server.stop()
        logger.close()  # returns after close_timeout_s, without raising
        spooled = list((tmp_path / "spool").glob("*.json"))
        assert len(spooled) == 1
        server = mlflow_server(workdir, s3_endpoint.url, "mlflow", port=port).start(timeout=90)
        assert tracking.replay_spool(spooled[0]) == 10
        steps = {
            m.step
            for m in MlflowClient(server.url, registry_uri=server.url).get_metric_history(parent, "loss")
        }
        assert steps == set(range(1, 11))
        assert not spooled[0].exists()
    finally:
        server.stop()


def test_a_refused_artifact_holds_back_nothing(server_env, tmp_path, capfd):
    """An artifact the server cannot store, or whose file is gone, must not block the items queued after it
    (a whole queue stuck behind one item is what sent a run's artifacts to the spool)."""
    parent = tracking.start_parent_run("refused", "p", {})
    logger = tracking.MLflowLogger(parent, flush_every=1000, close_timeout_s=5, spool_dir=tmp_path / "spool")
    gone = tmp_path / "gone.png"
    gone.write_bytes(b"soon deleted")
    logger._artifacts.append((str(gone), "samples"))  # queued while the server was down, deleted since
    gone.unlink()
    good = tmp_path / "grid.png"
    good.write_bytes(b"grid")
    logger.log_artifact(good, "samples")
    for step in range(1, 6):
        logger.log({"loss": 1.0 / step}, step)
    logger.close()
    assert logger.pending == 0 and not (tmp_path / "spool").exists()
    client = MlflowClient(server_env.url, registry_uri=server_env.url)
    assert [a.path for a in client.list_artifacts(parent, "samples")] == ["samples/grid.png"]
    assert {m.step for m in client.get_metric_history(parent, "loss")} == set(range(1, 6))
    assert "gone.png no longer exists" in capfd.readouterr().err
