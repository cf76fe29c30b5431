"""Serving load benchmark: many concurrent clients against `loopcoder serve` on loopback.

The server runs in a subprocess (as users run it). After a warm-up, `concurrency` clients send
streaming completions back to back for `duration` seconds (requests in flight at the deadline finish
and count). Reported: requests/s, generated tokens/s, end-to-end latency and time to first token
(p50/p90/p99), errors (must be 0), the server's resident memory after the warm-up and after the run
(no growth expected), the mean number of sequences per decode step, and whether SIGTERM shut the
server down cleanly. Without `--model`, a small random model and tokenizer are built first.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loopcoder.bench.common import cpu_name, now
from loopcoder.bench.settings import ServeBenchSettings
from loopcoder.data import tokenizer as T
from loopcoder.model.checkpoint import write_random_model
from loopcoder.utils.errors import LoopcoderError


def build_bench_model(out: str | Path, s: ServeBenchSettings, max_positions: int = 2048) -> Path:
    """A random PLT model (`loopcoder init`'s other defaults) and a BPE tokenizer trained on this package's
    source, in `out`."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(__file__).resolve().parents[1].rglob("*.py"))]
    tok = T.train_tokenizer(texts, vocab_size=1024)
    write_random_model(
        out,
        hidden_size=s.hidden_size,
        layers=s.layers,
        loops=s.loops,
        vocab_size=1024,
        max_positions=max_positions,
        seed=s.seed,
    )
    T.save_tokenizer(tok, out, model_max_length=max_positions)
    return Path(out)


def source_text() -> str:
    """The package's top-level modules, one after another: the benchmarks' prompts are cut from it."""
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(Path(__file__).resolve().parents[1].glob("*.py")))


def prompts(n: int, seed: int) -> list[str]:
    """Code prompts of varied length (50-600 characters of this package's source)."""
    rng = random.Random(seed)
    text = source_text()
    out = []
    for _ in range(n):
        size = rng.randint(50, 600)
        start = rng.randrange(0, len(text) - size)
        out.append(text[start : start + size])
    return out


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise LoopcoderError(f"no VmRSS for process {pid}")


class ServerProcess:
    """`loopcoder serve` in a subprocess on a free loopback port; its stderr is kept for the report. `env`: variables
    set for it on top of this process's (another checkout's PYTHONPATH, to compare servers); `extra`: more flags."""

    def __init__(
        self, model: str, s: ServeBenchSettings, env: dict[str, str] | None = None, extra: list[str] | None = None
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "loopcoder",
            "serve",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--max-batch",
            str(s.max_batch),
            "--max-queue",
            str(4 * s.concurrency),
            "--max-tokens",
            str(s.max_tokens),
            "--device",
            s.device,
            "--dtype",
            s.dtype,
            "--log-level",
            "warning",
        ]
        if s.server_threads:
            cmd += ["--threads", str(s.server_threads)]
        cmd += extra or []
        env = {**{k: v for k, v in os.environ.items() if k != "LOOPCODER_API_KEY"}, **(env or {})}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.log: list[str] = []
        self._port: list[int] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(s.startup_timeout) or not self._port:
            self.kill()
            raise LoopcoderError("the server did not start:\n" + "".join(self.log[-20:]))
        self.url = f"http://127.0.0.1:{self._port[0]}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
            if m and not self._port:
                self._port.append(int(m.group(1)))
                self._ready.set()
        self._ready.set()  # exited before it was ready

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (graceful shutdown); the exit status, or None if it had to be killed."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def _one(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One completion; latency, time to first token and generated tokens, or the error."""
    start = time.perf_counter()
    first = None
    try:
        if not body["stream"]:
            r = await client.post(url, json=body)
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
            tokens = r.json()["usage"]["completion_tokens"]
        else:
            tokens, done = None, False
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        return {"error": event["error"]["message"]}
                    if first is None and event["choices"] and event["choices"][0]["text"]:
                        first = time.perf_counter() - start
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
            if not done or tokens is None:
                return {"error": "the stream ended without usage and [DONE]"}
    except Exception as e:  # connection errors, timeouts: all count as errors
        return {"error": f"{type(e).__name__}: {e}"}
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


async def run_load(url: str, s: ServeBenchSettings, seconds: float, texts: list[str]) -> dict[str, Any]:
    """`concurrency` clients, each sending requests back to back until `seconds` have passed."""
    import httpx

    records: list[dict[str, Any]] = []
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=s.concurrency + 4, max_keepalive_connections=s.concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600.0)) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                i = next(counter)
                body = {
                    "prompt": texts[i % len(texts)],
                    "max_tokens": s.max_tokens,
                    "temperature": 0.8,
                    "top_p": 0.95,
                    "seed": s.seed + i,
                    "ignore_eos": True,
                    "stream": s.stream,
                }
                if s.stream:
                    body["stream_options"] = {"include_usage": True}
                records.append(await _one(client, url + "/v1/completions", body))

        await asyncio.gather(*(worker() for _ in range(s.concurrency)))
        elapsed = time.perf_counter() - start
    return summarize(records, elapsed)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]  # nearest rank


def summarize(records: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    ok = [r for r in records if "error" not in r]
    errors = [r["error"] for r in records if "error" in r]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "elapsed_s": elapsed,
        "requests": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "requests_per_s": len(ok) / elapsed,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "latency_s": {
            "mean": statistics.fmean(lat) if lat else None,
            "p50": _pct(lat, 50),
            "p90": _pct(lat, 90),
            "p99": _pct(lat, 99),
            "max": max(lat, default=None),
        },
        "ttft_s": {"p50": _pct(ttft, 50), "p90": _pct(ttft, 90), "p99": _pct(ttft, 99)},
    }


