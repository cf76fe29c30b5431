"""pyproject.toml's dependency ranges and constraints.txt's exact versions, read for the packaging tests and
for tests/packaging/lower_bounds.py."""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def requirements(extras: bool = True) -> list[Requirement]:
    """Every dependency pyproject.toml declares: the required ones, then each extra's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    if extras:
        for group in project.get("optional-dependencies", {}).values():
            lines += group
    return [Requirement(line) for line in lines]


def pins(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """name -> exact version of a constraints file (`name==version` lines; comments and blanks skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        if spec.operator != "==":
            raise ValueError(f"{path.name}: {line!r} is not an exact pin")
        out[canonicalize_name(req.name)] = spec.version
    return out


def lower_bound(req: Requirement) -> str | None:
    """The version a `>=X` requirement starts at (None without one)."""
    return next((s.version for s in req.specifier if s.operator == ">="), None)
