"""The real `python -m scripts.chat_web` under bounded loopback load: concurrent streams, the queue limit (429),
/health staying responsive while every worker generates, and disconnects freeing workers. Plus the script's
one-line errors."""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from nanochat.common import UserError
from scripts.chat_web import main
from tests.server_fixtures import LONG_WORD, REPO, ScriptServer, shared_server_base_dir

WORKERS, QUEUE = 2, 2
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = shared_server_base_dir(tmp_path_factory)
    with ScriptServer(root, "--source", "base", "--num_gpus", str(WORKERS), "--max_queue", str(QUEUE)) as live:
        yield live


def stats(server) -> dict:
    return httpx.get(f"{server.url}/stats", timeout=5).json()


def wait_for(server, predicate, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = stats(server)
        if predicate(current):
            return current
        time.sleep(0.02)
    raise AssertionError(f"/stats never satisfied the condition; last: {current}")


def completion(max_tokens: int, stream: bool) -> dict:
    return {"prompt": "x", "max_tokens": max_tokens, "temperature": 0, "stream": stream}


class HeldStream:
    """A streaming request kept open on its own thread until `close()`; records the status and text."""

    def __init__(self, server, max_tokens: int = 6000):
        self.status = None
        self.first_chunk = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(server, max_tokens), daemon=True)
        self.thread.start()

    def run(self, server, max_tokens: int) -> None:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{server.url}/v1/completions", json=completion(max_tokens, True)) as response:
                self.status = response.status_code
                for _ in response.iter_lines():
                    self.first_chunk.set()
                    if self.release.is_set():
                        break
        self.first_chunk.set()

    def close(self) -> None:
        self.release.set()
        self.thread.join(timeout=10)