def _health(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(url + "/health", timeout=30).json()


def _wait_idle(url: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        h = _health(url)
        if h["running"] == 0 and h["waiting"] == 0 and h["inflight"] == 0:
            return h
        if time.monotonic() > deadline:
            raise LoopcoderError(f"the server is still busy after the load: {h}")
        time.sleep(0.1)


def run_serve_bench(s: ServeBenchSettings, log: Any = sys.stderr) -> dict[str, Any]:
    if s.concurrency < 1 or s.duration <= 0 or s.warmup < 0 or s.max_tokens < 1 or s.max_batch < 1:
        raise LoopcoderError("--concurrency, --duration, --max-tokens and --max-batch must be positive, --warmup >= 0")
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise LoopcoderError("the serve benchmark needs httpx (pip install httpx)") from None
    with tempfile.TemporaryDirectory(prefix="loopcoder-bench-serve-") as tmp:
        model = s.model
        if model is None:
            print(f"building a random model (hidden {s.hidden_size}, {s.layers} layers, R={s.loops}) ...", file=log)
            model = str(build_bench_model(Path(tmp) / "model", s))
        print("starting the server ...", file=log)
        server = ServerProcess(model, s)
        try:
            texts = prompts(256, s.seed)
            if s.warmup:
                print(f"warm-up: {s.warmup:g} s ...", file=log)
                asyncio.run(run_load(server.url, s, s.warmup, texts))
            idle = _wait_idle(server.url)
            rss_before = rss_bytes(server.proc.pid)
            print(f"load: {s.concurrency} clients for {s.duration:g} s ...", file=log)
            before = idle
            samples: list[float] = []
            sampling = threading.Event()

            def sample() -> None:  # the RSS curve under load: growth that plateaus is not a leak
                while not sampling.wait(max(s.duration / 20, 0.1)):
                    samples.append(rss_bytes(server.proc.pid) / 2**20)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            result = asyncio.run(run_load(server.url, s, s.duration, texts))
            sampling.set()
            sampler.join()
            idle = _wait_idle(server.url)
            time.sleep(0.5)
            rss_after = rss_bytes(server.proc.pid)
            engine_steps = idle["decode_steps"] - before["decode_steps"]
        finally:
            exit_code = server.stop()
    result.update(
        {
            "rss_before_mb": rss_before / 2**20,
            "rss_after_mb": rss_after / 2**20,
            "rss_growth_mb": (rss_after - rss_before) / 2**20,
            "rss_under_load_mb": samples,  # every duration/20 seconds
            "rss_growth_second_half_mb": (rss_after / 2**20 - samples[len(samples) // 2]) if samples else None,
            "engine_steps": engine_steps,
            "mean_sequences_per_step": (idle["decoded_sequences"] - before["decoded_sequences"]) / max(engine_steps, 1),
            "engine_busy_fraction": (idle["step_seconds"] - before["step_seconds"]) / result["elapsed_s"],
            "server_exit_code": exit_code,
            "server_idle_after": idle["running"] == 0 and idle["inflight"] == 0,
        }
    )
    # this machine (the clients' and the server's), not `machine_info`'s torch process: the server is another one
    return {
        "settings": asdict(s),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "date": now()},
        "result": result,
    }


def format_report(report: dict[str, Any]) -> str:
    s, r, m = report["settings"], report["result"], report["machine"]

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.0f} ms"

    rows = [
        (
            "clients",
            f"{s['concurrency']} ({'streaming' if s['stream'] else 'non-streaming'}), "
            f"{s['max_tokens']} tokens each, max batch {s['max_batch']}",
        ),
        ("server torch threads", str(s["server_threads"] or "default")),
        ("duration", f"{r['elapsed_s']:.1f} s after {s['warmup']:g} s warm-up"),
        ("requests", f"{r['requests']} ({r['requests_per_s']:.2f}/s)"),
        ("generated tokens", f"{r['tokens']} ({r['tokens_per_s']:.1f}/s)"),
        ("latency p50 / p90 / p99", " / ".join(ms(r["latency_s"][k]) for k in ("p50", "p90", "p99"))),
        ("first token p50 / p99", " / ".join(ms(r["ttft_s"][k]) for k in ("p50", "p99"))),
        ("sequences per decode step", f"{r['mean_sequences_per_step']:.1f}"),
        ("engine busy", f"{100 * r['engine_busy_fraction']:.0f}% of the time (inside engine.step)"),
        ("errors", f"{r['errors']}" + (f" (e.g. {r['error_samples'][0]})" if r["error_samples"] else "")),
        (
            "server RSS before / after",
            f"{r['rss_before_mb']:.0f} / {r['rss_after_mb']:.0f} MiB "
            f"({r['rss_growth_mb']:+.1f} MiB; second half of the run "
            + ("-" if r["rss_growth_second_half_mb"] is None else f"{r['rss_growth_second_half_mb']:+.1f} MiB")
            + ")",
        ),
        ("shutdown (SIGTERM)", "clean, exit 0" if r["server_exit_code"] == 0 else f"exit {r['server_exit_code']}"),
    ]
    width = max(len(k) for k, _ in rows)
    head = f"Serve benchmark on {m['cpu']} ({m['cores']} cores, {s['device']}), {m['date']}"
    return "\n".join([head, ""] + [f"{k:<{width}}  {v}" for k, v in rows])
