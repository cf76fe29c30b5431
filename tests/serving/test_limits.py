"""Connection limits, as a hostile or broken client meets them over raw sockets: a slow request line and
headers (slowloris), a slow body, too many connections, and a client that leaves in the middle of its body."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import select
import socket
import struct
import time

import httpx
import pytest

from loopcoder.serving.limits import LINGER, LingeringTransport
from support.serving import LiveServer, scripted_app

TIMEOUT = 1.0  # the test servers' header and body timeouts (seconds)


@pytest.fixture(scope="module")
def strict(loaded):
    """Header and body timeouts of 1 s."""
    app, scheduler, _ = scripted_app(*loaded, body_timeout=TIMEOUT)
    with LiveServer(app, scheduler, header_timeout=TIMEOUT, log_level="info") as server:
        yield server


def connect(server: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def trickle_until_answered(
    sock: socket.socket, head: bytes, limit: float = 8.0, start: float | None = None
) -> tuple[bytes, float]:
    """Send `head`, then one more byte every 0.2 s (never completing anything) until the server answers
    and closes. Returns (everything it sent, seconds from `start` (default: now) until it closed)."""
    start = time.monotonic() if start is None else start
    sock.sendall(head)
    got = b""
    while time.monotonic() - start < limit:
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # closed while our trickle was still arriving: as good as EOF
                chunk = b""
            if not chunk:
                return got, time.monotonic() - start
            got += chunk
            continue
        with contextlib.suppress(OSError):  # closed under us: read what came before
            sock.sendall(b"a")
    raise AssertionError(f"the server kept the connection open for {limit} s; it sent {got!r}")


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_slow_headers_get_408_and_the_connection_closes_in_bounded_time(strict):
    socks = [(connect(strict), time.monotonic()) for _ in range(3)]
    try:
        for s, opened in socks:  # each deadline runs from its connection
            raw, seconds = trickle_until_answered(
                s, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ", start=opened
            )
            assert TIMEOUT * 0.8 < seconds < TIMEOUT + 3, seconds
            status, body = status_and_body(raw)
            assert status == 408 and body["error"]["code"] == "header_timeout"
    finally:
        for s, _ in socks:
            s.close()
    # a connection that sends nothing at all is closed too, and the server goes on serving
    with connect(strict) as idle:
        assert trickle_until_answered(idle, b"")[1] < TIMEOUT + 3
    assert httpx.get(strict.url + "/health", timeout=10).status_code == 200


def test_a_slow_body_gets_408_naming_the_limit_and_costs_one_log_line(strict):
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"prompt": "'
    )
    with captured_lines() as lines, connect(strict) as s:
        raw, seconds = trickle_until_answered(s, head)
        time.sleep(LINGER + 0.5)  # the close, and anything it would log, is done
    assert len(lines) == 1 and "did not arrive within" in lines[0], "\n".join(lines)
    assert TIMEOUT * 0.8 < seconds < TIMEOUT + 3, seconds
    status, body = status_and_body(raw)
    assert status == 408 and body["error"]["code"] == "body_timeout" and f"{TIMEOUT:g} s" in body["error"]["message"]
    r = httpx.post(strict.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


def test_a_request_that_takes_its_time_but_stays_within_the_limits_is_served(strict):
    body = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    with connect(strict) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        time.sleep(TIMEOUT / 2)
        s.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        time.sleep(TIMEOUT / 2)  # headers and body each within their own limit
        s.sendall(body[5:])
        raw = s.recv(65536)
    assert raw.startswith(b"HTTP/1.1 200"), raw


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    raw = b""
    while chunk := sock.recv(65536):
        raw += chunk
    return raw


def closed_by_server(sock: socket.socket, within: float = 5.0) -> bool:
    """The server closed `sock` (what it still had to read of an earlier response is skipped)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_beyond_the_cap_get_503_at_once_when_none_is_idle(loaded):
    app, scheduler, _ = scripted_app(*loaded)
    with LiveServer(app, scheduler, max_connections=3) as server:
        held = [connect(server) for _ in range(3)]
        try:
            for s in held:  # each is in the middle of a request: none may be closed to make room
                s.sendall(b"GET /health HTTP/1.1\r\n")
            time.sleep(0.2)  # received by the server
            with connect(server) as extra:
                start = time.monotonic()
                raw = read_all(extra)
                assert time.monotonic() - start < 2
            status, body = status_and_body(raw)
            assert status == 503 and body["error"]["code"] == "too_many_connections"
            held[0].sendall(b"Host: x\r\n\r\n")  # the held ones are served
            assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 5
        while len(server.server.server_state.connections) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # room again


