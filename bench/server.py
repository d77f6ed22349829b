"""Server overhead: time to first token and tokens/s per stream through `python -m scripts.chat_web` (HTTP,
SSE, worker threads) against direct `Engine.generate` calls on the same checkpoint, at 1, 4 and 8 concurrent
clients, plus /health latency while every stream is generating.

    python -m bench.server [--clients 1 4 8] [--max_tokens 128]

The model is the demo config (d4, dim 192, head_dim 64, context 256, vocab 4096) with random weights (speed does
not depend on them; the end-token logits are zeroed so no reply stops early), saved as a real checkpoint in a
temporary base dir and served by the real script with one worker per client (`--num_gpus N`, which on CPU means
N workers sharing the model). The reference runs N threads of direct engine calls through the server's own
generation loop (`run_generation`: engine + stream decoder, no HTTP) with the same torch thread count; TTFT is
the time to the first visible text on both sides. Ratio = server / direct (1.0 = no overhead; below 1 for
tokens/s, above 1 for TTFT means overhead). /health is probed five times a second during the server run.
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import torch

from nanochat.checkpoint import CHECKPOINT_DIRS, load_model, save_checkpoint
from nanochat.engine import Engine, SamplingParams
from nanochat.flags import flag, parse_flags
from nanochat.gpt import GPT, GPTConfig
from nanochat.server.completions import sse_failure
from nanochat.server.generation import Step, run_generation
from nanochat.server.loading import cpu_threads_per_worker
from nanochat.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARD = REPO.parent / "shared" / "data" / "pretrain" / "shard_00000.parquet"
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


@dataclass
class BenchFlags:
    clients: list[int] = flag([1, 4, 8], "concurrent clients to measure")
    max_tokens: int = flag(128, "tokens per reply (greedy, never stops early)")
    vocab_size: int = flag(4096, "tokenizer vocabulary (the demo's)")


def build_checkpoint(root: Path, vocab_size: int) -> None:
    texts = pq.read_table(SHARD).column("text").to_pylist()[:300] if SHARD.is_file() else ["hello world"] * 64
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size)
    tokenizer.save(root / "tokenizer")
    torch.manual_seed(0)
    config = GPTConfig(depth=4, model_dim=192, num_heads=3, num_kv_heads=3, head_dim=64, max_seq_len=256,
                       vocab_size=tokenizer.vocab_size)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.05)
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tokenizer.encode_special(name)].zero_()
    save_checkpoint(root / CHECKPOINT_DIRS["sft"] / "d4", 1, model, optimizers=[], meta={}, rank_state={},
                    keep_last=-1)


@dataclass
class StreamTiming:
    ttft: float  # seconds from request to the first text
    tokens_per_second: float  # after the first token


def summarize(timings: list[StreamTiming]) -> tuple[float, float]:
    return statistics.mean(t.ttft for t in timings), statistics.mean(t.tokens_per_second for t in timings)


def run_concurrently(count: int, work) -> list:
    results: list = [None] * count
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, work())) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def direct_streams(engine: Engine, prompt: list[int], clients: int, max_tokens: int) -> list[StreamTiming]:
    """The reference: the server's own generation loop (engine + stream decoder) called in-process, no HTTP."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0)

    def one() -> StreamTiming:
        start = time.perf_counter()
        first = []

        def emit(step: Step) -> None:
            if not first and step.deltas[0]:
                first.append(time.perf_counter())

        outcome = run_generation(engine, engine.tokenizer, prompt, params, threading.Event(), emit)
        end = time.perf_counter()
        return StreamTiming(first[0] - start, (outcome.completion_tokens - 1) / (end - first[0]))

    return run_concurrently(clients, one)


def server_streams(url: str, clients: int, max_tokens: int) -> list[StreamTiming]:
    body = {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}

    def one() -> StreamTiming:
        # the client is built before the clock starts: building one (its TLS context) costs ~40 ms of CPU
        with httpx.Client(timeout=300) as client:
            start = time.perf_counter()
            first = None
            tokens = 0
            lines = []
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if '"content": "' in line and '"content": ""' not in line:
                        first = first or time.perf_counter()
                    if '"usage": {' in line:
                        tokens = int(re.search(r'"completion_tokens": (\d+)', line).group(1))
            end = time.perf_counter()
        failure = sse_failure(lines)
        if failure:
            raise RuntimeError(f"a benchmark stream failed: {failure}")
        return StreamTiming(first - start, (tokens - 1) / (end - first))

    return run_concurrently(clients, one)


def health_latency(url: str, stop: threading.Event) -> list[float]:
    latencies = []
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get(f"{url}/health")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.2)
    return latencies


def start_server(root: Path, workers: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(root), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--port", "0", "--num_gpus", str(workers)],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    for line in process.stdout:
        match = re.search(r"UI at (http://[\d.]+:\d+)/", line)
        if match:
            url = match.group(1)
            break
    threading.Thread(target=lambda: process.stdout.read(), daemon=True).start()  # keep draining the access log
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:  # bound but not listening yet
            pass
        time.sleep(0.1)


def main() -> None:
    flags = parse_flags(BenchFlags)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["NANOCHAT_BASE_DIR"] = str(root)
        build_checkpoint(root, flags.vocab_size)
        model, tokenizer, _ = load_model("sft", "cpu")
        engine = Engine(model, tokenizer)
        prompt = tokenizer.render_for_completion({"messages": MESSAGES})
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, demo model d4/192, prompt {len(prompt)} tokens, "
              f"{flags.max_tokens} new tokens per stream")
        print(f"{'clients':>7} | {'TTFT direct':>11} {'TTFT server':>11} {'ratio':>6} | {'tok/s direct':>12} "
              f"{'tok/s server':>12} {'ratio':>6} | /health median (max)")
        for clients in flags.clients:
            torch.set_num_threads(cpu_threads_per_worker(clients))  # what the server gives each worker
            direct_streams(engine, prompt, 1, 8)  # warm-up
            direct_ttft, direct_speed = summarize(direct_streams(engine, prompt, clients, flags.max_tokens))
            process, url = start_server(root, clients)
            try:
                server_streams(url, 1, 8)  # warm-up
                stop = threading.Event()
                latencies: list[float] = []
                probe = threading.Thread(target=lambda: latencies.extend(health_latency(url, stop)))
                probe.start()
                server_ttft, server_speed = summarize(server_streams(url, clients, flags.max_tokens))
                stop.set()
                probe.join()
            finally:
                process.terminate()
                process.wait()
            print(f"{clients:>7} | {direct_ttft * 1000:>9.0f}ms {server_ttft * 1000:>9.0f}ms "
                  f"{server_ttft / direct_ttft:>5.2f}x | {direct_speed:>12.1f} {server_speed:>12.1f} "
                  f"{server_speed / direct_speed:>5.2f}x | {statistics.median(latencies) * 1000:.0f} ms "
                  f"({max(latencies) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
