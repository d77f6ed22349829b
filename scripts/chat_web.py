"""Serve a checkpoint: the browser chat UI at / and an OpenAI-compatible API under /v1.

    python -m scripts.chat_web                              # newest sft checkpoint on http://127.0.0.1:8000/
    python -m scripts.chat_web --source base --port 8080    # a base model (use the UI's raw-completion mode)
    python -m scripts.chat_web --num_gpus 8 --host 0.0.0.0 --api_key "$KEY"

The model loads in the background: GET /health answers 503 until it is ready. API reference: docs/server.md.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from nanochat.checkpoint import CHECKPOINT_DIRS
from nanochat.common import UserError, autodetect_device_type, print0, resolve_dtype
from nanochat.flags import CheckpointFlags, RuntimeFlags, flag, parse_flags, run_main
from nanochat.server import ServerSettings, create_app
from nanochat.server.loading import load_workers

API_KEY_ENV = "NANOCHAT_API_KEY"


@dataclass
class ChatWebFlags(RuntimeFlags, CheckpointFlags):
    source: str = flag("sft", "which checkpoints to serve", choices=tuple(CHECKPOINT_DIRS))
    host: str = flag("127.0.0.1", "interface to bind; 0.0.0.0 exposes the server to your network (set --api_key)")
    port: int = flag(8000, "TCP port; 0 = any free port (printed at startup)")
    num_gpus: int = flag(1, "workers: one model replica per GPU on cuda; on cpu/mps, workers sharing one model")
    max_queue: int = flag(16, "requests that may wait for a busy worker; one more is answered 429")
    max_tokens: int = flag(1024, "reply length when a request names no max_tokens (capped by the context left)")
    api_key: str = flag("", f"require 'Authorization: Bearer <key>' on the API; empty = ${API_KEY_ENV} or open")
    cors_origins: list[str] = flag([], "browser origins allowed to call the API (e.g. http://localhost:3000); "
                                       "none = CORS off")
    log_dir: str = flag("", "append every conversation as JSONL here; empty = nothing is logged")
    allowed_hosts: list[str] = flag([], "Host names served without --api_key besides 127.0.0.1, localhost and "
                                        "[::1] (e.g. the name of this machine); other names get 400")
    max_body_bytes: int = flag(4 << 20, "request bodies larger than this many bytes get 413 before they are read")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be 0..65535, got {self.port}")
        if self.num_gpus < 1:
            raise UserError(f"--num_gpus must be >= 1, got {self.num_gpus}")
        if self.max_queue < 0:
            raise UserError(f"--max_queue must be >= 0, got {self.max_queue}")
        if self.max_tokens < 1:
            raise UserError(f"--max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_body_bytes < 1:
            raise UserError(f"--max_body_bytes must be >= 1, got {self.max_body_bytes}")


def bind(host: str, port: int) -> socket.socket:
    """Bind here rather than inside uvicorn, so a taken port is one clear line and --port 0 can be reported."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from exc
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    flags = parse_flags(ChatWebFlags, argv)
    device_type = autodetect_device_type(flags.device_type)
    dtype = resolve_dtype(device_type, flags.dtype)
    settings = ServerSettings(api_key=flags.api_key or os.environ.get(API_KEY_ENV) or None,
                              cors_origins=flags.cors_origins, max_queue=flags.max_queue,
                              default_max_tokens=flags.max_tokens, allowed_hosts=flags.allowed_hosts,
                              max_body_bytes=flags.max_body_bytes,
                              log_dir=Path(flags.log_dir) if flags.log_dir else None)
    load_errors: list[BaseException] = []
    server: uvicorn.Server | None = None

    def load():
        return load_workers(flags.source, *flags.checkpoint_choice(), device_type, dtype, flags.num_gpus)

    def on_load_error(exc: BaseException) -> None:
        load_errors.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(load, settings, on_load_error)
    sock = bind(flags.host, flags.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=3))
    print0(f"nanochat: UI at http://{host}:{port}/ , API at http://{host}:{port}/v1 "
           f"({flags.source} checkpoint on {device_type}, {flags.num_gpus} worker(s)"
           f"{', API key required' if settings.api_key else ''})")
    if flags.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print0(f"warning: listening on {flags.host} without --api_key: anyone who can reach this port can use it "
               "(under a Host name listed in --allowed_hosts)")
    server.run(sockets=[sock])
    if load_errors:
        error = load_errors[0]
        raise error if isinstance(error, UserError) else UserError(f"loading the model failed: {error}")
    return 0


if __name__ == "__main__":
    run_main(main)
