"""BFCL (the Berkeley Function Calling Leaderboard, bfcl-eval 2026.3.23): its AST categories against an
OpenAI-compatible server, scored by BFCL's own checker on its own data and possible answers.

bfcl-eval pins numpy 1.26.4 and pulls sentence-transformers, faiss and a torch of its own, so it is never installed
into this environment. On first use, `ensure_bfcl` puts the bfcl-eval wheel and the four small packages that its
checker and tool conversion import (tenacity, tree_sitter and its Java and JavaScript grammars) into a private
directory with `pip install --no-deps --target` (18 MB, a few seconds; the data and possible answers ship in the
wheel, so nothing else is downloaded). `load_bfcl` imports from there, appended to `sys.path` so that nothing in it
shadows a package of this environment. One module is replaced: `bfcl_eval.constants.model_config` imports every
vendor SDK's handler (anthropic, cohere, google-genai, qwen-agent, ...) and the checker uses it for one thing, whether
the model entry replaced dots in function names by underscores. The stand-in answers that for `MODEL_ENTRY`.

The requests are those of BFCL's function-calling mode for OpenAI's models (`MODEL_ENTRY`, bfcl-eval's
`OpenAIResponsesHandler`): `POST /v1/responses` with the first turn's messages (system as developer), the functions
converted by BFCL's `convert_to_tool`, `store: false`, `temperature: 0.001` and no `tool_choice`. The function calls
of the response are decoded as that handler decodes them and checked as bfcl's `eval_runner` checks them:
`ast_checker` against the possible answers, and for (ir)relevance whether any call was made.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import types
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopcoder.utils.atomic import atomic_directory
from loopcoder.utils.errors import LoopcoderError
from loopcoder.utils.progress import Progress

BFCL_VERSION = "2026.3.23"
# what `load_bfcl` imports, installed without their dependencies (the checker's and convert_to_tool's own imports)
PACKAGES = (
    f"bfcl-eval=={BFCL_VERSION}",
    "tenacity==9.1.4",
    "tree_sitter==0.21.3",
    "tree-sitter-java==0.21.0",
    "tree-sitter-javascript==0.21.4",
)
MODEL_ENTRY = "gpt-4o-2024-11-20-FC"  # the bfcl model entry whose requests these are (underscore_to_dot: true)
TEMPERATURE = 0.001  # what bfcl sends
NON_LIVE = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
LIVE = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "live_irrelevance", "live_relevance")
CATEGORIES = NON_LIVE + LIVE
GROUPS = {"all": CATEGORIES, "non_live": NON_LIVE, "live": LIVE, "simple": ("simple_python",)}


def default_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "loopcoder" / f"bfcl-eval-{BFCL_VERSION}"


def parse_categories(text: str) -> list[str]:
    """`all`, `non_live`, `live`, `simple` (simple_python) or category names, comma-separated, in BFCL's order."""
    chosen: set[str] = set()
    for name in (t.strip() for t in text.split(",")):
        if name in GROUPS:
            chosen.update(GROUPS[name])
        elif name in CATEGORIES:
            chosen.add(name)
        else:
            raise LoopcoderError(
                f"unknown BFCL category {name!r}: choose from {', '.join([*GROUPS, *CATEGORIES])} "
                "(the AST categories; multi-turn, web search, memory and Java/JavaScript are not run here)"
            )
    return [c for c in CATEGORIES if c in chosen]


