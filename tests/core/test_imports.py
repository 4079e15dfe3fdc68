"""Dependency direction: pipelines → components → sdtune; the core never needs kfp, pipelines never torch."""

import subprocess
import sys

from tests.conftest import REPO_ROOT


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split(".")[0] for line in out.splitlines()}


def test_core_does_not_import_kfp():
    loaded = _modules_after(
        "import sdtune, sdtune.config, sdtune.manifest, sdtune.tracking, sdtune.steps, sdtune.registry, sdtune.cli"
    )
    assert "kfp" not in loaded
    assert "pipelines" not in loaded and "components" not in loaded


def test_compiling_pipelines_does_not_import_torch(tmp_path):
    loaded = _modules_after(
        "from pipelines.compile import compile_pipeline\n"
        "from sdtune.config import RunConfig\n"
        f"compile_pipeline(RunConfig(), __import__('pathlib').Path(r'{tmp_path}') / 'p.yaml')"
    )
    assert "kfp" in loaded
    assert "torch" not in loaded and "diffusers" not in loaded and "mlflow" not in loaded
