"""Fixtures for the sweep tests: the tiny model + sample data (shared with tests/e2e), schema locations."""

from __future__ import annotations

import pytest

from tests.cluster.conftest import manifests_check


@pytest.fixture(scope="session")
def schemas():
    return manifests_check.schemas_dir()


@pytest.fixture(scope="session")
def crds(schemas):
    return manifests_check.load_crd_schemas(schemas)
