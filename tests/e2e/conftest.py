from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def sdtune_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as `make run` does."""
    return subprocess.run(
        [sys.executable, "-m", "sdtune.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
