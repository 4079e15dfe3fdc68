"""Real servers on 127.0.0.1 for tests: an S3-compatible store (moto's standalone server) and an MLflow
tracking server whose artifacts go to that store. Each runs in its own process group, stopped by group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
ACCESS_KEY, SECRET_KEY = "testing-access", "testing-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout}s: {url}: {log.read_text()[-2000:]}")


@dataclass
class Server:
    name: str
    port: int
    argv: list[str]
    env: dict[str, str]
    ready_path: str
    log: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> Server:
        with open(self.log, "ab") as fh:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_http(self.url + self.ready_path, timeout, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def s3_server(workdir: Path, port: int | None = None) -> Server:
    port = port or free_port()
    return Server(
        "s3",
        port,
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        dict(os.environ),
        "/moto-api/",
        workdir / f"s3-{port}.log",
    )


def mlflow_server(workdir: Path, s3_url: str, bucket: str, port: int | None = None) -> Server:
    port = port or free_port()
    env = dict(
        os.environ,
        MLFLOW_S3_ENDPOINT_URL=s3_url,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION="us-east-1",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    argv = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow-server.db'}",
        "--artifacts-destination",
        f"s3://{bucket}/mlartifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return Server("mlflow", port, argv, env, "/health", workdir / f"mlflow-{port}.log")


def make_bucket(s3_url: str, bucket: str) -> None:
    from minio import Minio

    client = Minio(
        s3_url.split("://", 1)[1],
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        secure=False,
        region="us-east-1",
    )
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
