"""The engine thread: one thread owns the (not thread-safe) `Engine` and runs continuous batching.

HTTP handlers `submit` tickets (one engine request per choice) and `cancel` them from any thread;
the engine thread applies those commands between steps, so requests join and leave the running
batch at every step. Each ticket's updates go back through its `deliver` callback (the server wraps
an asyncio queue with `loop.call_soon_threadsafe`). With nothing to do the thread sleeps on a
condition variable: no busy loop.

The scheduler uses the engine's public API only (`add_request`, `abort`, `step`, `has_work`, and its load
counters). Its inbox is the hand-over between threads, emptied before every step: requests wait for a
slot in the engine's own queue. An engine event with an `error` (one request's prefill, logits or
sampling failed) fails that request's ticket with 500 `generation_failed` and nobody else's; only a
failed step (the decode every running sequence shares) fails every ticket in flight. A 500's message says what
failed in a fixed phrase; the details (exceptions, grammar state) go to the server log only.

Admission: at most `max_batch` requests run (the engine's slots), at most `max_queue` more wait;
beyond that `submit` refuses with 429. A ticket not fully admitted within `queue_timeout` seconds
fails with 503. After `begin_shutdown(grace)` nothing new is admitted; running and waiting requests
continue until the grace period ends, then the rest are aborted and the thread exits.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loopcoder.inference.engine import Engine, Request
from loopcoder.inference.sampling import SamplingParams, TokenLogprob
from loopcoder.serving.protocol import APIError
from loopcoder.utils.errors import LoopcoderError

log = logging.getLogger("loopcoder.serve")


@dataclass
class Job:
    """One choice: a prompt and how to sample it."""

    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Update:
    """What the engine produced for one choice since the last update."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" when the choice ended normally
    error: APIError | None = None  # the choice ended without finishing (timeout, shutdown, failure)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the job asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the choice's first update, when asked for

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class _Ticket:
    id: str
    jobs: list[Job]
    deliver: Callable[[Update], None]
    submitted: float
    live: set[int] = field(default_factory=set)  # choices still running or waiting
    requests: dict[int, Request] = field(default_factory=dict)  # the engine's request of each choice


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="shutting_down")


