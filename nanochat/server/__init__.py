"""The OpenAI-compatible server behind `python -m scripts.chat_web`: `create_app(load, settings)` builds the
FastAPI app (API + the browser UI in nanochat/ui), `load_workers(...)` turns a checkpoint into workers.

    app.py         routes, CORS, health/models/stats, conversation log
    guard.py       before routing: Host check (DNS rebinding), API key, body size cap (413)
    schemas.py     request models and their limits (400s come from here)
    errors.py      OpenAI's {"error": {...}} shape for every failure
    completions.py one request: worker, disconnect watch, SSE chunks or a whole response
    workers.py     the worker pool, the bounded queue (429) and /stats counters
    generation.py  the engine loop in a worker thread, cancellable per step
    loading.py     checkpoint -> workers (one replica per GPU)
"""
from nanochat.server.app import LoadedModel, ServerSettings, create_app

__all__ = ["LoadedModel", "ServerSettings", "create_app"]
