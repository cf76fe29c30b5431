"""What the full OpenAI request surface costs per request, in pairs: the server before and after, old and new request
shapes, features off and on.

    python benchmarks/serve_surface.py --before f1997b4 --rounds 40 --threads 1 --out surface.json

`loopcoder serve` processes run side by side on loopback with the same small random model and one torch thread
each: the current one, its twin (the same code: two processes differ by themselves, and this pair measures by how
much), and with `--before REV` the server as it is at git revision REV (its `src` from `git archive`, first on the
child's PYTHONPATH). Each round sends every request below once, one at a time and in a random order, so that the
machine's drift hits every side of a round alike; a request is a short chat or completion with 16 greedy tokens
(end-of-text ignored), so that the per-request cost of the HTTP side is a large share of its time:

- `twin chat` against `after chat`: the same code in two processes (what "no difference" looks like here);
- `before chat` / `after chat`, `before completion` / `after completion`: the same request to both servers (the
  code change itself);
- `BFCL shape`: the chat request with the parameters clients send that the server now accepts and ignores
  (`store`, `metadata`, `user`, `service_tier`, ...), against `after chat`;
- `penalties`: presence, frequency and repetition penalties and a logit_bias, against `after chat`;
- `logprobs`: `logprobs` with 5 `top_logprobs`, against `after chat`.

The report gives, per request, the median wall time and the median CPU time the server spent on it (all its
threads, from /proc/PID/task/*/schedstat: on a loaded machine wall time mostly measures the other jobs), each with
the median of its per-round ratio to its baseline and a 95 % interval of the mean paired difference
(loopcoder.utils.stats). With `--before`, a second part times the two pieces the change touches, in processes of their
own (before and after taking turns, `--micro-rounds`): parsing and checking a chat request, and the engine
generating 16 tokens (process CPU time, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import httpx

from loopcoder.bench.serve import ServeBenchSettings, ServerProcess, build_bench_model
from loopcoder.utils.atomic import atomic_write_text
from loopcoder.utils.stats import paired_difference

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):\n    "
CHAT = {"messages": [{"role": "user", "content": "Write a loop in Python."}], "max_tokens": 16, "temperature": 0}
COMPLETION = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
IGNORED = {  # what BFCL, the Agents SDK and others send that the server accepts and ignores (or only logs)
    "store": False,
    "metadata": {"run": "bench"},
    "user": "bench",
    "service_tier": "auto",
    "prompt_cache_key": "bench",
    "reasoning_effort": "low",
    "verbosity": "low",
    "safety_identifier": "bench",
    "parallel_tool_calls": True,
}
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "logit_bias": {"5": -5}}
# name -> (server, path, body, the name it is paired with)
REQUESTS = {
    "twin chat": ("twin", "/v1/chat/completions", CHAT, "after chat"),
    "before chat": ("before", "/v1/chat/completions", CHAT, None),
    "after chat": ("after", "/v1/chat/completions", CHAT, "before chat"),
    "before completion": ("before", "/v1/completions", COMPLETION, None),
    "after completion": ("after", "/v1/completions", COMPLETION, "before completion"),
    "BFCL shape": ("after", "/v1/chat/completions", {**CHAT, **IGNORED}, "after chat"),
    "penalties": ("after", "/v1/chat/completions", {**CHAT, **PENALTIES}, "after chat"),
    "logprobs": ("after", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 5}, "after chat"),
}


def source_at(revision: str, into: Path) -> Path:
    """The package source at a git revision (its `src` directory, unpacked into `into`)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "src"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


MICRO = """
import json, time, torch
torch.set_num_threads(1)
from loopcoder.inference.engine import Engine
from loopcoder.model.modeling import PLTForCausalLM
from loopcoder.inference.sampling import SamplingParams
from loopcoder.serving.protocol import ChatRequest, parse_request
body = json.dumps(CHAT).encode()
start = time.process_time()
for _ in range(3000):
    parse_request(ChatRequest, body).check_supported()
parse = (time.process_time() - start) / 3000
engine = Engine(PLTForCausalLM.from_pretrained(MODEL).eval(), max_batch=4)
params = SamplingParams(max_new_tokens=16, ignore_eos=True)
for _ in range(5):
    engine.generate([[5, 6, 7, 8, 9]], params)
start = time.process_time()
for _ in range(100):
    engine.generate([[5, 6, 7, 8, 9]], params)
generate = (time.process_time() - start) / 100
print(json.dumps({"parse_and_check_us": 1e6 * parse, "generate_16_tokens_ms": 1e3 * generate}))
"""


