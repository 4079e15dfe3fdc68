"""The CLI's error contract: usage mistakes and bad input end in one message and an exit code."""

import subprocess
import sys

from tests.conftest import REPO_ROOT


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdtune.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True
    )


def test_unknown_option_is_a_usage_error_not_a_traceback():
    done = _cli("runs", "compare", "--no-such-option")
    assert done.returncode == 2
    assert "No such option" in done.stderr and "Traceback" not in done.stderr


def test_help_everywhere():
    for args in ((), ("run",), ("train",), ("ingest",), ("sweep",), ("plan",), ("runs", "compare")):
        done = _cli(*args, "--help")
        assert done.returncode == 0, (args, done.stderr)
        assert "Usage" in done.stdout


def test_sdtune_error_is_one_line():
    done = _cli("runs", "compare")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: name the run ids to compare, or --sweep ID"
