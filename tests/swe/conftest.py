"""A small task set, built once per session in the sandbox (three modules, six tasks: one-line,
two-line and two-file bugs), shared read-only by the SWE tests."""

from __future__ import annotations

import pytest

from loopcoder.swe import catalog, taskset
from loopcoder.swe.shell import SandboxShell
from support.swe import TEST_MODULES


@pytest.fixture(scope="session")
def shell():
    return SandboxShell(allow_code_execution=True)


@pytest.fixture(scope="session")
def built(tmp_path_factory, shell):
    """(task set directory, manifest, instances by id)."""
    out = tmp_path_factory.mktemp("swe") / "tasks"
    config = taskset.BuildConfig(seed=0, per_module=2, pairs_per_module=1, workers=2)
    manifest = taskset.build(out, catalog.select(TEST_MODULES), config, shell, quiet=True)
    root, instances = taskset.load(out)
    return root, manifest, {t["instance_id"]: t for t in instances}