def test_idle_connections_give_way_and_health_answers_while_they_hold_the_cap(loaded):
    """Connections that send nothing used to hold the cap until their header timeout: /health answered 503 for
    10 s. Now a new connection takes an idle one's place: those that never sent a byte go first (longest idle
    first), then those idle between requests; a connection in the middle of a request is never closed."""
    app, scheduler, _ = scripted_app(*loaded)
    with LiveServer(app, scheduler, max_connections=3) as server:
        idle = [connect(server) for _ in range(3)]
        try:
            time.sleep(0.2)
            for k in range(3):  # each probe takes the place of the longest idle one, which another refills
                r = httpx.get(server.url + "/health", timeout=5)  # a new connection, closed after its answer
                assert r.status_code == 200 and r.json()["status"] == "ok"
                assert closed_by_server(idle[k])
                idle.append(connect(server))
                time.sleep(0.2)
        finally:
            for s in idle:
                s.close()
        time.sleep(0.3)

        kept_alive, silent, busy = connect(server), connect(server), connect(server)
        busy2 = None
        try:
            kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # served, then idle between requests
            assert kept_alive.recv(65536).startswith(b"HTTP/1.1 200")
            busy.sendall(b"GET /health HTTP/1.1\r\n")  # headers under way
            time.sleep(0.2)
            with connect(server) as newcomer:  # the silent one goes, though the kept-alive one is idle longer
                newcomer.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_all(newcomer).startswith(b"HTTP/1.1 200")
            assert closed_by_server(silent)
            wait_for_connections(server, 2)  # the kept-alive and the busy one
            busy2 = connect(server)
            busy2.sendall(b"GET /health HTTP/1.1\r\n")
            time.sleep(0.2)
            with connect(server) as second:  # no silent one left: the kept-alive one goes, the busy ones stay
                second.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_all(second).startswith(b"HTTP/1.1 200")
            assert closed_by_server(kept_alive)
            for s in (busy, busy2):
                s.sendall(b"Host: x\r\n\r\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
        finally:
            for s in (kept_alive, silent, busy, busy2):
                if s is not None:
                    s.close()


def wait_for_connections(server: LiveServer, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(server.server.server_state.connections) != n:
        assert time.monotonic() < deadline, f"{len(server.server.server_state.connections)} connections open"
        time.sleep(0.05)


class Lines(logging.Handler):
    """Every line the server's loggers write (a traceback counts its lines)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += self.format(record).splitlines()


@contextlib.contextmanager
def captured_lines():
    """The lines the server's loggers (uvicorn's, ours, asyncio's) write meanwhile, at INFO as `loopcoder serve`
    runs (another test's server may have set warning)."""
    lines = Lines()
    loggers = [logging.getLogger(n) for n in ("uvicorn", "loopcoder", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(lines)
        lg.setLevel(logging.INFO)
    try:
        yield lines.lines
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(lines)
            lg.setLevel(level)


def test_a_client_that_leaves_mid_body_costs_one_log_line(strict):
    with captured_lines() as lines:
        with connect(strict) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"prompt": "abc'
            )
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything else it would log comes right after
    assert len(lines) == 1, "\n".join(lines)
    assert "disconnected while sending its request body" in lines[0]
    assert strict.health()["failed"] == 0


def test_closing_a_connection_whose_peer_is_gone_raises_nothing():
    """The 408 path closes with a half-close (write_eof) so that a slow client still gets its answer. When the
    client has already reset the connection and the server was not reading (uvicorn pauses reading under flow
    control), write_eof raised OSError ENOTCONN, which the server logged as a traceback. Now the transport just
    closes."""

    async def scenario() -> tuple[bool, list]:
        loop = asyncio.get_running_loop()
        errors: list = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        made = loop.create_future()

        class Quiet(asyncio.Protocol):
            def connection_made(self, transport):
                made.set_result(transport)

        server = await loop.create_server(Quiet, "127.0.0.1", 0)
        client = socket.create_connection(server.sockets[0].getsockname()[:2])
        transport = await made
        transport.pause_reading()
        lingering = LingeringTransport(transport, loop)
        lingering.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # the answer goes out
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # then the client resets the connection, which the server does not read
        await asyncio.sleep(0.2)
        lingering.close()
        await asyncio.sleep(LINGER + 0.5)
        server.close()
        return transport.is_closing(), errors

    closed, errors = asyncio.run(scenario())
    assert closed and errors == []