def test_concurrent_streams_all_complete(server):
    before = stats(server)["requests_served"]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        chunks = client.completions.create(model="m", prompt="x", max_tokens=40, temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in chunks if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(WORKERS + QUEUE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {i: LONG_WORD * 40 for i in range(WORKERS + QUEUE)}
    after = wait_for(server, lambda s: s["workers_busy"] == 0)
    assert after["requests_served"] == before + WORKERS + QUEUE and after["tokens_per_second"] > 0


def test_full_queue_gets_429_and_health_stays_fast(server):
    held = [HeldStream(server) for _ in range(WORKERS)]
    wait_for(server, lambda s: s["workers_busy"] == WORKERS)
    queued = [HeldStream(server) for _ in range(QUEUE)]
    wait_for(server, lambda s: s["queue_length"] == QUEUE)
    try:
        response = httpx.post(f"{server.url}/v1/completions", json=completion(5, False), timeout=10)
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["type"] == "rate_limit_error"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="m", prompt="x", max_tokens=5, stream=True)
        # turned away before it is tokenized (a tokenized one would get the context-length 400): a full queue
        # bounds the CPU spent on prompts too
        over_context = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x " * 100_000}, timeout=10)
        assert over_context.status_code == 429, over_context.text
        latencies = []
        with httpx.Client(timeout=5) as probe:  # one client: building one per call costs ~40 ms by itself
            for _ in range(10):
                start = time.perf_counter()
                assert probe.get(f"{server.url}/health").status_code == 200
                latencies.append(time.perf_counter() - start)
        # both workers are generating 6000-token streams the whole time (typically ~5 ms on an idle 2-core box)
        assert statistics.median(latencies) < 0.1, latencies
        assert stats(server)["workers_busy"] == WORKERS  # still generating the whole time
    finally:
        for stream in held + queued:
            stream.close()
    after = wait_for(server, lambda s: s["workers_busy"] == 0 and s["queue_length"] == 0)
    assert after["requests_rejected"] >= 2


def test_disconnected_stream_frees_its_worker(server):
    before = stats(server)["requests_cancelled"]
    held = [HeldStream(server, max_tokens=8000) for _ in range(WORKERS)]
    for stream in held:
        assert stream.first_chunk.wait(10)
    assert stats(server)["workers_busy"] == WORKERS
    held[0].close()
    after = wait_for(server, lambda s: s["workers_busy"] == WORKERS - 1, timeout=5)
    assert after["requests_cancelled"] == before + 1
    held[1].close()
    wait_for(server, lambda s: s["workers_busy"] == 0, timeout=5)


def test_abandoned_non_stream_request_frees_its_worker(server):
    before = stats(server)["requests_cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=completion(8000, False), timeout=0.5)
    after = wait_for(server, lambda s: s["workers_busy"] == 0 and s["requests_cancelled"] == before + 1, timeout=5)
    assert after["workers_free"] == WORKERS


HUGE_BODY_BYTES = 200 << 20


def huge_body():
    """200 MB in 1 MiB pieces, made as they are sent: the client never holds the body."""
    piece = b" " * (1 << 20)
    for _ in range(HUGE_BODY_BYTES >> 20):
        yield piece


def peak_rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_huge_body_is_refused_quickly_and_memory_stays_flat(server, declared):
    pid = server.process.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark, so VmHWM below is the peak during this request
    rss_before = peak_rss_bytes(pid)
    headers = {"Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(HUGE_BODY_BYTES)
    started = time.monotonic()
    response = httpx.post(f"{server.url}/v1/chat/completions", content=huge_body(), headers=headers, timeout=60)
    elapsed = time.monotonic() - started
    assert response.status_code == 413, response.text[:300]
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert elapsed < 30, f"refusing took {elapsed:.1f}s"
    growth = peak_rss_bytes(pid) - rss_before
    assert growth < 32 << 20, f"the server's RSS peaked {growth >> 20} MiB above where it was"
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def run_script(*args: str, env_root=None) -> subprocess.CompletedProcess:
    env = None if env_root is None else {**os.environ, "NANOCHAT_BASE_DIR": str(env_root)}
    return subprocess.run([sys.executable, "-m", "scripts.chat_web", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_script_binds_loopback_by_default(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert any("UI at http://127.0.0.1:" in line for line in server.lines)
    assert not any(line.startswith("warning:") for line in server.lines)


def test_script_errors_are_one_line(tmp_path, server):
    missing = run_script("--port", "0", env_root=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: no checkpoints in")
    assert "Traceback" not in missing.stderr
    port = server.url.rsplit(":", 1)[1]
    taken = run_script("--port", port, env_root=tmp_path)
    assert taken.returncode == 2 and taken.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_bad_flags_name_the_fix():
    with pytest.raises(UserError, match="--num_gpus must be >= 1, got 0"):
        main(["--num_gpus", "0"])
    with pytest.raises(UserError, match="--port must be 0..65535"):
        main(["--port", "70000"])
    with pytest.raises(UserError, match="--max_body_bytes must be >= 1, got 0"):
        main(["--max_body_bytes", "0"])


def test_queued_client_that_leaves_frees_its_place(server):
    held = [HeldStream(server) for _ in range(WORKERS)]
    wait_for(server, lambda s: s["workers_busy"] == WORKERS)
    try:
        queued = HeldStream(server)
        wait_for(server, lambda s: s["queue_length"] == 1)
        queued.release.set()
        outcome = []

        def give_up_while_queued() -> None:
            try:
                httpx.post(f"{server.url}/v1/completions", json=completion(5, False), timeout=2.0)
            except httpx.ReadTimeout as exc:
                outcome.append(exc)

        impatient = threading.Thread(target=give_up_while_queued)
        impatient.start()
        wait_for(server, lambda s: s["queue_length"] == 2)
        impatient.join(timeout=10)
        assert outcome, "the impatient request should have timed out while queued"
        wait_for(server, lambda s: s["queue_length"] == 1)
    finally:
        for stream in held:
            stream.close()
    queued.close()
    after = wait_for(server, lambda s: s["workers_busy"] == 0 and s["queue_length"] == 0)
    assert after["workers_free"] == WORKERS
