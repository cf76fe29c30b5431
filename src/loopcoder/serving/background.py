"""`loopcoder serve` inside this process: the same app and graceful server, on a free loopback port, in a thread.

For commands that drive a model through its HTTP API exactly as an outside client would (`loopcoder bfcl --model`),
and for the tests' live servers.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from loopcoder.serving.scheduler import Scheduler
from loopcoder.serving.server import bind, make_server
from loopcoder.utils.errors import LoopcoderError


class BackgroundServer:
    """`GracefulServer` on 127.0.0.1 (a free port) in a daemon thread; a context manager that stops it on exit."""

    def __init__(
        self, app: Any, scheduler: Scheduler, grace: float = 5.0, log_level: str = "warning", **limits
    ) -> None:
        self.scheduler = scheduler
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(app, scheduler, grace=grace, log_level=log_level, **limits)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.sock.close()
                raise LoopcoderError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
        if self.thread.is_alive():
            raise LoopcoderError("the in-process server did not stop")
