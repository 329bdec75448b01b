"""`gill serve`: an OpenAI-compatible HTTP server in front of `GILLPipeline` (docs/serve.md).

`jobs.py` is the contract between the HTTP layer (request parsing, OpenAI's JSON and server-sent events) and the
engine that runs the pipeline (dynamic batching, the prefix cache, cancellation).
"""
