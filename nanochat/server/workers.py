"""The worker pool: one engine (model replica) per worker, a bounded wait queue, and the counters /stats shows.

A request takes a free worker or waits in line; with `max_queue` requests already waiting it is turned away
(429 with Retry-After). Generation runs on the worker's own thread, so the event loop keeps answering /health
while workers are busy. A worker goes back to the pool only when its thread has stopped, so a client that
disconnects frees its worker once the engine notices the cancel flag (within one step).
"""
from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from typing import Callable

from nanochat.engine import SamplingParams
from nanochat.server.errors import APIError
from nanochat.server.generation import Outcome, Step, run_generation

STREAM_INTERVAL = 0.02  # seconds between text hand-overs to a stream (50 per second is smooth to the eye)


class Worker:
    """One engine and the one long-lived thread that runs its generations. Reusing the thread matters on CPU:
    torch's OpenMP pool belongs to the calling thread, so a fresh thread per request pays for a new pool (tens of
    ms before the first token) and leaves the old one behind."""

    def __init__(self, index: int, engine, device: str):
        self.index = index
        self.engine = engine
        self.device = device
        self.jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name=f"nanochat-worker-{index}", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            self.jobs.get()()


class StepRelay:
    """Hands steps from a worker thread to the event loop at most every `min_interval` seconds (the first step
    and the flush at the end at once), merging what arrives in between. A fast model then costs the loop one wake-up per
    batch of tokens instead of one per token, which keeps /health and the other streams responsive."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_step: Callable[[Step], None], min_interval: float):
        self.loop = loop
        self.on_step = on_step
        self.min_interval = min_interval
        self.lock = threading.Lock()
        self.pending: Step | None = None
        self.scheduled = False
        self.last_delivery = -math.inf

    def push(self, step: Step | None, flush: bool = False) -> None:
        """Called by the worker thread; `flush` (with or without a step) delivers whatever is pending now."""
        with self.lock:
            if step is not None:
                if self.pending is None:
                    self.pending = step
                else:
                    self.pending.merge(step)
            # an empty step (a character still incomplete) is merged, not delivered: it must not use up the
            # interval that the first visible text would then wait out
            if self.pending is None or self.pending.is_empty() or (self.scheduled and not flush):
                return
            wait = 0.0 if flush else self.last_delivery + self.min_interval - time.monotonic()
            self.scheduled = True
        try:
            if wait > 0:
                self.loop.call_soon_threadsafe(self.loop.call_later, wait, self.deliver)
            else:
                self.loop.call_soon_threadsafe(self.deliver)
        except RuntimeError:  # the loop closed (server shutdown)
            pass

    def deliver(self) -> None:
        with self.lock:
            step, self.pending = self.pending, None
            self.scheduled = False
            self.last_delivery = time.monotonic()
        if step is not None:
            self.on_step(step)


class WorkerPool:
    def __init__(self, workers: list[Worker], tokenizer, max_queue: int):
        self.workers = workers
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.free: deque[Worker] = deque(workers)
        self.waiters: deque[asyncio.Future] = deque()
        self.requests_served = 0
        self.requests_rejected = 0
        self.requests_cancelled = 0
        self.tokens_generated = 0
        self.generation_seconds = 0.0

    # -- scheduling (event-loop thread only) --------------------------------------------------------------

    async def acquire(self) -> Worker:
        if self.free and not self.waiters:
            return self.free.popleft()
        if len(self.waiters) >= self.max_queue:
            self.requests_rejected += 1
            raise APIError(429, f"all {len(self.workers)} workers are busy and {len(self.waiters)} requests are "
                                "queued; retry shortly", code="server_busy",
                           headers={"Retry-After": str(self.retry_after_seconds())})
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self.release(waiter.result())
            raise

    def release(self, worker: Worker) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self.free.append(worker)

    def retry_after_seconds(self) -> int:
        """A guess at when a slot opens: the mean request time times the queue depth per worker."""
        mean = self.generation_seconds / self.requests_served if self.requests_served else 1.0
        return max(1, math.ceil(mean * (len(self.waiters) + 1) / len(self.workers)))

    # -- running ------------------------------------------------------------------------------------------

    def start(self, worker: Worker, prompt_ids: list[int], params: SamplingParams,
              on_step: Callable[[Step], None], on_done: Callable[[Outcome], None]) -> threading.Event:
        """Generate on `worker`'s thread; callbacks run on the event loop. Returns the cancel flag."""
        loop = asyncio.get_running_loop()
        cancel = threading.Event()

        def finish(outcome: Outcome) -> None:
            self.tokens_generated += outcome.completion_tokens
            self.generation_seconds += outcome.seconds
            if outcome.cancelled:
                self.requests_cancelled += 1
            else:
                self.requests_served += 1
            self.release(worker)
            on_done(outcome)

        relay = StepRelay(loop, on_step, STREAM_INTERVAL)

        def body() -> None:
            outcome = run_generation(worker.engine, self.tokenizer, prompt_ids, params, cancel, relay.push)
            relay.push(None, flush=True)
            try:
                loop.call_soon_threadsafe(finish, outcome)  # queued after the last relayed step
            except RuntimeError:  # the loop closed under us (server shutdown): nothing is waiting any more
                pass

        worker.jobs.put(body)
        return cancel

    def stats(self) -> dict:
        return {
            "workers": len(self.workers),
            "workers_busy": len(self.workers) - len(self.free),
            "workers_free": len(self.free),
            "queue_length": len(self.waiters),
            "max_queue": self.max_queue,
            "requests_served": self.requests_served,
            "requests_cancelled": self.requests_cancelled,
            "requests_rejected": self.requests_rejected,
            "tokens_generated": self.tokens_generated,
            "tokens_per_second": round(self.tokens_generated / self.generation_seconds, 2)
            if self.generation_seconds else 0.0,
        }
