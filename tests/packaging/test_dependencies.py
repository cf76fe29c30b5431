"""Dependencies: pyproject.toml declares ranges, constraints.txt the exact tested versions, and they agree."""

from __future__ import annotations

import re
from importlib import metadata

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from support.packaging import ROOT, lower_bound, pins, requirements


def test_every_dependency_is_a_range_with_a_lower_bound_not_an_exact_pin():
    for req in requirements():
        ops = {s.operator for s in req.specifier}
        assert "==" not in ops and "===" not in ops, f"{req} pins exactly: declare a range, pin in constraints.txt"
        assert lower_bound(req) is not None, f"{req} has no lower bound"


def test_constraints_cover_every_dependency_and_each_range_admits_the_pinned_version():
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"constraints.txt has no version for {req.name}: run `make lock`"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{req} does not admit the tested {req.name}=={pinned[name]}"
        )
        assert Version(lower_bound(req)) <= Version(pinned[name])


def test_the_installed_dependencies_are_inside_the_declared_ranges():
    for req in requirements():
        installed = metadata.version(req.name)
        assert req.specifier.contains(Version(installed).public, prereleases=True), f"{req.name} {installed}: not {req}"


def test_make_installs_the_constrained_torch_first_and_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    torch = re.search(r"pip install --quiet torch==(\S+)", makefile)
    assert torch and torch.group(1) == pins()["torch"]
    assert makefile.index("torch==") < makefile.index("-c constraints.txt -e")


def test_the_license_is_an_spdx_expression_with_a_build_backend_that_reads_it():
    """A `license = {text = ...}` table makes setuptools >= 77 print a deprecation warning at every install;
    an SPDX string needs setuptools >= 77 (PEP 639), so the build requirement says so."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    backend = [Requirement(r) for r in project["build-system"]["requires"]]
    setuptools = next(r for r in backend if r.name == "setuptools")
    assert Version(lower_bound(setuptools)) >= Version("77")
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
