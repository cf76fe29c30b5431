"""Shared pieces of the serving tests (no tests here): a tiny model directory with a real tokenizer, a
live server on loopback in a thread, a scripted engine for deterministic outputs, SSE reading."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from loopcoder.inference.engine import Engine
from loopcoder.serving.background import BackgroundServer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 1024  # the tiny model's max positions, by default (a tools system prompt is ~500 of its tokens)


def build_model_dir(out: Path, context: int = CONTEXT) -> Path:
    """A random 2-loop PLT (hidden 32) with a byte-level BPE tokenizer (vocab 400, ChatML + tools template)
    trained on this package's engine/model source: a few hundred KB, built in about a second."""
    from loopcoder.cli import main
    from loopcoder.data import tokenizer as T
    from loopcoder.inference import engine, sampling
    from loopcoder.model import modeling as model

    text = "".join(inspect.getsource(m) for m in (engine, model, sampling))
    tok = T.train_tokenizer((text[i : i + 2000] for i in range(0, len(text), 2000)), vocab_size=400)
    tokenizer_dir = T.save_tokenizer(tok, out.parent / f"{out.name}-tokenizer")  # the model is made for it
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "init",
                    "--out",
                    str(out),
                    "--hidden-size",
                    "32",
                    "--layers",
                    "2",
                    "--heads",
                    "4",
                    "--kv-heads",
                    "2",
                    "--tokenizer",
                    str(tokenizer_dir),
                    "--window",
                    "4",
                    "--max-positions",
                    str(context),
                    "--loops",
                    "2",
                    "--seed",
                    "0",
                ]
            )
            == 0
        )
    return out


