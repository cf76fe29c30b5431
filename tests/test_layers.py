"""Layers point one way: every import of a loopcoder module (module-level, function-local or under
`TYPE_CHECKING`) goes to the same or a lower layer, loopcoder's modules import each other without
cycles, and imports stay at module level except where `docs/architecture.md` ("Imports") says why.

The imports are read from the source with `ast`, so nothing here imports the package."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "loopcoder"

# Lowest first: a folder of the package is a layer, and so is each top-level module. A module may import
# modules of its own layer or lower ones. The first name under `loopcoder` decides (`loopcoder.model.cache`
# is in "model"); the package itself (`import loopcoder`, which registers the model with transformers) is in
# the model's layer, and `_compat` (the old module paths, standard library only) at the bottom.
LAYERS: list[tuple[str, ...]] = [
    ("utils", "_compat"),  # errors, atomic writes, stats, progress, defaults, the runtime: nothing of models
    ("model", "loopcoder"),  # config, shape, the modeling module, its cache and protocols, kernels, checkpoints
    ("inference",),  # the engine (scheduler), sampling, constraints, detokenising, the K/V cache (kv/)
    ("data",),
    ("training",),
    ("evaluation",),
    ("diagnostics",),
    ("serving",),
    ("swe",),  # the SWE agent harness: its chat turns reuse the server's tool-call grammar and parser
    ("bench",),
    ("study",),
    ("commands", "cli", "__main__"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

# Imports that break the rules today in files other branches are rewriting: (importer, imported) -> why.
# Delete an entry once that branch is merged; the test fails on an entry that no longer applies.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}

# Module pairs that must not import each other even though the layers would allow it.
FORBIDDEN = [("loopcoder.study", "loopcoder.bench", "the study does not use benchmark classes")]

# Function-local imports that stay, by module prefix of the imported name, with the reason (see
# docs/architecture.md, "Imports"). Everything else is imported at module level.
LOCAL_IMPORTS_ALLOWED = {
    "datasets": "only for `hf:` corpora, and importing it costs about half a second",
    "httpx": "a dev dependency, only for `bench serve`; its absence is a clear error",
    "openai": "a dev dependency, only for `swe run --endpoint`; its absence is a clear error",
    "pyarrow": "only for Parquet corpora, and importing it costs 0.2 s that `loopcoder data --help` need not pay",
}
# Modules whose function-local imports stay, whatever they import (`.*`: every module of a package), with
# the reason: the command line's parsers must build without torch (`loopcoder --help` in 0.1 s, not 4 s).
LOCAL_IMPORTS_IN = {
    "loopcoder.commands.*": "a command imports what it runs inside run(): building its parser imports no torch",
    "loopcoder.cli": "runs a command's module; quiets transformers only when a command runs",
    "loopcoder": "`import loopcoder` imports no torch; it registers with transformers once transformers loads",
    "loopcoder.model.shape": "`ModelShape.plt_config` imports `PLTConfig` (transformers, torch) only when it is called",
    "loopcoder.evaluation.bfcl": "`loopcoder bfcl --help` lists its categories; the intervals (numpy) load to score",
    "loopcoder.evaluation.sandbox_launcher": "the sandbox's standalone launcher script: each of its processes "
    "imports only what it needs (site and traceback for a program, json and linecache for a checked run's "
    "init, select and socket for the fork server)",
}
# Files whose function-local imports other branches are rewriting (they list theirs in the same section).
LOCAL_IMPORTS_OWNED_ELSEWHERE: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    local: bool  # inside a function (not module level, not an `if TYPE_CHECKING:` block)

    def __str__(self) -> str:
        return f"{self.importer} (line {self.line}) imports {self.imported}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The modules an import statement loads (`from pkg import sub` loads `pkg.sub` when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports_of(name: str) -> list[Import]:
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    module_level: set[int] = set()
    for node in tree.body:  # module level, including `if TYPE_CHECKING:` and try/except import blocks
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            module_level.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out += [Import(name, target, node.lineno, id(node) not in module_level) for target in resolve(name, node)]
    return out


ALL_IMPORTS = [imp for name in MODULES for imp in imports_of(name)]
INTERNAL = [imp for imp in ALL_IMPORTS if imp.imported == "loopcoder" or imp.imported.startswith("loopcoder.")]


def layer(module: str) -> int:
    key = module.split(".")[1] if "." in module else module
    if key not in RANK:
        pytest.fail(f"{module} is in no layer: add {key!r} to LAYERS in tests/test_layers.py")
    return RANK[key]


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


def test_no_module_imports_from_a_higher_layer():
    upward = {(i.importer, i.imported): i for i in INTERNAL if layer(i.imported) > layer(i.importer)}
    forbidden = {
        (i.importer, i.imported): i
        for i in INTERNAL
        for a, b, _ in FORBIDDEN
        if i.importer.startswith(a) and i.imported.startswith(b)
    }
    bad = [
        f"{imp}: {LAYERS[layer(imp.importer)][0]} may not import {LAYERS[layer(imp.imported)][0]}"
        for key, imp in upward.items()
        if key not in KNOWN_EXCEPTIONS
    ]
    bad += [
        f"{imp}: {why}"
        for key, imp in forbidden.items()
        if key not in KNOWN_EXCEPTIONS
        for a, b, why in FORBIDDEN
        if imp.importer.startswith(a) and imp.imported.startswith(b)
    ]
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a set of modules
    that import each other in a circle."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in INTERNAL:
        if imp.imported in MODULES and imp.imported != imp.importer:
            graph[imp.importer].add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    bad = []
    for component in cycles():
        edges = [imp for imp in INTERNAL if imp.importer in component and imp.imported in component]
        # every cycle has an edge that does not go down a layer: those close it
        closing = [
            e
            for e in edges
            if layer(e.imported) >= layer(e.importer) and (e.importer, e.imported) not in KNOWN_EXCEPTIONS
        ]
        if closing:
            bad.append(f"{', '.join(component)}; closed by:\n    " + "\n    ".join(map(str, closing)))
    assert not bad, "import cycles:\n" + "\n".join(bad)


def test_known_exceptions_still_apply():
    seen = {(i.importer, i.imported) for i in INTERNAL}
    stale = [f"{a} -> {b} ({why})" for (a, b), why in KNOWN_EXCEPTIONS.items() if (a, b) not in seen]
    assert not stale, "exceptions in tests/test_layers.py that no longer apply; delete them:\n" + "\n".join(stale)


def test_function_local_imports_only_where_documented():
    def owned_elsewhere(module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in LOCAL_IMPORTS_OWNED_ELSEWHERE)

    def allowed_in(module: str) -> bool:
        return any(module.startswith(m[:-1]) if m.endswith(".*") else module == m for m in LOCAL_IMPORTS_IN)

    bad = [
        str(i)
        for i in ALL_IMPORTS
        if i.local
        and not owned_elsewhere(i.importer)
        and not allowed_in(i.importer)
        and i.imported.split(".")[0] not in LOCAL_IMPORTS_ALLOWED
    ]
    assert not bad, (
        "function-local imports (move them to the top of the module, or add the reason to "
        "LOCAL_IMPORTS_ALLOWED and docs/architecture.md):\n" + "\n".join(bad)
    )


def test_the_checker_sees_violations():
    """The rules above on a made-up module set, so that a checker that sees nothing cannot pass."""
    assert layer("loopcoder.commands.init") > layer("loopcoder.training.run") > layer("loopcoder.model")
    assert layer("loopcoder.utils.errors") < layer("loopcoder.model.checkpoint") < layer("loopcoder.inference.engine")
    assert layer("loopcoder.model.modeling") < layer("loopcoder.inference.kv.store")  # the model sees no engine
    tree = ast.parse("def f():\n    from loopcoder.cli import main\n")
    node = tree.body[0].body[0]
    assert resolve("loopcoder.training.run", node) == ["loopcoder.cli"]
    assert layer("loopcoder.cli") > layer("loopcoder.training.run")
    rel = ast.parse("from . import corpus\nfrom ..utils.errors import LoopcoderError\n").body
    assert resolve("loopcoder.data.build", rel[0]) == ["loopcoder.data.corpus"]
    assert resolve("loopcoder.data.build", rel[1]) == ["loopcoder.utils.errors"]
    local = [i for i in imports_of("loopcoder.bench.serve") if i.local]
    assert local and all(i.imported == "httpx" for i in local)