# ---------------------------------------------------------------------------------------------- reaching bfcl-eval
def ensure_bfcl(root: Path, *, install: bool = True, announce: Callable[[str], None] = print) -> Path:
    """`root`, holding bfcl-eval and the packages of `PACKAGES`; with `install`, installed there (atomically) if it
    is not yet (only ever into loopcoder's own cache directory: a directory the user names is never replaced)."""
    marker = root / "bfcl_eval" / "eval_checker" / "ast_eval" / "ast_checker.py"
    if marker.is_file():
        return root
    if not install:
        raise LoopcoderError(
            f"--bfcl-dir {root}: no bfcl-eval there (pip install --no-deps --target {root} {' '.join(PACKAGES)})"
        )
    announce(f"installing bfcl-eval {BFCL_VERSION} (without its dependencies) into {root} (once)")
    try:
        with atomic_directory(root) as tmp:
            cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp), *PACKAGES]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                why = (done.stderr or done.stdout).strip().splitlines()
                raise LoopcoderError(
                    f"could not install bfcl-eval into {root}: {why[-1] if why else 'pip failed'} "
                    f"(or install it yourself: pip install --no-deps --target DIR {' '.join(PACKAGES)}, "
                    "then pass --bfcl-dir DIR)"
                )
    except OSError as e:
        raise LoopcoderError(f"could not install bfcl-eval into {root}: {e}") from None
    return root


@dataclass(frozen=True)
class BFCL:
    """The parts of bfcl-eval that this module calls."""

    load_dataset_entry: Callable[..., list[dict]]
    load_ground_truth_entry: Callable[[str], list[dict]]
    convert_to_tool: Callable[..., list[dict]]
    ast_checker: Callable[..., dict]
    is_function_calling_format_output: Callable[[Any], bool]
    is_empty_output: Callable[[Any], bool]
    openapi_types: dict
    responses_style: Any
    python: Any


_loaded: dict[str, BFCL] = {}


def load_bfcl(root: Path) -> BFCL:
    """bfcl-eval's checker, data loaders and tool conversion, imported from `root` (see the module's docstring)."""
    key = str(Path(root).resolve())
    if key in _loaded:
        return _loaded[key]
    work = Path(root) / "work"  # bfcl creates result/, score/ and lock files under its project root
    os.environ.setdefault("BFCL_PROJECT_ROOT", str(work))
    if key not in sys.path:
        sys.path.append(key)  # last: bfcl's directory shadows nothing of this environment
    try:  # modules found at run time, in `root`: imported by name
        importlib.import_module("bfcl_eval.constants")  # the package of the stand-in below
        stand_in = types.ModuleType("bfcl_eval.constants.model_config")
        stand_in.MODEL_CONFIG_MAPPING = {MODEL_ENTRY.replace("_", "/"): types.SimpleNamespace(underscore_to_dot=True)}
        sys.modules.setdefault("bfcl_eval.constants.model_config", stand_in)
        utils = importlib.import_module("bfcl_eval.utils")
        enums = importlib.import_module("bfcl_eval.constants.enums")
        type_mappings = importlib.import_module("bfcl_eval.constants.type_mappings")
        checker = importlib.import_module("bfcl_eval.eval_checker.ast_eval.ast_checker")
        handler_utils = importlib.import_module("bfcl_eval.model_handler.utils")
    except ImportError as e:
        raise LoopcoderError(
            f"cannot import bfcl-eval from {root}: {e} (delete the directory to reinstall it)"
        ) from None
    found = getattr(sys.modules.get("bfcl_eval"), "__file__", "") or ""
    if not found.startswith(key):
        raise LoopcoderError(f"another bfcl_eval is already imported ({found}); loopcoder uses the one in {root}")
    loaded = BFCL(
        load_dataset_entry=utils.load_dataset_entry,
        load_ground_truth_entry=utils.load_ground_truth_entry,
        convert_to_tool=handler_utils.convert_to_tool,
        ast_checker=checker.ast_checker,
        is_function_calling_format_output=utils.is_function_calling_format_output,
        is_empty_output=utils.is_empty_output,
        openapi_types=type_mappings.GORILLA_TO_OPENAPI,
        responses_style=enums.ModelStyle.OPENAI_RESPONSES,
        python=enums.Language.PYTHON,
    )
    _loaded[key] = loaded
    return loaded


