"""The FastAPI app: `create_app(load, settings)` serves the browser UI and the OpenAI-compatible API.

`load` runs in a background thread at startup (so /health can answer 503 while a large model loads) and
returns a `LoadedModel`: one engine per worker plus the tokenizer and what /v1/models reports.
Nothing is loaded at import time.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from nanochat.engine import SamplingParams
from nanochat.server.errors import APIError, install_error_handlers
from nanochat.server.guard import RequestGuard, key_matches
from nanochat.server.generation import Outcome
from nanochat.server.completions import SSE_HEADERS, Generation, Shape, collect, stream
from nanochat.server.schemas import (ChatCompletionRequest, CompletionRequest, SamplingRequest, TokenizeRequest,
                                     plain_messages)
from nanochat.server.workers import Worker, WorkerPool

logger = logging.getLogger("nanochat.server")
CLIENT_GONE = 499  # nginx's status for "client closed the request"; only the access log ever sees it


@dataclass
class ServerSettings:
    api_key: str | None = None  # Bearer token for everything but /health and the static page; None = open
    cors_origins: list[str] = field(default_factory=list)  # empty = no CORS headers at all
    max_queue: int = 16  # requests that may wait for a worker; one more gets 429
    default_max_tokens: int = 1024  # when a request names none (still capped by the context left)
    log_dir: Path | None = None  # conversation log (JSONL per day); None = nothing is logged
    allowed_hosts: list[str] = field(default_factory=list)  # Host names served without a key, besides loopback
    max_body_bytes: int = 4 << 20  # larger request bodies get 413 before they are read


@dataclass
class LoadedModel:
    workers: list[Worker]
    tokenizer: object
    max_seq_len: int
    model_id: str
    info: dict  # source, tag, step: shown by /v1/models and the UI


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """What the model reads before its reply; /v1/chat/completions and /v1/tokenize count the same ids."""
    return tokenizer.render_for_completion({"messages": messages})


def text_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """What a base model continues; /v1/completions and /v1/tokenize count the same ids."""
    return tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)


def ui_dir() -> Path:
    return Path(str(resources.files("nanochat") / "ui"))


class ConversationLog:
    """Appends one JSON line per finished request to log_dir/conversations-YYYY-MM-DD.jsonl."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def write(self, record: dict) -> None:
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self.lock:
            # one O_APPEND write per record: concurrent requests never interleave inside a line
            fd = os.open(self.directory / f"conversations-{day}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


def create_app(load: Callable[[], LoadedModel], settings: ServerSettings | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state: dict = {"model": None, "pool": None, "error": None, "started": time.time()}
    conversation_log = ConversationLog(settings.log_dir) if settings.log_dir else None

    def load_in_background() -> None:
        try:
            model = load()
            state["pool"] = WorkerPool(model.workers, model.tokenizer, settings.max_queue)
            state["model"] = model
            logger.info("model %s ready on %d worker(s)", model.model_id, len(model.workers))
        except BaseException as exc:  # reported by /health and handed to the caller, never swallowed
            state["error"] = exc
            logger.error("loading the model failed: %s", exc)
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load_in_background, name="nanochat-load", daemon=True).start()
        yield

    # no /docs or /redoc: FastAPI builds them from a CDN, and this server must work offline (/openapi.json stays)
    app = FastAPI(title="nanochat", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible chat and completion API for a nanochat checkpoint")
    install_error_handlers(app)
    # added before CORS, so CORS wraps it and answers a browser's preflight (which carries no key) itself
    app.add_middleware(RequestGuard, api_key=settings.api_key, allowed_hosts=settings.allowed_hosts,
                       max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def ready() -> tuple[LoadedModel, WorkerPool]:
        if state["model"] is None:
            reason = f"model failed to load: {state['error']}" if state["error"] else "model is still loading"
            raise APIError(503, f"{reason}; check GET /health", code="model_not_ready",
                           headers={"Retry-After": "5"})
        return state["model"], state["pool"]

    def sampling_params(body: SamplingRequest, prompt_tokens: int, max_seq_len: int, param: str) -> SamplingParams:
        """Checked before any byte is streamed: the prompt plus the completion must fit the context."""
        room = max_seq_len - prompt_tokens
        requested = body.requested_max_tokens()
        max_tokens = requested if requested is not None else min(settings.default_max_tokens, room)
        if max_tokens < 1 or prompt_tokens + max_tokens > max_seq_len:
            raise APIError(400, f"this model's context is {max_seq_len} tokens, but the request needs "
                                f"{prompt_tokens + max(max_tokens, 1)}: {prompt_tokens} in the prompt + "
                                f"{max(max_tokens, 1)} to generate; shorten the {param} or lower max_tokens",
                           code="context_length_exceeded", param=param)
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                              seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
                              stop=body.stop, num_samples=body.n)

    async def tokenize_in_queue(request: Request, tokenize: Callable[[object], list[int]]
                                ) -> tuple[Generation, list[int]] | None:
        """A worker, then the prompt's ids; None if the client left while queued. Tokenized only once a worker is
        ours, off the event loop: max_queue then bounds this CPU work too. The caller starts or closes the
        generation."""
        model, pool = ready()
        generation = Generation(pool, request)
        if not await generation.acquire():
            return None
        try:
            return generation, await asyncio.to_thread(tokenize, model.tokenizer)
        except BaseException:
            generation.close()
            raise

    async def serve(request: Request, body: SamplingRequest, tokenize: Callable[[object], list[int]], chat: bool,
                    logged: dict):
        model, _ = ready()
        taken = await tokenize_in_queue(request, tokenize)
        if taken is None:
            return Response(status_code=CLIENT_GONE)
        generation, prompt_ids = taken
        try:
            params = sampling_params(body, len(prompt_ids), model.max_seq_len, "messages" if chat else "prompt")
        except BaseException:
            generation.close()
            raise
        shape = Shape(chat=chat, model_id=model.model_id)

        def on_finish(texts: list[str], outcome: Outcome) -> None:
            if conversation_log is not None:
                conversation_log.write({"time": datetime.now(timezone.utc).isoformat(), "id": shape.request_id,
                                        **logged, "replies": texts, "completion_tokens": outcome.completion_tokens})

        generation.start(prompt_ids, params)
        if body.stream:
            return StreamingResponse(stream(generation, shape, body.include_usage(), on_finish),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        result = await collect(generation, shape, on_finish)
        return JSONResponse(result) if result is not None else Response(status_code=CLIENT_GONE)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(ui_dir() / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=ui_dir()), name="ui")

    @app.get("/health", summary="200 once the model is loaded, 503 while loading or after a failed load")
    async def health(request: Request) -> JSONResponse:
        if state["model"] is not None:
            return JSONResponse({"status": "ok"})
        if state["error"] is not None:
            # the exception text may name paths and settings: only a caller holding the key (if one is set) sees it
            message = (str(state["error"]) if key_matches(settings.api_key, request.headers)
                       else "the model failed to load; see the server log")
            return JSONResponse({"status": "error", "message": message}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/v1/models", summary="the loaded checkpoint")
    async def list_models() -> dict:
        model, _ = ready()
        card = {"id": model.model_id, "object": "model", "created": int(state["started"]), "owned_by": "nanochat",
                "max_seq_len": model.max_seq_len, **model.info}
        return {"object": "list", "data": [card]}

    @app.get("/stats", summary="workers, queue, requests served, tokens/s")
    async def stats() -> dict:
        _, pool = ready()
        return pool.stats() | {"uptime_seconds": round(time.time() - state["started"], 1)}

    @app.post("/v1/chat/completions", summary="OpenAI chat completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = plain_messages(body.messages)
        return await serve(request, body, lambda tokenizer: chat_prompt_ids(tokenizer, messages),
                           chat=True, logged={"messages": messages})

    @app.post("/v1/completions", summary="raw text completion (base models)")
    async def completions(body: CompletionRequest, request: Request):
        return await serve(request, body, lambda tokenizer: text_prompt_ids(tokenizer, body.prompt),
                           chat=False, logged={"prompt": body.prompt})

    @app.post("/v1/tokenize", summary="count the prompt tokens of a chat or a raw prompt (not in OpenAI's API)")
    async def tokenize(body: TokenizeRequest, request: Request):
        model, _ = ready()
        if body.prompt is not None:
            taken = await tokenize_in_queue(request, lambda tokenizer: text_prompt_ids(tokenizer, body.prompt))
        else:
            messages = plain_messages(body.messages)
            taken = await tokenize_in_queue(request, lambda tokenizer: chat_prompt_ids(tokenizer, messages))
        if taken is None:
            return Response(status_code=CLIENT_GONE)
        generation, prompt_ids = taken
        generation.close()
        return {"count": len(prompt_ids), "max_seq_len": model.max_seq_len}

    return app
