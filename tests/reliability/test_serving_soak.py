"""Serving survives: the real `python -m scripts.chat_web` on 127.0.0.1 under a bounded soak of mixed load (valid,
invalid, streaming, disconnecting and over-context requests). No 5xx, no hung worker, RSS flat (< 10% growth after
warm-up), p99 /health under 100 ms. Length: $NANOCHAT_SOAK_SECONDS (default 120; see docs/reliability.md)."""
from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from nanochat.server.completions import sse_failure
from tests.server_fixtures import CHAT_CONTEXT, ScriptServer, shared_server_base_dir

SOAK_SECONDS = float(os.environ.get("NANOCHAT_SOAK_SECONDS", "120"))
CLIENTS = 3
WORKERS, QUEUE = 2, 4
WARMUP_FRACTION = 0.25  # RSS is compared against its value once caches and allocator pools have filled
HEALTH_PERIOD = 0.05

pytestmark = pytest.mark.slow


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def chat(content: str, max_tokens: int = 8, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0.8,
            "stream": stream}


class Soak:
    """Client threads sending one mixed request after another until the deadline; every status is counted."""

    def __init__(self, url: str, deadline: float):
        self.url, self.deadline = url, deadline
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def record(self, kind: str, status: int, detail: str = "") -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1
            if status >= 500:
                self.failures.append(f"{kind}: {status} {detail[:300]}")

    def valid(self, client: httpx.Client, rng: random.Random) -> None:
        response = client.post(f"{self.url}/v1/chat/completions", json=chat(f"hello {rng.randrange(1000)}"))
        self.record("valid", response.status_code, response.text)
        if response.status_code == 200 and not isinstance(response.json()["choices"][0]["message"]["content"], str):
            self.failures.append(f"valid: no reply text in {response.text[:300]}")

    def streaming(self, client: httpx.Client, rng: random.Random) -> None:
        with client.stream("POST", f"{self.url}/v1/chat/completions",
                           json=chat("tell me a story", max_tokens=rng.randint(4, 24), stream=True)) as response:
            lines = list(response.iter_lines())
            self.record("stream", response.status_code)
            failure = sse_failure(lines) if response.status_code == 200 else None
            if failure:
                self.failures.append(f"stream: {failure}")

    def disconnecting(self, client: httpx.Client, rng: random.Random) -> None:
        with client.stream("POST", f"{self.url}/v1/completions",
                           json={"prompt": "once", "max_tokens": 200, "stream": True}) as response:
            self.record("disconnect", response.status_code)
            for _ in zip(range(rng.randint(1, 3)), response.iter_lines()):
                pass  # leave after a few lines; closing the stream drops the connection

    def invalid(self, client: httpx.Client, rng: random.Random) -> None:
        bodies = [b"{not json", b"[]", b'{"messages": "hi"}', b'{"messages": [{"role": "wizard", "content": "x"}]}',
                  b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
                  b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}', b"\xff\xfe\x00"]
        response = client.post(f"{self.url}/v1/chat/completions", content=rng.choice(bodies),
                               headers={"content-type": "application/json"})
        self.record("invalid", response.status_code, response.text)
        if response.status_code not in (400, 422):
            self.failures.append(f"invalid: expected a 4xx error, got {response.status_code}")

    def over_context(self, client: httpx.Client, rng: random.Random) -> None:
        prompt = " ".join(f"word{rng.randrange(10_000)}" for _ in range(CHAT_CONTEXT * 2))
        response = client.post(f"{self.url}/v1/completions", json={"prompt": prompt, "max_tokens": 4})
        self.record("over_context", response.status_code, response.text)
        if response.status_code != 400:
            self.failures.append(f"over_context: expected 400, got {response.status_code}")

    def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        kinds = [self.valid, self.streaming, self.disconnecting, self.invalid, self.over_context]
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < self.deadline:
                try:
                    rng.choice(kinds)(client, rng)
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.failures.append(f"transport: {type(exc).__name__}: {exc}")


def test_soak_mixed_load(tmp_path_factory):
    root = shared_server_base_dir(tmp_path_factory)
    with ScriptServer(root, "--source", "sft", "--num_gpus", str(WORKERS), "--max_queue", str(QUEUE),
                      "--max_tokens", "16") as server:
        pid = server.process.pid
        start = time.monotonic()
        soak = Soak(server.url, start + SOAK_SECONDS)
        clients = [threading.Thread(target=soak.client_loop, args=(seed,), daemon=True) for seed in range(CLIENTS)]
        for thread in clients:
            thread.start()

        latencies, rss_after_warmup, rss_peak = [], None, 0
        with httpx.Client(timeout=5) as probe:
            while time.monotonic() < soak.deadline:
                began = time.perf_counter()
                assert probe.get(f"{server.url}/health").status_code == 200
                latencies.append(time.perf_counter() - began)
                elapsed = time.monotonic() - start
                if elapsed >= WARMUP_FRACTION * SOAK_SECONDS:
                    rss = rss_bytes(pid)
                    rss_after_warmup = rss_after_warmup or rss
                    rss_peak = max(rss_peak, rss)
                time.sleep(HEALTH_PERIOD)
        for thread in clients:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in clients), "a client never got its answer"

        # no hung worker: everything drains and a fresh request is served
        deadline = time.monotonic() + 10
        while True:
            stats = httpx.get(f"{server.url}/stats", timeout=5).json()
            if stats["workers_busy"] == 0 and stats["queue_length"] == 0:
                break
            assert time.monotonic() < deadline, f"workers never came free: {stats}"
            time.sleep(0.05)
        final = httpx.post(f"{server.url}/v1/chat/completions", json=chat("still there?"), timeout=30)
        assert final.status_code == 200

    summary = dict(sorted(soak.statuses.items()))
    assert not soak.failures, f"{soak.failures[:10]} (statuses {summary})"
    assert all(status < 500 for _, status in soak.statuses)
    kinds = {kind for kind, status in soak.statuses if status < 400 or kind in ("invalid", "over_context")}
    assert kinds == {"valid", "stream", "disconnect", "invalid", "over_context"}, summary
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.1, f"p99 /health {p99 * 1000:.1f} ms over {len(latencies)} probes"
    growth = rss_peak / rss_after_warmup - 1
    assert growth < 0.10, f"RSS grew {growth:.1%} ({rss_after_warmup >> 20} -> {rss_peak >> 20} MiB)"
    print(f"soak {SOAK_SECONDS:.0f}s: {sum(soak.statuses.values())} requests {summary}; p99 /health "
          f"{p99 * 1000:.1f} ms; RSS {rss_after_warmup >> 20} -> {rss_peak >> 20} MiB ({growth:+.1%})")
