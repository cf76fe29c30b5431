"""Connection limits under uvicorn: a deadline for request headers and a cap on open connections.

uvicorn closes idle keep-alive connections, but it waits forever for a client that sends its request
line and headers a byte at a time (slowloris), and it accepts every connection. `guarded_protocol`
is uvicorn's h11 protocol with both limits: a connection whose next request's headers are not complete
`header_timeout` seconds after it opened (or after its previous response) gets a 408 and is closed.
When `max_connections` are open, a new connection first takes the place of an idle one (one that has sent
nothing since it opened, the longest idle first; then one idle between requests), so that idle connections
cannot lock clients (and `/health` probes) out; with none idle, it gets a 503 at once and is closed. The body
has its own deadline (`ServerSettings.body_timeout`), enforced where the app reads it. Every close lingers a
moment (`LingeringTransport`), so that a client still sending gets its response rather than a reset; a peer
that is already gone costs nothing but a debug line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from loopcoder.serving.protocol import APIError

log = logging.getLogger("loopcoder.serve")
LINGER = 1.0  # seconds a closing connection is drained before its socket closes


def _raw_response(status: int, reason: str, err: APIError) -> bytes:
    body = json.dumps(err.body()).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


class _RateLimitedLog:
    """One log line per `every` seconds at most: an attack must not flood the log."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.last = -float("inf")
        self.suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.suppressed += 1
            return
        more = f" (and {self.suppressed} more since the last such line)" if self.suppressed else ""
        log.warning(message + more, *args)
        self.last, self.suppressed = now, 0


class LingeringTransport:
    """A connection's transport whose `close()` half-closes, reads and drops what the client still sends
    for `LINGER` seconds, then closes. Closing a socket with unread bytes makes the kernel reset the
    connection, and a client that is still sending (a slow body that got its 408) could lose the response."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self.lingering = False

    def __getattr__(self, name: str) -> Any:  # everything else is the real transport's
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if not self.lingering:
            self._transport.write(data)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        self.lingering = True
        self._half_close(self._loop.time() + LINGER)
        self._loop.call_later(LINGER, self._transport.close)

    def close_now(self) -> None:
        """Close without lingering (a connection that sent nothing has nothing in flight to drain)."""
        self.lingering = True
        self._transport.close()

    def _half_close(self, deadline: float) -> None:
        """Send our FIN once the response has left the buffer. (`write_eof` with data still buffered shuts the socket
        down later, inside asyncio, where the OSError of a peer already gone would be logged as a traceback.)"""
        t = self._transport
        if t.is_closing():
            return
        if t.get_write_buffer_size():
            if self._loop.time() < deadline:
                self._loop.call_later(0.01, self._half_close, deadline)
            return
        try:
            if t.can_write_eof():
                t.write_eof()
        except OSError as e:  # ENOTCONN, ECONNRESET: the peer is gone, there is nothing to linger for
            log.debug("closing a connection whose peer is gone: %s", e)
            t.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with a header deadline, a connection cap and lingering closes (pass it
    as `http=`)."""
    timeout_response = _raw_response(
        408,
        "Request Timeout",
        APIError(408, f"the request headers did not arrive within {header_timeout:g} s", code="header_timeout"),
    )
    full_response = _raw_response(
        503,
        "Service Unavailable",
        APIError(
            503, f"too many open connections (at most {max_connections}); retry later", code="too_many_connections"
        ),
    )
    slow_log, full_log, evict_log = _RateLimitedLog(), _RateLimitedLog(), _RateLimitedLog()

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _header_cycle: Any = None
        # idle: nothing received since the connection opened or since its last response (None: busy, or closing)
        _idle_since: float | None = None
        _served = 0  # responses completed on this connection

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(LingeringTransport(transport, self.loop))  # type: ignore[arg-type]
            if len(self.connections) > max_connections and not self._evict_an_idle_connection():
                full_log.warning(
                    "connection limit reached (%d open, none idle): refusing new connections with 503",
                    max_connections,
                )
                self.transport.write(full_response)
                self.transport.close()
                return
            self._idle_since = time.monotonic()
            self._arm_header_deadline()

        def _evict_an_idle_connection(self) -> bool:
            """Close the connection that has been idle longest, those that never sent a byte first; False if none is."""
            idle = [c for c in self.connections if c is not self and getattr(c, "_idle_since", None) is not None]
            if not idle:
                return False
            victim = min(idle, key=lambda c: (c._served > 0, c._idle_since))
            evict_log.warning(
                "connection limit reached (%d open): closed a connection idle for %.1f s to admit a new one",
                max_connections,
                time.monotonic() - victim._idle_since,
            )
            victim._idle_since = None
            victim._close_idle()
            return True

        def _close_idle(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            if self.conn.our_state is h11.IDLE:  # no response under way
                self.conn.send(h11.ConnectionClosed())
            self.transport.close_now()

        def data_received(self, data: bytes) -> None:
            self._idle_since = None
            if not self.transport.lingering:  # answered and closing: what still arrives is dropped
                super().data_received(data)

        def on_response_complete(self) -> None:
            # armed before the base class starts a pipelined request, whose cycle then differs from this one
            self._arm_header_deadline()
            self._served += 1
            super().on_response_complete()
            waiting = self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE  # no pipelined request
            self._idle_since = time.monotonic() if waiting and not self.transport.is_closing() else None

        def connection_lost(self, exc: Exception | None) -> None:
            self._idle_since = None
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_cycle = self.cycle  # a new request replaces it once its headers are complete
            self._header_timer = self.loop.call_later(header_timeout, self._header_deadline_passed)

        def _header_deadline_passed(self) -> None:
            self._header_timer = None
            if self.cycle is self._header_cycle and not self.transport.is_closing():
                self._idle_since = None
                slow_log.warning(
                    "closed a connection from %s: no complete request headers within %g s",
                    f"{self.client[0]}:{self.client[1]}" if self.client else "?",
                    header_timeout,
                )
                self.transport.write(timeout_response)
                self.transport.close()

    return GuardedH11Protocol
