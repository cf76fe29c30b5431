"""Defaults that a heavy module uses and the command line shows in `--help`. They live here, in a
module that imports nothing, so that `loopcoder CMD --help` builds its parser without importing torch
(the engine) or the serving stack, and the two cannot drift apart."""

from __future__ import annotations

# the engine (engine.py)
DEFAULT_STEP_TOKENS = 256  # per-step token budget: decoding tokens plus prefill chunks
DEFAULT_BLOCK_SIZE = 16  # positions per K/V block of the paged cache

# the server (serving/server.py, serving/app.py)
HEADER_TIMEOUT = 10.0  # seconds a client may take to send a request's line and headers
BODY_TIMEOUT = 30.0  # seconds a client may take to send a request body (then 408)
MAX_CONNECTIONS = 512  # open connections; more are refused with 503
