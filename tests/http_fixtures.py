"""A real loopback HTTP file server for download tests, with faults that can be queued per path.

    with FileServer(directory) as server:
        server.add_faults("shard_00000.parquet", "503", "cut")   # 1st request 503, 2nd cut mid-body, 3rd ok
        download_file(server.url("shard_00000.parquet"), dest)

Faults: "503" (status 503, empty body), "404", "cut" (full Content-Length, half the body, then the connection
closes), "truncate" (first half of the file served as a complete 200 with a matching Content-Length),
"bad_length" (Content-Length one byte larger than the body, then close), "slow" (the whole file in 64 KiB
pieces 50 ms apart, for interrupting a download midway), "trickle" (one byte every 20 ms, never finishing in a
test's time), "no_length" (the whole file without Content-Length, ended by closing the connection). Every
request's path and headers are recorded in `server.requests`.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAULTS = ("503", "404", "cut", "truncate", "bad_length", "slow", "trickle", "no_length")
SLOW_PIECE_BYTES = 64 * 1024
SLOW_PIECE_DELAY_S = 0.05
TRICKLE_DELAY_S = 0.02


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients that hang up mid-response are part of the tests; anything else is still printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FileServer:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.faults: dict[str, deque[str]] = defaultdict(deque)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.httpd = QuietServer(("127.0.0.1", 0), self.make_handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def url(self, name: str = "") -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def add_faults(self, name: str, *faults: str) -> None:
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {FAULTS}")
        with self.lock:
            self.faults[name].extend(faults)

    def requests_for(self, name: str) -> int:
        with self.lock:
            return sum(1 for path, _ in self.requests if path == name)

    def next_fault(self, name: str) -> str | None:
        with self.lock:
            queue = self.faults.get(name)
            return queue.popleft() if queue else None

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def make_handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/").split("?")[0]
                with server.lock:
                    server.requests.append((name, dict(self.headers)))
                fault = server.next_fault(name)
                path = server.directory / name
                if fault in ("503", "404") or not path.is_file():
                    self.send_response(int(fault) if fault else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = path.read_bytes()
                half = body[: len(body) // 2]
                self.send_response(200)
                if fault == "cut":
                    self.send_header("Content-Length", str(len(body)))
                    body = half
                elif fault == "truncate":
                    self.send_header("Content-Length", str(len(half)))
                    body = half
                elif fault == "bad_length":
                    self.send_header("Content-Length", str(len(body) + 1))
                elif fault != "no_length":
                    self.send_header("Content-Length", str(len(body)))
                if fault in ("cut", "bad_length", "no_length"):
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                step, delay = {"slow": (SLOW_PIECE_BYTES, SLOW_PIECE_DELAY_S),
                               "trickle": (1, TRICKLE_DELAY_S)}.get(fault, (max(len(body), 1), 0))
                for start in range(0, len(body), step):
                    try:
                        self.wfile.write(body[start:start + step])
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return  # the client went away mid-body
                    time.sleep(delay)

        return Handler
