"""`loopcoder bench serve --workload agentic`: coding agents' traffic against `loopcoder serve` over HTTP, with prefix
caching and without, paired in one run.

`agents` agents run at once, each for `turns` turns of streaming chat completions. Every conversation starts
with the same long system prompt (`system_chars` characters of this package's source: an agent's instructions
and tools), then the agent's own task; each turn appends the assistant's reply and a tool result
(`tool_chars` characters), so each prompt is the previous one plus a little: long shared prefixes, multi-turn
growth. Two servers are started from the same model, one with prefix caching (the default) and one with
`--no-prefix-caching`; in each of `rounds` rounds both run the same conversations, in random order. With `url`,
the workload runs against that server alone (no pairing).

Reported per server: time to first token (mean, p50, first turns against later ones), generated tokens/s over
the episode, the prefix-cache hit rate and the tokens prefilled (from the server's /health "cache" figures, as
differences over the episode), and the K/V in use (blocks held by sequences plus snapshots in use, sampled
from /health during the episode; and the server's peak); and the median per-round ratios between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loopcoder.bench.common import cpu_name, now
from loopcoder.bench.serve import ServerProcess, _pct, build_bench_model, source_text
from loopcoder.bench.settings import ServeBenchSettings
from loopcoder.utils.errors import LoopcoderError

SIDES = {"prefix_caching": [], "no_prefix_caching": ["--no-prefix-caching"]}  # the servers' extra flags
CONTEXT = 8192  # the built model's context: the conversations grow to a few thousand tokens


def conversations(s: ServeBenchSettings, round_: int) -> tuple[str, list[str], list[list[str]]]:
    """The shared system prompt (the same every round, as a deployment's is), each agent's task and its tool
    results (new each round), cut from this package's source."""
    text = source_text()
    system = text[: s.system_chars]
    rng = random.Random(s.seed * 1000 + round_)

    def piece(n: int) -> str:
        start = rng.randrange(s.system_chars, len(text) - n)
        return text[start : start + n]

    tasks = [f"Task {a}: fix the bug in this code.\n{piece(300)}" for a in range(s.agents)]
    tools = [[piece(s.tool_chars) for _ in range(s.turns)] for _ in range(s.agents)]
    return system, tasks, tools


async def _turn(client: Any, url: str, messages: list[dict[str, str]], s: ServeBenchSettings, seed: int) -> dict:
    """One streamed chat completion: time to its first text (or to its end, if it has none), the reply, its usage;
    or the error."""
    body = {
        "messages": messages,
        "max_tokens": s.max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, text, usage = time.perf_counter(), None, [], None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                for choice in event["choices"]:
                    content = choice["delta"].get("content")
                    if content or choice["finish_reason"]:  # a reply of no visible text: its end is its first
                        first = first or time.perf_counter() - start
                    if content:
                        text.append(content)
                usage = event.get("usage") or usage
    except Exception as e:  # connection errors, timeouts: all count as errors
        return {"error": f"{type(e).__name__}: {e}"}
    if usage is None:
        return {"error": "the stream ended without usage"}
    return {"ttft": first, "reply": "".join(text), "usage": usage}


async def _agent(client: Any, url: str, s: ServeBenchSettings, system: str, task: str, tools: list[str], a: int):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": task}]
    out = []
    for turn, tool in enumerate(tools):
        r = await _turn(client, url, messages, s, seed=s.seed + 1000 * a + turn)
        out.append({**r, "turn": turn})
        if "error" in r:
            break
        messages += [{"role": "assistant", "content": r["reply"]}, {"role": "user", "content": f"Tool output:\n{tool}"}]
    return out


def _kv_in_use(cache: dict[str, Any]) -> tuple[int, int] | None:
    """Bytes of K/V blocks held by sequences, and of loop-state snapshots in use (None: not a paged cache)."""
    if not cache.get("paged"):
        return None
    return cache["blocks_held"] * cache["block_bytes"], cache["snapshots_in_use"] * cache["snapshot_bytes"]


async def episode(url: str, s: ServeBenchSettings, round_: int) -> dict[str, Any]:
    """All agents' conversations at once against one server; its figures over the episode."""
    import httpx

    system, tasks, tools = conversations(s, round_)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        before = (await client.get(url + "/health")).json().get("cache", {})
        samples: list[tuple[int, int]] = []
        done = asyncio.Event()

        async def sample() -> None:  # K/V in use while the agents run
            while not done.is_set():
                kv = _kv_in_use((await client.get(url + "/health")).json().get("cache", {}))
                if kv is not None:
                    samples.append(kv)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.25)

        sampler = asyncio.create_task(sample())
        start = time.perf_counter()
        runs = await asyncio.gather(*(_agent(client, url, s, system, tasks[a], tools[a], a) for a in range(s.agents)))
        wall = time.perf_counter() - start
        done.set()
        await sampler
        after = (await client.get(url + "/health")).json().get("cache", {})
    turns = [t for run in runs for t in run]
    ok = [t for t in turns if "error" not in t]
    ttft = [t["ttft"] for t in ok if t["ttft"] is not None]
    later = [t["ttft"] for t in ok if t["ttft"] is not None and t["turn"] > 0]
    queried = after.get("prefix_queried_tokens", 0) - before.get("prefix_queried_tokens", 0)
    hits = after.get("prefix_hit_tokens", 0) - before.get("prefix_hit_tokens", 0)
    generated = sum(t["usage"]["completion_tokens"] for t in ok)
    return {
        "requests": len(ok),
        "errors": len(turns) - len(ok),
        "error_samples": sorted({t["error"] for t in turns if "error" in t})[:3],
        "wall_s": wall,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_first_turn_mean_s": statistics.fmean([t["ttft"] for t in ok if t["turn"] == 0 and t["ttft"]] or [0]),
        "ttft_later_turns_mean_s": statistics.fmean(later) if later else None,
        "generated_tokens": generated,
        "generated_tokens_per_s": generated / wall,
        "longest_prompt_tokens": max((t["usage"]["prompt_tokens"] for t in ok), default=0),
        "prefix_hit_rate": hits / queried if queried else 0.0,
        "prefilled_tokens": after.get("prefill_tokens", 0) - before.get("prefill_tokens", 0),
        "kv_in_use_peak_sampled_bytes": max((b + n for b, n in samples), default=None),
        "kv_in_use_mean_sampled_bytes": statistics.fmean(b + n for b, n in samples) if samples else None,
        "kv_blocks_peak_sampled_bytes": max((b for b, _ in samples), default=None),
        "snapshots_peak_sampled_bytes": max((n for _, n in samples), default=None),
        "kv_peak_held_bytes": after["peak_blocks_held"] * after["block_bytes"] if after.get("paged") else None,
        "kv_pool_bytes": after.get("allocated_bytes"),
    }


def _merge(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's figures over all rounds: medians of the per-episode values, sums of the counts."""
    out: dict[str, Any] = {"rounds": episodes}
    for key, value in episodes[0].items():
        values = [e[key] for e in episodes if e[key] is not None]
        if key in ("requests", "errors", "generated_tokens", "prefilled_tokens"):
            out[key] = sum(values)
        elif key == "longest_prompt_tokens":
            out[key] = max(values, default=0)
        elif isinstance(value, (int, float)) and values:
            out[key] = statistics.median(values)
    out["error_samples"] = sorted({m for e in episodes for m in e["error_samples"]})[:3]
    return out


def run_agentic_bench(s: ServeBenchSettings, log: Any) -> dict[str, Any]:
    if s.agents < 1 or s.turns < 1 or s.rounds < 1 or s.max_tokens < 1 or s.system_chars < 0 or s.tool_chars < 1:
        raise LoopcoderError(
            "--agents, --turns, --rounds, --max-tokens and --tool-chars must be >= 1, --system-chars >= 0"
        )
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise LoopcoderError("the serve benchmark needs httpx (pip install httpx)") from None
    servers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="loopcoder-bench-agentic-") as tmp:
        try:
            if s.url:
                urls = {"server": s.url.rstrip("/")}
            else:
                model = s.model
                if model is None:
                    print(
                        f"building a random model (hidden {s.hidden_size}, {s.layers} layers, R={s.loops}) ...",
                        file=log,
                    )
                    model = str(build_bench_model(Path(tmp) / "model", s, max_positions=CONTEXT))
                for side, extra in SIDES.items():
                    print(f"starting the server ({side}) ...", file=log)
                    servers[side] = ServerProcess(model, s, extra=extra)
                urls = {side: server.url for side, server in servers.items()}
            for url in urls.values():  # warm-up: the first request's one-off costs
                asyncio.run(_warm(url, s))
            rng = random.Random(s.seed)
            episodes: dict[str, list[dict[str, Any]]] = {side: [] for side in urls}
            for r in range(s.rounds):
                order = list(urls)
                rng.shuffle(order)
                for side in order:
                    print(f"round {r + 1}/{s.rounds}: {s.agents} agents x {s.turns} turns ({side}) ...", file=log)
                    episodes[side].append(asyncio.run(episode(urls[side], s, r)))
        finally:
            exit_codes = {side: server.stop() for side, server in servers.items()}
    result: dict[str, Any] = {side: _merge(e) for side, e in episodes.items()}
    if len(episodes) == 2:
        on, off = episodes["prefix_caching"], episodes["no_prefix_caching"]
        result["ratios"] = {
            "ttft_without_over_with": _median_ratio(off, on, "ttft_mean_s"),
            "tokens_per_s_with_over_without": _median_ratio(on, off, "generated_tokens_per_s"),
            "kv_peak_with_over_without": _median_ratio(on, off, "kv_in_use_peak_sampled_bytes"),
        }
    result["server_exit_codes"] = exit_codes
    return {
        "settings": asdict(s),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "date": now(), "load_average": os.getloadavg()},
        "result": result,
    }


