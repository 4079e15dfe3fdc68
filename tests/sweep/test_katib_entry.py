"""The Katib trial entry hands over to the CLI by replacing its process (it does not import the CLI, which
sits above it)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_trial_entry_execs_the_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SDTUNE_CONFIG"}
    env.update(PYTHONPATH=str(REPO_ROOT), SDTUNE_TRIAL_train_rank="8", SDTUNE_HOME=str(tmp_path / "home"))
    argv = ["--sweep-id", "sweep-x", "--workdir", str(tmp_path / "w"), "--value", "train.rank"]
    done = subprocess.run(
        [sys.executable, "-m", "sdtune.sweep.katib", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # `sdtune sweeps trial` itself answers: no config in the environment is its one-line error, exit 2.
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: no config: pass --config FILE or set SDTUNE_CONFIG"
