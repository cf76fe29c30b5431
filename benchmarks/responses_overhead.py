"""What `POST /v1/responses` costs per request over `POST /v1/chat/completions` for the same conversation, in pairs.

    PYTHONPATH=src python3 benchmarks/responses_overhead.py [--rounds 100] [--tokens 8]

A random tiny model (hidden 64, 2 layers, R = 2) is served in this process (torch pinned to 1 thread). Each round
sends the same conversation once through each API, in random order, greedy and for the same number of tokens (so
both do the same engine work), once without and once with a tool (the tool-call grammar and parser); the client
waits for each reply before the next request. Reported: per kind, the medians of both, and the paired difference
of the wall times (responses - chat) with its 95 % interval.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import tempfile
import time

import httpx
import torch

from loopcoder.cli import main
from loopcoder.serving.background import BackgroundServer
from loopcoder.serving.server import load_app
from loopcoder.utils.stats import paired_difference

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER}


def bodies(tokens: int, tools: bool) -> tuple[dict, dict]:
    """A chat request and the Responses request of the same conversation."""
    question = "What is the weather in Paris? Answer in one word."
    chat = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
        "max_tokens": tokens,
        "temperature": 0,
    }
    responses = {"instructions": "Be brief.", "input": question, "max_output_tokens": tokens, "temperature": 0}
    if tools:
        chat["tools"] = [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]
        responses["tools"] = [TOOL]
    return chat, responses


def main_(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    model = tempfile.mkdtemp(prefix="responses-bench-")
    init = ["init", "--out", model, "--force", "--loops", "2", "--hidden-size", "64", "--layers", "2"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*init, "--heads", "4", "--kv-heads", "2", "--max-positions", "2048"]) == 0
    app, scheduler = load_app(model, max_batch=4, model_name="bench", max_tokens=args.tokens)
    rng = random.Random(0)
    times: dict[str, dict[str, list[float]]] = {k: {"chat": [], "responses": []} for k in ("text", "tools")}
    with BackgroundServer(app, scheduler) as server, httpx.Client(base_url=server.url + "/v1", timeout=120) as http:
        for kind in times:  # warm-up: tokenizer caches, grammar compilation
            chat, responses = bodies(args.tokens, kind == "tools")
            http.post("/chat/completions", json=chat).raise_for_status()
            http.post("/responses", json=responses).raise_for_status()
        for _ in range(args.rounds):
            for kind in times:
                chat, responses = bodies(args.tokens, kind == "tools")
                pair = [("chat", "/chat/completions", chat), ("responses", "/responses", responses)]
                rng.shuffle(pair)
                for api, path, body in pair:
                    t0 = time.perf_counter()
                    http.post(path, json=body).raise_for_status()
                    times[kind][api].append(time.perf_counter() - t0)
    report = {"rounds": args.rounds, "tokens": args.tokens, "torch_threads": 1}
    for kind, t in times.items():
        diff = paired_difference(t["chat"], t["responses"])
        report[kind] = {
            "chat_median_ms": 1e3 * statistics.median(t["chat"]),
            "responses_median_ms": 1e3 * statistics.median(t["responses"]),
            "median_ratio": statistics.median(r / c for r, c in zip(t["responses"], t["chat"])),
            "difference_ms": diff.to_dict() | {"mean": 1e3 * diff.mean, "ci95": [1e3 * diff.low, 1e3 * diff.high]},
        }
    return report


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--tokens", type=int, default=8)
    print(json.dumps(main_(p.parse_args()), indent=1))
