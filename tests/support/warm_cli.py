"""A warm `loopcoder` for tests that run many commands (tests/test_docs.py). One process imports the
package and what every command runs once (torch and transformers: about 5 s of CPU per command
otherwise) and forks a child per command, which runs `loopcoder.cli.main(argv)` as the console script
does (or a Python script, as `python FILE` does), with the caller's working directory, environment,
stdin, stdout and stderr.

    python warm_cli.py serve SOCKET              the warm process (stop it with SIGTERM)
    python warm_cli.py run SOCKET ARGS...        one `loopcoder ARGS...`: what a shim on PATH runs
    python warm_cli.py script SOCKET FILE        one `python FILE`

`run` and `script` exit with the command's status and pass SIGTERM and SIGINT on to it. The server is
single-threaded (a select loop that also reaps the children), so a fork never copies a lock held by
another thread, and it runs no torch operation itself, so no thread pool exists when it forks.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import json
import os
import runpy
import select
import signal
import socket
import struct
import sys
import traceback
from pathlib import Path


def run_time_modules(module: str) -> list[str]:
    """The loopcoder modules a command module imports, at its top or inside `run()` (where the heavy ones
    are, so that its `--help` stays fast): what the warm process imports once for every command."""
    origin = importlib.util.find_spec(module).origin
    found = [module]
    for node in ast.walk(ast.parse(Path(origin).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [name for name in found if name == "loopcoder" or name.startswith("loopcoder.")]


def serve(path: str) -> None:
    import loopcoder
    from loopcoder.cli import COMMANDS, main

    for command, _ in COMMANDS.values():  # the commands' own imports too, those inside run() included
        for module in run_time_modules(command):
            with contextlib.suppress(Exception):  # a missing optional extra: the command itself will say so
                importlib.import_module(module)
    loopcoder.register_auto_classes()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    children: dict[int, socket.socket] = {}  # pid -> its caller's connection
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    while not stopping:
        watched = [c for c in children.values() if c.fileno() >= 0]
        ready, _, _ = select.select([listener, *watched], [], [], 0.05)
        for conn in ready:
            if conn is listener:
                client, _ = listener.accept()
                children[_fork(client, listener, main)] = client
                continue
            pid = next(p for p, c in children.items() if c is conn)
            data = conn.recv(4)  # a signal to pass on; nothing: the caller went away
            os.kill(pid, struct.unpack("i", data)[0] if len(data) == 4 else signal.SIGKILL)
            if len(data) != 4:
                conn.close()
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid)
            if conn.fileno() >= 0:
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):  # the caller may be gone
                    conn.sendall(struct.pack("i", code if code >= 0 else 128 - code))
                conn.close()
    for pid in children:
        os.kill(pid, signal.SIGKILL)


def _fork(client: socket.socket, listener: socket.socket, main) -> int:
    msg, fds, _, _ = socket.recv_fds(client, 1 << 20, 3)
    request = json.loads(msg)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid
    code = 1
    try:
        listener.close()
        client.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if request["kind"] == "script":
            sys.argv = list(request["argv"])
            sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        else:
            sys.argv = ["loopcoder", *request["argv"]]
            code = main(request["argv"])
    except SystemExit as e:  # argparse, sys.exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def call(path: str, kind: str, argv: list[str]) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = json.dumps({"kind": kind, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(conn, [request], [0, 1, 2])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: conn.sendall(struct.pack("i", s)))
    got = b""
    while len(got) < 4:
        chunk = conn.recv(4 - len(got))
        if not chunk:
            return 1
        got += chunk
    return struct.unpack("i", got)[0]


if __name__ == "__main__":
    sys.path.pop(0)  # this file's directory: its modules (support/packaging.py) would shadow installed ones
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(call(sys.argv[2], sys.argv[1], sys.argv[3:]))