class Scheduler:
    def __init__(self, engine: Engine, *, max_queue: int = 64, queue_timeout: float = 30.0) -> None:
        if max_queue < 0:
            raise LoopcoderError(f"max_queue must be >= 0, got {max_queue}")
        if not queue_timeout > 0:
            raise LoopcoderError(f"queue_timeout must be > 0, got {queue_timeout}")
        self.engine = engine
        self.max_batch = engine.max_batch
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.capacity = engine.max_batch + max_queue
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []
        self._inflight = 0  # accepted engine requests not yet ended (guarded by _cond)
        self._stopping = False
        self._deadline = math.inf
        self._alive = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        # engine-thread state
        self._tickets: dict[str, _Ticket] = {}
        self._owner: dict[str, tuple[_Ticket, int]] = {}
        self._running = self._waiting = 0
        self.counters = dict.fromkeys(
            (
                "requests",
                "completed",
                "cancelled",
                "timed_out",
                "failed",
                "rejected",
                "aborted_at_shutdown",
                "tokens",
                "steps",
                "decode_steps",
                "decoded_sequences",
            ),
            0,
        )
        self.counters["step_seconds"] = 0.0  # time inside engine.step(): busy fraction = step_seconds / wall
        self.cache: dict[str, Any] = {}  # the engine's cache figures after the last step (/health's "cache")

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._alive = True
            self._thread = threading.Thread(target=self._run, name="loopcoder-engine", daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job], deliver: Callable[[Update], None]) -> str:
        """Queue a ticket (one engine request per job); raises `APIError` 429 (full) or 503 (stopping)."""
        with self._cond:
            if self._stopping or not self._alive:
                raise shutting_down()
            if self._inflight + len(jobs) > self.capacity:
                self.counters["rejected"] += 1
                raise APIError(
                    429,
                    f"the server is busy ({self._running} running, {self._waiting} waiting; at most "
                    f"{self.max_batch} + {self.max_queue}); retry later",
                    type="rate_limit_error",
                    code="queue_full",
                )
            tid = f"t{next(self._ids)}"
            self._inflight += len(jobs)
            self.counters["requests"] += 1
            self._inbox.append(("add", _Ticket(tid, jobs, deliver, time.monotonic())))
            self._cond.notify()
        return tid

    def cancel(self, ticket_id: str) -> None:
        """Abort a ticket's requests (the client went away): their slots free before the next step."""
        with self._cond:
            self._inbox.append(("cancel", ticket_id))
            self._cond.notify()

    def begin_shutdown(self, grace: float) -> None:
        """Stop admitting; let in-flight requests run for `grace` seconds, then abort what is left."""
        with self._cond:
            self._stopping = True
            self._deadline = min(self._deadline, time.monotonic() + max(0.0, grace))
            self._cond.notify()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the engine thread to exit (after `begin_shutdown`); True if it did."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def accepting(self) -> bool:
        return self._alive and not self._stopping

    def stats(self) -> dict[str, Any]:
        with self._cond:
            pending = sum(len(t.jobs) for kind, t in self._inbox if kind == "add")
            return {
                "running": self._running,
                "waiting": self._waiting + pending,
                "inflight": self._inflight,
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "accepting": self.accepting,
                "engine_thread_alive": self._thread is not None and self._thread.is_alive(),
                **self.counters,
                "cache": self.cache,
            }

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self.engine.has_work() and not self._stopping:
                        self._cond.wait()
                    inbox, self._inbox = self._inbox, []
                    stopping, deadline = self._stopping, self._deadline
                for kind, arg in inbox:
                    if kind == "add":
                        self._add(arg)
                    else:
                        self._cancel(arg)
                now = time.monotonic()
                if stopping and now >= deadline:
                    for t in list(self._tickets.values()):
                        self._end(t, shutting_down(), "aborted_at_shutdown")
                else:
                    self._expire(now)
                if self.engine.has_work():
                    self._step()
                self._publish()
                if stopping and not self.engine.has_work():
                    with self._cond:
                        if not self._inbox:
                            break
        except Exception:  # a bug here must not leave clients waiting forever
            log.exception("the engine thread failed")
        finally:
            with self._cond:
                self._alive = False
                inbox, self._inbox = self._inbox, []
            for kind, arg in inbox:
                if kind == "add":
                    self._tickets[arg.id] = arg
                    arg.live = set(range(len(arg.jobs)))
            for t in list(self._tickets.values()):
                self._end(t, shutting_down(), "aborted_at_shutdown", abort=False)
            self._publish()

    def _add(self, t: _Ticket) -> None:
        self._tickets[t.id] = t
        for i, job in enumerate(t.jobs):
            rid = f"{t.id}-{i}"
            try:
                t.requests[i] = self.engine.add_request(job.prompt_ids, job.params, rid)
            except LoopcoderError as e:  # the handler validated; this is the engine's last word
                t.live |= set(range(i, len(t.jobs)))
                self._end(t, APIError(400, str(e)), "failed")
                return
            self._owner[rid] = (t, i)
            t.live.add(i)

    def _cancel(self, ticket_id: str) -> None:
        t = self._tickets.get(ticket_id)
        if t is not None:
            self._end(t, APIError(499, "the request was cancelled", code="cancelled"), "cancelled")

    def _end(self, t: _Ticket, error: APIError, counter: str, abort: bool = True) -> None:
        """End a ticket's remaining choices with `error`, freeing their slots or queue places."""
        for i in sorted(t.live):
            rid = f"{t.id}-{i}"
            if abort:
                self.engine.abort(rid)
            self._owner.pop(rid, None)
            self._deliver(t, Update(i, error=error))
        with self._cond:
            self._inflight -= len(t.live)
        t.live.clear()
        self._tickets.pop(t.id, None)
        self.counters[counter] += 1

    def _expire(self, now: float) -> None:
        for t in list(self._tickets.values()):  # a slot is enough: a long prompt's chunked prefill takes steps
            admitted = sum(r.admitted >= 0 for r in t.requests.values())  # the engine's events come only from these
            if admitted < len(t.jobs) and now - t.submitted > self.queue_timeout:
                self._end(
                    t,
                    APIError(
                        503,
                        f"the request waited more than {self.queue_timeout:g} s for a free slot; retry later",
                        code="queue_timeout",
                    ),
                    "timed_out",
                )

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception:  # e.g. out of memory: fail the requests in flight, keep serving
            log.exception("engine step failed")
            err = APIError(
                500, "generation failed: the engine step failed (details in the server log)", code="internal_error"
            )
            for t in list(self._tickets.values()):
                self._end(t, err, "failed")
            return
        self.counters["steps"] += 1
        self.counters["step_seconds"] += time.perf_counter() - start
        self.counters["decode_steps"] = self.engine.steps  # the batch size of decoding: decoded / decode steps
        self.counters["decoded_sequences"] = self.engine.decoded
        self.cache = self.engine.cache_stats()  # read here, in the engine thread, so that it is consistent
        for ev in events:
            owner = self._owner.get(ev.request.id)
            if owner is None:
                continue
            t, i = owner
            if (
                ev.error is not None
            ):  # this request alone failed: its ticket ends, the others go on (the engine logged why)
                why = ev.request.failure or "see the server log"
                self._end(t, APIError(500, f"generation failed: {why}", code="generation_failed"), "failed")
                continue
            self.counters["tokens"] += len(ev.token_ids)
            finish = None
            if ev.finished:
                finish = ev.request.finish_reason
                del self._owner[ev.request.id]
                t.live.discard(i)
                with self._cond:
                    self._inflight -= 1
            # the engine's lists are fresh per event
            self._deliver(t, Update(i, ev.text, ev.token_ids, finish, None, ev.logprobs, ev.prompt_logprobs))
            if ev.finished and not t.live:
                self._tickets.pop(t.id, None)
                self.counters["completed"] += 1

    def _publish(self) -> None:
        with self._cond:
            self._running, self._waiting = self.engine.num_running, self.engine.num_waiting

    @staticmethod
    def _deliver(t: _Ticket, update: Update) -> None:
        try:
            t.deliver(update)
        except Exception:  # the client's event loop is gone (server stopping): nobody to tell
            log.debug("could not deliver an update for ticket %s", t.id, exc_info=True)
