"""`loopcoder serve`: the OpenAI-compatible HTTP server around the parallel-loop engine.

`scheduler` owns the engine in one thread (continuous batching, admission, shutdown), `app` is the
FastAPI layer (validation, streaming, auth), `protocol` the request schemas and error bodies,
`tool_calls` the pluggable tool-call parser, `server` the assembly and uvicorn glue.
"""
