"""`loopcoder serve` as a command: argument errors, a real process stopped by SIGTERM, and the load benchmark."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time

import httpx
import openai
import pytest

from loopcoder.bench.agentic import format_report as agentic_report
from loopcoder.bench.agentic import run_agentic_bench
from loopcoder.bench.serve import ServeBenchSettings, format_report, run_serve_bench, summarize
from loopcoder.cli import main
from loopcoder.serving.background import BackgroundServer
from loopcoder.serving.server import load_app
from support.serving import ServeProcess, build_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("serve-model"))


def test_bad_arguments_are_one_line_errors(model_dir, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    cases = [
        (["--model", "/does/not/exist", "--port", "0"], "does not exist"),
        (["--model", str(model_dir), "--port", "70000"], "--port must be 0-65535"),
        (["--model", str(model_dir), "--port", str(taken.getsockname()[1])], "it is in use"),
        (["--model", str(model_dir), "--max-batch", "0"], "--max-batch must be >= 1"),
        (["--model", str(model_dir), "--max-queue", "-1"], "--max-queue must be >= 0"),
        (["--model", str(model_dir), "--max-step-tokens", "-1"], "--max-step-tokens must be >= 0"),
        (["--model", str(model_dir), "--max-step-tokens", "8"], "--max-step-tokens must exceed --max-batch (8)"),
        (["--model", str(model_dir), "--block-size", "0"], "--block-size must be >= 1"),
        (["--model", str(model_dir), "--kv-cache-tokens", "0"], "--kv-cache-tokens must be >= 1"),
        (["--model", str(model_dir), "--kv-cache-tokens", "16"], "--kv-cache-tokens must hold at least two blocks"),
        (["--model", str(model_dir), "--port", "0", "--tool-parser", "nope"], "unknown tool parser"),
        (["--model", str(model_dir), "--host", "no-such-host.invalid", "--port", "0"], "cannot resolve"),
    ]
    try:
        for argv, message in cases:
            assert main(["serve", *argv]) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("loopcoder serve: error: ") and message in err[0], err
    finally:
        taken.close()


@pytest.mark.slow
def test_a_server_process_serves_and_stops_cleanly_on_sigterm(model_dir):
    env = {**os.environ, "LOOPCODER_API_KEY": "from-env"}
    server = ServeProcess(model_dir, "--grace", "30", env=env)
    proc, lines = server.proc, server.lines
    try:
        port = server.start(120)
        assert "API key required" in lines[0]
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0, timeout=60)
        name = os.path.basename(model_dir)
        assert client.completions.create(model=name, prompt="def f(", max_tokens=5).usage.completion_tokens > 0
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        # a stream in flight when SIGTERM arrives still ends properly
        stream = client.completions.create(
            model=name, prompt="def f(", max_tokens=200, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = [next(stream)]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.1)
    log = "".join(lines)
    assert "stopped on SIGTERM" in log and "Traceback" not in log, log


@pytest.mark.slow
def test_load_benchmark_runs_with_no_errors_and_reports(model_dir):
    s = ServeBenchSettings(model=str(model_dir), concurrency=4, duration=1.5, warmup=0.5, max_tokens=8, max_batch=4)
    report = run_serve_bench(s)
    r = report["result"]
    assert r["errors"] == 0 and r["requests"] > 0 and r["tokens"] == 8 * r["requests"]
    assert r["latency_s"]["p50"] <= r["latency_s"]["p99"] and r["ttft_s"]["p50"] is not None
    assert r["rss_before_mb"] > 50 and r["server_exit_code"] == 0 and r["server_idle_after"]
    assert 1 <= r["mean_sequences_per_step"] <= 4
    text = format_report(report)
    assert re.search(r"^errors +0$", text, re.M) and "latency p50 / p90 / p99" in text


def test_summary_percentiles_and_errors():
    records = [{"latency": i / 100, "ttft": i / 1000, "tokens": 10} for i in range(1, 101)]
    records.append({"error": "HTTP 500: boom"})
    out = summarize(records, elapsed=10.0)
    assert out["requests"] == 100 and out["errors"] == 1 and out["error_samples"] == ["HTTP 500: boom"]
    assert out["latency_s"]["p50"] == 0.5 and out["latency_s"]["p99"] == 0.99 and out["latency_s"]["max"] == 1.0
    assert out["tokens_per_s"] == 100.0 and out["requests_per_s"] == 10.0


AGENTIC = dict(agents=2, turns=2, rounds=1, max_tokens=4, max_batch=4, system_chars=600, tool_chars=200)


@pytest.mark.slow
def test_agentic_workload_pairs_a_server_with_prefix_caching_against_one_without(model_dir, capsys):
    report = run_agentic_bench(ServeBenchSettings(model=str(model_dir), workload="agentic", **AGENTIC), sys.stderr)
    r = report["result"]
    on, off = r["prefix_caching"], r["no_prefix_caching"]
    for side in (on, off):
        assert side["requests"] == 4 and side["errors"] == 0 and side["generated_tokens"] == 4 * 4
        assert side["ttft_mean_s"] > 0 and side["kv_peak_held_bytes"] > 0  # (the sampled K/V may miss a short run)
        assert side["longest_prompt_tokens"] > 200  # the turns grew the prompts
    assert on["prefix_hit_rate"] > 0.2 and off["prefix_hit_rate"] == 0  # later turns resume the earlier ones
    assert on["prefilled_tokens"] < off["prefilled_tokens"]
    assert r["ratios"]["ttft_without_over_with"] > 0 and r["server_exit_codes"] == {
        "prefix_caching": 0,
        "no_prefix_caching": 0,
    }
    text = agentic_report(report)
    assert "prefix hit rate" in text and "paired (median of per-round ratios)" in text


@pytest.mark.slow
def test_agentic_workload_measures_a_running_server_given_by_url(model_dir):
    app, scheduler = load_app(str(model_dir), max_batch=4, model_name="bench", max_tokens=64)
    with BackgroundServer(app, scheduler) as server:
        s = ServeBenchSettings(workload="agentic", url=server.url, **AGENTIC)
        report = run_agentic_bench(s, sys.stderr)
        health = httpx.get(server.url + "/health").json()
    r = report["result"]
    assert set(r) == {"server", "server_exit_codes"} and r["server"]["errors"] == 0
    assert r["server"]["prefix_hit_rate"] > 0  # the server's own figures, from /health
    assert health["cache"]["prefix_caching"] and health["cache"]["prefix_hit_tokens"] > 0
    assert "paired" not in agentic_report(report)


def test_agentic_workload_arguments_are_checked(capsys):
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9"]) == 2
    assert "--url needs --workload agentic" in capsys.readouterr().err
    assert main(["bench", "serve", "--workload", "agentic", "--agents", "0"]) == 2
    assert "--agents" in capsys.readouterr().err
