"""`gill serve`: an OpenAI-compatible HTTP server in front of `GILLPipeline` (docs/serve.md).

`jobs.py` is the contract between the HTTP layer (`app.py` with `requests.py`, `responses.py`, `errors.py`,
`settings.py`, `files.py`; run by `server.py`) and the engine that runs the pipeline (`engine.py`: dynamic batching,
the prefix cache; `serial_engine.py`: one job at a time). Nothing here is imported by `import gill_pipeline`, so the
`serve` extra (fastapi, uvicorn) is needed only by who serves.
"""