class ServeProcess:
    """`python -m loopcoder serve --port 0 ...` in a process of its own, its stderr collected in `lines`;
    `start()` waits for the line that gives the port. The caller stops it (`stop()` terminates and waits)."""

    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "loopcoder", "serve", "--model", str(model_dir), "--port", "0"]
        command += ["--log-level", "warning", *args]
        self.proc = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env or dict(os.environ)
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "/v1 (" in line:
                self._ready.set()
        self._ready.set()

    def start(self, timeout: float) -> int:
        """The server's port, once it listens."""
        assert self._ready.wait(timeout), "".join(self.lines)
        found = re.search(r"127\.0\.0\.1:(\d+)/v1", self.lines[0]) if self.lines else None
        assert found, "".join(self.lines)
        return int(found.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class LiveServer(BackgroundServer):
    """`GracefulServer` on 127.0.0.1 (a free port) in a background thread, as `loopcoder serve` runs it, with
    helpers that read its health."""

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 10) -> dict:
        """Health once nothing runs or waits (the slots are free)."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if h["running"] == 0 and h["waiting"] == 0 and h["inflight"] == 0:
                return h
            assert time.monotonic() < deadline, f"still busy: {h}"
            time.sleep(0.02)

    def wait_for(self, predicate, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if predicate(h):
                return h
            assert time.monotonic() < deadline, f"health never matched: {h}"
            time.sleep(0.02)


class ScriptedRunner:
    """The engine's runner with no model run: a prefill and a decode step answer with `engine`'s script."""

    def __init__(self, engine: ScriptedEngine, model, config) -> None:
        self.engine, self.model, self.mode = engine, model, config.mode

    def prefill(self, req, n: int) -> torch.Tensor:
        return self.engine._prefilled(req)

    def decode(self, reqs) -> torch.Tensor:
        return self.engine._decoded(reqs)


class ScriptedEngine(Engine):
    """The real engine (queue, slots, sampling, stop strings, eos, max tokens, streaming text), but the model's
    runner is replaced (`ScriptedRunner`): every request's output is `script` (tokenised, then end-of-text,
    repeating), one token per step, `delay` seconds per step. It records the prompts it received. A random model
    never writes a tool call; this does. `replies` maps a text to the output of every prompt that contains it
    (instead of `script`): an agent's tool loop, whose later prompts hold the tool's result, ends. A prompt
    containing `POISON` gets NaN logits from its second token on (a failure that belongs to one request);
    `fail_next` makes the next decode step raise (one that belongs to all of them, as an out-of-memory error
    would)."""

    POISON = "POISON"

    def __init__(self, model, tokenizer, script: str = "hello", delay: float = 0.0, **kw) -> None:
        kw.setdefault("max_step_tokens", None)  # one prefill per prompt: it records the prompt
        kw.setdefault("prefix_caching", False)  # nothing is written to the cache that a later prompt could reuse
        super().__init__(model, tokenizer, runner=lambda m, cache, config: ScriptedRunner(self, m, config), **kw)
        self.delay = delay
        self.fail_next = False
        self.prompts: list[list[int]] = []
        self.poisoned: set[str] = set()
        self.script = script
        self.replies: dict[str, str] = {}
        self._reply_ids: dict[str, list[int]] = {}  # request id -> its output, where a reply applies

    @property
    def script(self) -> str:
        return self._script

    @script.setter
    def script(self, text: str) -> None:
        self._script = text
        self._script_ids = [*self.tokenizer(text, add_special_tokens=False)["input_ids"], min(self.eos_ids)]

    def _logits(self, req) -> torch.Tensor:
        row = torch.full((self.config.vocab_size,), float("-inf"))
        if req.id in self.poisoned and req.output_ids:
            return row.fill_(float("nan"))
        ids = self._reply_ids.get(req.id, self._script_ids)
        row[ids[len(req.output_ids) % len(ids)]] = 0.0
        return row

    def _prefilled(self, req) -> torch.Tensor:
        """What the scripted runner answers to `req`'s prefill: the prompt recorded, its script chosen."""
        self.prompts.append(req.prompt_ids)
        prompt = self.tokenizer.decode(req.prompt_ids)
        if self.POISON in prompt:
            self.poisoned.add(req.id)
        for key, text in self.replies.items():
            if key in prompt:
                self._reply_ids[req.id] = [
                    *self.tokenizer(text, add_special_tokens=False)["input_ids"],
                    min(self.eos_ids),
                ]
                break
        return self._logits(req)

    def _decoded(self, reqs) -> torch.Tensor:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated failure")
        return torch.stack([self._logits(r) for r in reqs])

    def step(self):
        events = super().step()
        if self.delay:
            time.sleep(self.delay)
        return events


def scripted_app(
    model,
    tokenizer,
    *,
    script: str = "hello",
    delay: float = 0.0,
    max_batch: int = 4,
    max_queue: int = 8,
    queue_timeout: float = 10.0,
    **settings,
):
    from loopcoder.serving.app import ServerSettings, create_app
    from loopcoder.serving.scheduler import Scheduler

    engine = ScriptedEngine(model, tokenizer, script, delay, max_batch=max_batch)
    scheduler = Scheduler(engine, max_queue=max_queue, queue_timeout=queue_timeout)
    settings.setdefault("model_name", "scripted")
    return create_app(scheduler, tokenizer, ServerSettings(**settings)), scheduler, engine


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded ('[DONE]' kept as is)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


class CallLineParser:
    """A toy parser for the registry and grammar tests: `CALL {"name": ..., "arguments": {...}}` lines. Its start
    marker is plain text (Hermes' is a special token)."""

    start_marker = "CALL "

    def parse(self, text):
        from loopcoder.serving.tool_calls import ParsedOutput, ToolCall

        calls = []
        for line in text.splitlines():
            if line.startswith(self.start_marker):
                body = json.loads(line[len(self.start_marker) :])
                calls.append(ToolCall(body["name"], json.dumps(body["arguments"])))
        return ParsedOutput(None if calls else text, calls)

    def call_format(self):
        from loopcoder.serving.tool_calls import CallFormat

        return CallFormat(self.start_marker, "\n", separator="")