def micro(model: str, sources: dict[str, Path], rounds: int) -> dict[str, dict[str, float]]:
    """Median over rounds of each side's in-process costs; the sides take turns."""
    code = MICRO.replace("CHAT", repr(CHAT)).replace("MODEL", repr(model))
    got: dict[str, list[dict]] = {side: [] for side in sources}
    for _ in range(rounds):
        for side, src in sources.items():
            env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
            got[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        side: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]} for side, runs in got.items()
    }


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process so far (nanosecond resolution, unlike /proc/PID/stat's ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            pass
    return total / 1e9


def timed(client: httpx.Client, server: ServerProcess, path: str, body: dict) -> tuple[float, float]:
    """Wall seconds of one request, and the CPU seconds the server spent meanwhile."""
    cpu, start = cpu_seconds(server.proc.pid), time.perf_counter()
    r = client.post(server.url + path, json={**body, "ignore_eos": True})
    seconds = time.perf_counter() - start
    if r.status_code != 200:
        raise SystemExit(f"{path} answered {r.status_code}: {r.text[:300]}")
    return seconds, cpu_seconds(server.proc.pid) - cpu


def summary(samples: dict[str, list[float]]) -> dict[str, dict]:
    out = {}
    for name, values in samples.items():
        row = {"median_ms": round(1000 * statistics.median(values), 2)}
        base = REQUESTS[name][3]
        if base in samples:
            ratios = [v / b for v, b in zip(values, samples[base])]
            diff = paired_difference(samples[base], values)
            row.update(
                against=base,
                median_ratio=round(statistics.median(ratios), 4),
                mean_difference_ms=round(1000 * diff.mean, 3),
                difference_ci95_ms=[round(1000 * diff.low, 3), round(1000 * diff.high, 3)],
                distinguishable=diff.clear,
            )
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=None, help="git revision of the server to compare against (none: skip)")
    ap.add_argument("--rounds", type=int, default=40, help="rounds; each sends every request once")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--micro-rounds", type=int, default=3, help="rounds of the in-process part (with --before)")
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    a = ap.parse_args()
    requests = {k: v for k, v in REQUESTS.items() if a.before or v[0] == "after"}
    settings = ServeBenchSettings(
        max_batch=4, max_tokens=16, server_threads=a.threads, hidden_size=a.hidden_size, layers=a.layers
    )
    with tempfile.TemporaryDirectory(prefix="loopcoder-serve-surface-") as tmp:
        model = str(build_bench_model(Path(tmp) / "model", settings))
        servers = {"after": ServerProcess(model, settings), "twin": ServerProcess(model, settings)}
        old = source_at(a.before, Path(tmp) / "before") if a.before else None
        try:
            if old is not None:
                servers["before"] = ServerProcess(model, settings, env={"PYTHONPATH": str(old)})
            rng = random.Random(0)
            wall: dict[str, list[float]] = {name: [] for name in requests}
            cpu: dict[str, list[float]] = {name: [] for name in requests}
            with httpx.Client(timeout=120) as client:
                for round_ in range(a.warmup + a.rounds):
                    order = list(requests)
                    rng.shuffle(order)
                    for name in order:
                        server, path, body, _ = requests[name]
                        seconds, cpu_used = timed(client, servers[server], path, body)
                        if round_ >= a.warmup:
                            wall[name].append(seconds)
                            cpu[name].append(cpu_used)
        finally:
            for server in servers.values():
                server.stop()
        in_process = (
            micro(model, {"before": old, "after": ROOT / "src"}, a.micro_rounds) if old and a.micro_rounds else None
        )
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "before": a.before,
        "rounds": a.rounds,
        "server_threads": a.threads,
        "model": {"hidden_size": a.hidden_size, "layers": a.layers, "loops": settings.loops, "vocab": 1024},
        "load_average_1min": round(os.getloadavg()[0], 2),
        "wall": summary(wall),
        "server_cpu": summary(cpu),
        "in_process": in_process,
    }
    text = json.dumps(report, indent=2)
    if a.out:
        atomic_write_text(a.out, text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