def _median_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float | None:
    pairs = [(x[key], y[key]) for x, y in zip(a, b, strict=True) if x[key] and y[key]]
    return statistics.median(x / y for x, y in pairs) if pairs else None


async def _warm(url: str, s: ServeBenchSettings) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        r = await _turn(client, url, [{"role": "user", "content": "warm up"}], s, seed=0)
    if "error" in r:
        raise LoopcoderError(f"the server at {url} failed a first request: {r['error']}")


def format_report(report: dict[str, Any]) -> str:
    s, r, m = report["settings"], report["result"], report["machine"]

    def sec(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    def mb(x: float | None) -> str:
        return "-" if x is None else f"{x / 2**20:.1f} MiB"

    sides = [k for k in ("prefix_caching", "no_prefix_caching", "server") if k in r]

    def row(label: str, cell: Any) -> tuple[str, ...]:
        return (label, *(cell(r[k]) for k in sides))

    rows = [
        ("", *sides),
        row("time to first token, mean / p50", lambda x: f"{sec(x.get('ttft_mean_s'))} / {sec(x.get('ttft_p50_s'))}"),
        row(
            "  first turns / later turns",
            lambda x: f"{sec(x.get('ttft_first_turn_mean_s'))} / {sec(x.get('ttft_later_turns_mean_s'))}",
        ),
        row("generated tokens/s", lambda x: f"{x.get('generated_tokens_per_s', 0):.1f}"),
        row("prefix hit rate", lambda x: f"{100 * x.get('prefix_hit_rate', 0):.0f} %"),
        row("tokens prefilled", lambda x: str(x.get("prefilled_tokens"))),
        row(
            "K/V in use, peak / mean (sampled)",
            lambda x: f"{mb(x.get('kv_in_use_peak_sampled_bytes'))} / {mb(x.get('kv_in_use_mean_sampled_bytes'))}",
        ),
        row(
            "  peak blocks / snapshots",
            lambda x: f"{mb(x.get('kv_blocks_peak_sampled_bytes'))} / {mb(x.get('snapshots_peak_sampled_bytes'))}",
        ),
        row("longest prompt (tokens)", lambda x: str(x.get("longest_prompt_tokens"))),
        row("requests / errors", lambda x: f"{x['requests']} / {x['errors']}"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    head = (
        f"Agentic serve benchmark on {m['cpu']} ({m['cores']} cores, {s['device']}), {m['date']}: "
        f"{s['agents']} agents x {s['turns']} turns, {s['max_tokens']} tokens a turn, {s['rounds']} round(s)"
    )
    out = [head, "", *lines]
    if "ratios" in r:
        q = r["ratios"]
        out += [
            "",
            "paired (median of per-round ratios): time to first token without / with caching "
            f"{q['ttft_without_over_with']:.2f}x, tokens/s with / without {q['tokens_per_s_with_over_without']:.2f}x",
        ]
    return "\n".join(out)
