from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def sdtune_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as `make run` does."""
    return subprocess.run(
        [sys.executable, "-m", "sdtune.cli", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD 1.x model and the sample dataset, built once per session through the CLI."""
    root = tmp_path_factory.mktemp("assets")
    model, data = root / "tiny-sd15", root / "sample-data"
    for args in (("models", "tiny", "--arch", "sd15", "--out", str(model)), ("sample-data", "--out", str(data))):
        done = sdtune_cli(*args)
        assert done.returncode == 0, done.stderr
    return {"model": model, "data": data}
