"""``litliger serve``: an OpenAI-compatible HTTP server for a checkpoint, with requests decoded together.

- ``batcher.py``: the one decoding thread. Requests that arrive together share one left-padded KV cache and one
  forward per token (continuous batching: a request joins the running batch at the next step, a finished or
  abandoned one leaves it at once).
- ``schemas.py``: the OpenAI request bodies (what is accepted, what is refused and why).
- ``app.py``: the FastAPI application (routes, streaming as server-sent events, errors in OpenAI's shape, the API
  key, the body limit).
- ``server.py``: the command (uvicorn, startup lines, clean shutdown on Ctrl-C / SIGTERM).
"""
