"""A bare clone is enough: no tracked file points tests or tools at a folder beside the repository."""

import re
import subprocess

from tests.cluster.conftest import manifests_check
from tests.conftest import REPO_ROOT

# Paths that leave the repository for the shared folder beside it (relative, via ROOT.parent, or its schemas).
OUTSIDE = re.compile(r"\.\./s[h]ared|parent\s*/\s*[\"']s[h]ared|s[h]ared/schemas")


def test_schemas_are_vendored_in_the_repository(monkeypatch):
    monkeypatch.delenv("SDTUNE_SCHEMAS_DIR", raising=False)
    found = manifests_check.schemas_dir()
    assert found == REPO_ROOT / "schemas"
    for needed in (
        "kfp/run.swagger.json",
        "katib/swagger.json",
        "trainer-v2/trainer.kubeflow.org_trainjobs.yaml",
        "training-operator-v1/kubeflow.org_pytorchjobs.yaml",
        "kueue/kueue.x-k8s.io_localqueues.yaml",
        "istio/security.istio.io_crds.yaml",
    ):
        assert (found / needed).is_file(), needed
    assert "upstream" in (found / "README.md").read_text()


def test_no_tracked_file_reads_from_beside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "Makefile", ".ci/*", "*.sh", "*.toml"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    this_file = "tests/core/test_self_contained.py"
    offenders = [
        f"{path}:{n}"
        for path in tracked
        if path != this_file
        for n, line in enumerate((REPO_ROOT / path).read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert offenders == []
