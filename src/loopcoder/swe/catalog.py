"""The real code with real tests the task set is made from: pure-Python standard-library modules and
their tests from the interpreter's own `test` package.

Each entry is one task repository: the module's files at their standard-library paths, its test
files under `tests/`. Bugs go into the `mutable` files only (a package's data tables stay as they
are). The modules were chosen because their tests run in seconds, import nothing from `test` but
`test.support`, and test the module's pure-Python code (the C accelerators of bisect, heapq and
operator are blocked by their own tests' `import_fresh_module`).
"""

from __future__ import annotations

import importlib.util
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from loopcoder.utils.errors import LoopcoderError


@dataclass(frozen=True)
class SourceModule:
    name: str
    files: tuple[str, ...]  # standard-library paths, copied to the same repository paths
    tests: tuple[str, ...]  # files of the `test` package, copied to tests/
    mutable: tuple[str, ...] = ()  # where bugs go (default: every file)

    @property
    def bug_files(self) -> tuple[str, ...]:
        return self.mutable or self.files


MODULES: tuple[SourceModule, ...] = (
    SourceModule("bisect", ("bisect.py",), ("test_bisect.py",)),
    SourceModule("heapq", ("heapq.py",), ("test_heapq.py",)),
    SourceModule("textwrap", ("textwrap.py",), ("test_textwrap.py",)),
    SourceModule("colorsys", ("colorsys.py",), ("test_colorsys.py",)),
    SourceModule("fractions", ("fractions.py",), ("test_fractions.py",)),
    SourceModule("shlex", ("shlex.py",), ("test_shlex.py",)),
    SourceModule("fnmatch", ("fnmatch.py",), ("test_fnmatch.py",)),
    SourceModule("string", ("string.py",), ("test_string.py",)),
    SourceModule("calendar", ("calendar.py",), ("test_calendar.py",)),
    SourceModule("base64", ("base64.py",), ("test_base64.py",)),
    SourceModule("getopt", ("getopt.py",), ("test_getopt.py",)),
    SourceModule("ipaddress", ("ipaddress.py",), ("test_ipaddress.py",)),
    SourceModule("graphlib", ("graphlib.py",), ("test_graphlib.py",)),
    SourceModule("quopri", ("quopri.py",), ("test_quopri.py",)),
    SourceModule("copy", ("copy.py",), ("test_copy.py",)),
    SourceModule("statistics", ("statistics.py",), ("test_statistics.py",)),
    SourceModule("difflib", ("difflib.py",), ("test_difflib.py",)),
    SourceModule("operator", ("operator.py",), ("test_operator.py",)),
    SourceModule(
        "html",
        ("html/__init__.py", "html/entities.py", "html/parser.py"),
        ("test_html.py", "test_htmlparser.py"),
        mutable=("html/__init__.py", "html/parser.py"),
    ),
    SourceModule(
        "urllib.parse", ("urllib/__init__.py", "urllib/parse.py"), ("test_urlparse.py",), mutable=("urllib/parse.py",)
    ),
)
BY_NAME = {m.name: m for m in MODULES}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def test_package_dir() -> Path:
    """The running interpreter's `test` package (its regression tests), or a clear error."""
    spec = importlib.util.find_spec("test")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / "test_bisect.py").is_file():
            return Path(location)
    raise LoopcoderError(
        "this Python has no regression tests (the standard library's `test` package, or only its "
        "`support` part): the SWE task set is built from them. Use a Python that ships them (python.org "
        "and pyenv builds do; on Debian and Ubuntu, install libpython3.X-testsuite)"
    )


def select(names: str | None) -> list[SourceModule]:
    """The modules named in a comma list (all of them for None)."""
    if not names:
        return list(MODULES)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise LoopcoderError(f"unknown module {unknown[0]!r}: choose from {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in dict.fromkeys(wanted)]
