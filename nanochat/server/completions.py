"""One API request's life: take a worker (or wait, or get a 429), generate on the worker's thread, watch for the client
going away, and shape the results as OpenAI chat/text completions, streamed as SSE or returned whole.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from starlette.requests import Request

from nanochat.engine import SamplingParams
from nanochat.server.errors import APIError
from nanochat.server.generation import Outcome, Step
from nanochat.server.workers import Worker, WorkerPool

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Shape:
    """How the chunks of one endpoint look: chat.completion(.chunk) or text_completion."""
    chat: bool
    model_id: str
    request_id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.request_id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)

    def envelope(self, choices: list[dict], stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model_id,
                "system_fingerprint": None, "choices": choices}

    def delta_choice(self, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def whole_choice(self, index: int, text: str, finish_reason: str) -> dict:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_failure(lines: list[str]) -> str | None:
    """The client's view of `stream()`'s contract: why an SSE body did not complete (an error event, or no
    [DONE] at the end), or None when it did. The soak, the fuzzers and bench/server.py judge streams by it."""
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    for event in events:
        if event != "[DONE]" and "error" in json.loads(event):
            return f"error event: {event[:300]}"
    if not events or events[-1] != "[DONE]":
        return f"ended without [DONE]: {events[-3:]}"
    return None


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so the next ASGI message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class Generation:
    """One request's generation: `acquire()` takes a worker (or waits, or 429s), `start()` runs on it; steps and
    the final Outcome arrive on `events`; `stop()` cancels it and `close()` also gives back an unused worker."""

    def __init__(self, pool: WorkerPool, request: Request):
        self.pool = pool
        self.request = request
        self.prompt_ids: list[int] = []
        self.params: SamplingParams | None = None
        self.events: asyncio.Queue[Step | Outcome | None] = asyncio.Queue()
        self.worker: Worker | None = None
        self.cancel = None
        self.watcher: asyncio.Task | None = None
        self.outcome: Outcome | None = None  # set when the generation ends; stays None if the client left first

    async def acquire(self) -> bool:
        """Take a worker; False if the client left while queued. Raises 429 when the queue is full."""
        self.watcher = asyncio.ensure_future(wait_for_disconnect(self.request))
        acquiring = asyncio.ensure_future(self.pool.acquire())
        await asyncio.wait({acquiring, self.watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not acquiring.done():
            acquiring.cancel()
            await asyncio.gather(acquiring, return_exceptions=True)
            return False
        try:
            self.worker = acquiring.result()  # re-raises the 429
        except BaseException:
            self.close()
            raise
        return True

    def start(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.prompt_ids, self.params = prompt_ids, params
        self.cancel = self.pool.start(self.worker, prompt_ids, params, self.events.put_nowait, self.events.put_nowait)
        self.watcher.add_done_callback(lambda _: self.on_client_gone())

    def on_client_gone(self) -> None:
        if self.watcher is not None and not self.watcher.cancelled():
            self.stop()
            self.events.put_nowait(None)

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel.set()

    def close(self) -> None:
        self.stop()
        if self.worker is not None and self.cancel is None:  # acquired but never started: the pool gets it back
            self.pool.release(self.worker)
            self.worker = None
        if self.watcher is not None and not self.watcher.done():
            self.watcher.cancel()

    async def steps(self) -> AsyncIterator[Step]:
        """Yields steps until the generation ends (then `self.outcome` is set) or the client goes away."""
        while True:
            event = await self.events.get()
            if event is None:
                return
            if isinstance(event, Outcome):
                self.outcome = event
                return
            yield event


async def collect(generation: Generation, shape: Shape, on_finish: Callable[[list[str], Outcome], None]) -> dict | None:
    """Run to the end and build the non-streamed response (None when the client left)."""
    texts = [""] * generation.params.num_samples
    reasons = ["length"] * generation.params.num_samples
    try:
        async for step in generation.steps():
            for i, delta in enumerate(step.deltas):
                texts[i] += delta
            for i, reason in step.finished.items():
                reasons[i] = reason
    finally:
        generation.close()
    outcome = generation.outcome
    if outcome is None:
        return None
    if outcome.error is not None:
        raise APIError(500, f"generation failed: {type(outcome.error).__name__}; see the server log",
                       code="generation_failed")
    on_finish(texts, outcome)
    body = shape.envelope([shape.whole_choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))], False)
    body["usage"] = usage(len(generation.prompt_ids), outcome.completion_tokens)
    return body


async def stream(generation: Generation, shape: Shape, include_usage: bool,
                 on_finish: Callable[[list[str], Outcome], None]) -> AsyncIterator[str]:
    """SSE: a role chunk (chat), content deltas, a finish chunk per choice, the usage chunk if asked, [DONE].
    A generation that fails ends with one error event instead of the usage chunk and [DONE]."""
    texts = [""] * generation.params.num_samples
    extra = {"usage": None} if include_usage else {}
    try:
        if shape.chat:
            yield sse(shape.envelope([shape.delta_choice(i, "", None, role=True) for i in range(len(texts))],
                                     True) | extra)
        async for step in generation.steps():
            # text first, then the finish reasons in their own chunk: one entry per choice index per chunk
            choices = [shape.delta_choice(i, delta, None) for i, delta in enumerate(step.deltas) if delta]
            finishes = [shape.delta_choice(i, None if shape.chat else "", reason)
                        for i, reason in step.finished.items()]
            for i, delta in enumerate(step.deltas):
                texts[i] += delta
            for chunk_choices in (choices, finishes):
                if chunk_choices:
                    yield sse(shape.envelope(chunk_choices, True) | extra)
        outcome = generation.outcome
        if outcome is None:
            return
        if outcome.error is not None:
            # an error event and no [DONE]: clients (the openai library, the soak) then see a failure, not an end
            yield sse({"error": {"message": f"generation failed: {type(outcome.error).__name__}; see the server log",
                                 "type": "server_error", "param": None, "code": "generation_failed"}})
            return
        on_finish(texts, outcome)
        if include_usage:
            yield sse(shape.envelope([], True) | {"usage": usage(len(generation.prompt_ids),
                                                                outcome.completion_tokens)})
        yield sse("[DONE]")
    finally:
        generation.close()
