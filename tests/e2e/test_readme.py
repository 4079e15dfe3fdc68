"""The README's per-stage block runs as it is, in a fresh folder holding only what a clone has, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def readme_block() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- per-stage block -->", 1)[1].split("<!-- end per-stage block -->", 1)[0]
    return block.strip().removeprefix("```bash").removesuffix("```").strip()


def test_readme_per_stage_block_runs_verbatim(tmp_path):
    block = readme_block()
    assert block.startswith("source .venv/bin/activate")
    # A fresh clone after `make venv`: the tracked configs, and .venv (this interpreter's environment).
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SDTUNE_HOME=str(tmp_path / ".sdtune"))
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        ["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "out/lora/pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "out/eval/grid.png").is_file()
    assert (tmp_path / "out/images/grid.png").is_file()
    assert (tmp_path / "dist/pipelines/personalize.yaml").is_file()
    # The class noun of the captions is the one the evaluation prompts use.
    assert "toy robot" in (tmp_path / "data/captioned/manifest.jsonl").read_text()
    assert "Traceback" not in done.stderr and "requires torchvision" not in done.stderr