# ---------------------------------------------------------------------------------------------- one test entry
def request_body(bfcl: BFCL, entry: dict, model: str) -> dict:
    """What bfcl-eval's OpenAIResponsesHandler sends for a single-turn entry in function-calling mode."""
    messages = [{**m, "role": "developer" if m["role"] == "system" else m["role"]} for m in entry["question"][0]]
    body: dict[str, Any] = {"input": messages, "model": model, "store": False, "temperature": TEMPERATURE}
    tools = bfcl.convert_to_tool(entry["function"], bfcl.openapi_types, bfcl.responses_style)
    if tools:
        body["tools"] = tools
    return body


def model_result(response: dict) -> list[dict] | str:
    """The handler's reading of a response: `[{name: arguments}, ...]` for its function calls, else its text."""
    calls = [{o["name"]: o["arguments"]} for o in response.get("output", []) if o.get("type") == "function_call"]
    if calls:
        return calls
    return "".join(
        p.get("text", "")
        for o in response.get("output", [])
        if o.get("type") == "message"
        for p in o.get("content", [])
        if p.get("type") == "output_text"
    )


def decode_ast(result: list[dict] | str) -> list[dict]:
    """OpenAIResponsesHandler.decode_ast in function-calling mode (raises on text, as it does)."""
    decoded = []
    for invoked in result:
        name = next(iter(invoked.keys()))  # a str (text, not calls) has no keys: the decoding fails, as in BFCL
        decoded.append({name: json.loads(invoked[name])})
    return decoded


def score(bfcl: BFCL, category: str, result: list[dict] | str, functions: list[dict], answer: list | None) -> dict:
    """bfcl's eval_runner on one entry: {"valid", "error_type", "error"} (`functions` without the language hint)."""
    if "relevance" in category:  # relevance_file_runner: was any call made?
        try:
            called = not bfcl.is_empty_output(decode_ast(result))
        except Exception:
            called = False
        valid = not called if "irrelevance" in category else called
        kind = "irrelevance_error:decoder_success" if "irrelevance" in category else "relevance_error:decoder_failed"
        return {"valid": valid, "error_type": None if valid else kind, "error": []}
    try:  # ast_file_runner
        decoded = decode_ast(result)
    except Exception as e:
        return {"valid": False, "error_type": "ast_decoder:decoder_failed", "error": [f"Failed to decode AST. {e}"]}
    if not bfcl.is_function_calling_format_output(decoded):
        return {"valid": False, "error_type": "ast_decoder:decoder_wrong_output_format", "error": []}
    checked = bfcl.ast_checker(functions, decoded, answer, bfcl.python, category, MODEL_ENTRY)
    return {"valid": bool(checked["valid"]), "error_type": checked.get("error_type"), "error": checked.get("error", [])}


# ---------------------------------------------------------------------------------------------- a run
@dataclass
class Category:
    """A category's entries: with the language hint (what is sent) and without (what the checker reads)."""

    name: str
    entries: list[dict]
    plain: dict[str, dict]
    answers: dict[str, list]


def load_category(bfcl: BFCL, name: str, limit: int | None) -> Category:
    entries = bfcl.load_dataset_entry(name)[:limit]
    plain = {
        e["id"]: e for e in bfcl.load_dataset_entry(name, include_prereq=False, include_language_specific_hint=False)
    }
    answers = {} if "relevance" in name else {a["id"]: a["ground_truth"] for a in bfcl.load_ground_truth_entry(name)}
    return Category(name, entries, plain, answers)


class RequestRefused(LoopcoderError):
    """The server answered with an HTTP error (a 400 for a prompt over the context, for example)."""


