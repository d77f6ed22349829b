"""Real servers for the chat_web tests: a base dir holding a tokenizer trained in the test and three tiny saved
checkpoints, served by real uvicorn on 127.0.0.1, either in a thread (`create_app`, fast) or as the real
`python -m scripts.chat_web` subprocess.

Checkpoints (all depth 1, dim 32, loaded through nanochat.checkpoint exactly as users' checkpoints load):
    sft   a random GPT (context 256): arbitrary text, for the API tests and the fuzzer
    base  known logits, "hello" far above the rest (context 8192): greedy writes "hello" until max_tokens,
          so it never ends by itself; for stop/disconnect/load tests and the UI
    mid   known logits, <|assistant_end|> far above the rest: greedy replies end at once with "stop"
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from nanochat.checkpoint import CHECKPOINT_DIRS, save_checkpoint
from nanochat.server import ServerSettings, create_app
from nanochat.server.loading import load_workers
from tests.engine_helpers import known_logits_gpt, random_gpt, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHAT_CONTEXT = 256
LONG_CONTEXT = 8192
LONG_WORD = "hello"
_env_lock = threading.Lock()


def build_server_base_dir(root: Path) -> Path:
    """Tokenizer + the sft/base/mid checkpoints described above, under `root`."""
    tokenizer = train_tokenizer()
    tokenizer.save(root / "tokenizer")
    (hello,) = tokenizer.encode(LONG_WORD)
    models = {
        "sft": random_gpt(tokenizer.vocab_size, depth=1, max_seq_len=CHAT_CONTEXT, seed=1),
        "base": known_logits_gpt(tokenizer.vocab_size, {hello: 12.0}, max_seq_len=LONG_CONTEXT),
        "mid": known_logits_gpt(tokenizer.vocab_size, {tokenizer.encode_special("<|assistant_end|>"): 12.0}),
    }
    for source, model in models.items():
        save_checkpoint(root / CHECKPOINT_DIRS[source] / "d1", 7, model, optimizers=[], meta={}, rank_state={},
                        keep_last=-1)
    return root


_built: dict[str, Path] = {}


def shared_server_base_dir(tmp_path_factory) -> Path:
    """Built once per pytest session, whichever server test module asks first."""
    if "root" not in _built:
        _built["root"] = build_server_base_dir(tmp_path_factory.mktemp("chat_web"))
    return _built["root"]


@contextmanager
def base_dir_env(root: Path):
    """load_model finds checkpoints through $NANOCHAT_BASE_DIR; point it at `root` only while loading."""
    with _env_lock:
        old = os.environ.get("NANOCHAT_BASE_DIR")
        os.environ["NANOCHAT_BASE_DIR"] = str(root)
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("NANOCHAT_BASE_DIR", None)
            else:
                os.environ["NANOCHAT_BASE_DIR"] = old


def checkpoint_loader(root: Path, source: str, num_workers: int = 1):
    def load():
        with base_dir_env(root):
            return load_workers(source, None, None, "cpu", None, num_workers)
    return load


class FailingEngine:
    """A real Engine whose generations raise after `after_steps` steps, as a device fault mid-reply would."""

    def __init__(self, engine, after_steps: int):
        self.engine = engine
        self.after_steps = after_steps

    def generate(self, *args, **kwargs):
        return FailingGeneration(self.engine.generate(*args, **kwargs), self.after_steps)


class FailingGeneration:
    def __init__(self, generation, after_steps: int):
        self.generation = generation
        self.after_steps = after_steps

    def __getattr__(self, name: str):
        return getattr(self.generation, name)

    def __iter__(self):
        for step, columns in enumerate(self.generation):
            if step == self.after_steps:
                raise RuntimeError("injected fault mid-generation")
            yield columns


def failing_loader(root: Path, source: str, after_steps: int):
    load = checkpoint_loader(root, source)

    def load_failing():
        model = load()
        for worker in model.workers:
            worker.engine = FailingEngine(worker.engine, after_steps)
        return model
    return load_failing


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/health", timeout=2)
            if response.status_code == 200:
                return
            if response.json().get("status") == "error":
                raise RuntimeError(f"server failed to load: {response.text}")
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not become healthy in {timeout:.0f}s")


class ThreadServer:
    """uvicorn serving `app` on a free 127.0.0.1 port in a background thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@contextmanager
def serve_checkpoint(root: Path, source: str, num_workers: int = 1, **settings):
    """A loaded ThreadServer for `source`; `settings` go to ServerSettings."""
    app = create_app(checkpoint_loader(root, source, num_workers), ServerSettings(**settings))
    with ThreadServer(app) as server:
        wait_healthy(server.url)
        yield server


class ScriptServer:
    """The real `python -m scripts.chat_web` in a subprocess on a free port; its output is kept in `lines`."""

    def __init__(self, root: Path, *flags: str):
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(root), "PYTHONUNBUFFERED": "1"}
        env.pop("NANOCHAT_API_KEY", None)
        self.process = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--port", "0", *flags],
                                        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.lines: list[str] = []
        self.url_found = threading.Event()
        self.url = ""
        threading.Thread(target=self.drain, daemon=True).start()

    def drain(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = re.search(r"UI at (http://[\d.]+:\d+)/", line)
            if match:
                self.url = match.group(1)
                self.url_found.set()

    def __enter__(self) -> ScriptServer:
        if not self.url_found.wait(60):
            self.process.kill()
            raise RuntimeError("chat_web did not start:\n" + "\n".join(self.lines))
        wait_healthy(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
