"""Fixtures for the data tests: tiny images built in the test (no assets, no downloads)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_helpers import encode, pattern

from sdtune.config import IngestConfig


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Six distinct PNG/JPEG images, one with a sidecar caption."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        (folder / f"img{i}.{ext}").write_bytes(
            encode(pattern(seed=i), fmt, **({"quality": 95} if i % 2 else {}))
        )
    (folder / "img0.txt").write_text("a photo of sks dog in the snow\n")
    return folder


@pytest.fixture
def cfg() -> IngestConfig:
    return IngestConfig(min_images=1, min_side=16)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1, stopped after the session."""
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so stopping it stops its children too
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto_server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