def post_json(url: str, body: dict | None, api_key: str | None, timeout: float = 60.0) -> dict:
    """One POST (a GET without `body`); an HTTP error is a `RequestRefused` that carries the server's message, and
    an unreachable server a LoopcoderError."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):  # an OpenAI error body: its message
            detail = json.loads(detail)["error"]["message"]
        raise RequestRefused(f"{url} answered {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise LoopcoderError(f"{url}: {getattr(e, 'reason', e)}") from None


def get_json(url: str, api_key: str | None) -> dict:
    return post_json(url, None, api_key)


def run_categories(
    bfcl: BFCL,
    base_url: str,
    model: str,
    categories: list[str],
    done: dict[str, Any],
    save: Callable[[], None],
    *,
    limit: int | None = None,
    concurrency: int = 8,
    api_key: str | None = None,
    timeout: float = 600.0,
    chunk: int = 32,
) -> dict[str, Any]:
    """Run and score every entry of `categories` not yet in `done` (resuming), saving after every chunk; then the
    accuracy of each category and of all, with 95 % Wilson intervals."""
    url = base_url.rstrip("/") + "/responses"
    loaded = [load_category(bfcl, name, limit) for name in categories]
    per_cat = done.setdefault("categories", {})
    items = {c.name: per_cat.setdefault(c.name, {}).setdefault("items", {}) for c in loaded}
    todo = [(c, e) for c in loaded for e in c.entries if e["id"] not in items[c.name]]
    total = sum(len(c.entries) for c in loaded)
    meter = Progress("  bfcl", total, "entries", start=total - len(todo))

    def one(item: tuple[Category, dict]) -> tuple[Category, dict, dict | str]:
        """The response, or (as bfcl records it) "Error during inference: ..." when the server refused it."""
        cat, entry = item
        try:
            return cat, entry, post_json(url, request_body(bfcl, entry, model), api_key, timeout)
        except RequestRefused as e:
            return cat, entry, f"Error during inference: {e}"

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        for start in range(0, len(todo), chunk):
            for cat, entry, response in pool.map(one, todo[start : start + chunk]):
                refused = isinstance(response, str)
                result = response if refused else model_result(response)
                functions = cat.plain[entry["id"]]["function"]
                checked = score(bfcl, cat.name, result, functions, cat.answers.get(entry["id"]))
                usage = {} if refused else response.get("usage") or {}
                items[cat.name][entry["id"]] = {
                    "result": result,
                    **checked,
                    "refused": refused,
                    "status": None if refused else response.get("status"),
                    "output_tokens": usage.get("output_tokens"),
                }
                meter.advance()
            save()
    meter.finish()
    for cat in loaded:
        rows = [items[cat.name][e["id"]] for e in cat.entries]
        per_cat[cat.name].update(accuracy(sum(r["valid"] for r in rows), len(rows)))
        per_cat[cat.name]["refused"] = sum(r["refused"] for r in rows)
    rows = [items[c.name][e["id"]] for c in loaded for e in c.entries]
    done["overall"] = {**accuracy(sum(r["valid"] for r in rows), len(rows)), "refused": sum(r["refused"] for r in rows)}
    return done


def accuracy(correct: int, n: int) -> dict[str, Any]:
    from loopcoder.utils.stats import wilson_interval  # numpy: not at import (the command's fast --help)

    return {
        "accuracy": correct / n if n else float("nan"),
        "correct": correct,
        "n": n,
        "ci95": list(wilson_interval(correct, n)),
    }


def summary(done: dict[str, Any]) -> str:
    lines = [f"BFCL {BFCL_VERSION} (AST categories, bfcl's own checker), accuracy [95 % Wilson interval]:"]
    for name, cat in done["categories"].items():
        low, high = cat["ci95"]
        lines.append(f"  {name:24s} {100 * cat['accuracy']:5.1f}% [{100 * low:.1f}, {100 * high:.1f}] of {cat['n']}")
    o = done["overall"]
    low, high = o["ci95"]
    lines.append(f"  {'all entries':24s} {100 * o['accuracy']:5.1f}% [{100 * low:.1f}, {100 * high:.1f}] of {o['n']}")
    if o["refused"]:
        lines.append(f"  {o['refused']} requests refused by the server (scored as bfcl scores an inference error)")
    return "\n".join(lines)
